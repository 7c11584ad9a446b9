"""A ``Patch``: the one representation every fold produces and every writer consumes.

A patch is a list of weight changes keyed by in-memory module name (``model.language_model.
layers.2.mlp.down_proj``). Each change is ``W += B @ A`` (kept low-rank, so it is also a LoRA) plus
an optional bias change, or a ``Growth`` that appends rows or columns to a weight (new MLP neurons),
with the config keys that record the new width. ``apply()`` edits a live model (and restores it bit-exactly), the export
writer maps module names to on-disk keys and rewrites only those tensors, and the PEFT writer
stores ``B``/``A`` as ``lora_B``/``lora_A``. No writer needs to know which fold made the patch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from sauce_export.errors import InputError


@dataclass(frozen=True)
class WeightDelta:
    """``weight += B @ A`` and ``bias += bias`` for one module, in its weight's own layout.

    For ``nn.Linear`` the layout is ``[out, in]``; for ``nn.Embedding`` it is ``[vocab, d]``.
    """

    module: str
    B: torch.Tensor
    A: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.B.shape[0]), int(self.A.shape[1])

    def dense(self) -> torch.Tensor:
        """The full ``[out, in]`` change in float32."""
        return self.B.float() @ self.A.float()

    def apply_to(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight + B @ A`` computed in float32 and returned in ``weight``'s dtype."""
        return (weight.float() + self.dense().to(weight.device)).to(weight.dtype)


@dataclass(frozen=True)
class Growth:
    """Append ``extra`` to a Linear weight: as new output rows (``dim=0``) or input columns (``dim=1``)."""

    module: str
    dim: int
    extra: torch.Tensor

    def grown(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.cat([weight, self.extra.to(weight)], dim=self.dim)

    def grown_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        rows, cols = shape
        return (rows + self.extra.shape[0], cols) if self.dim == 0 else (rows, cols + self.extra.shape[1])


@dataclass(frozen=True)
class Patch:
    """Weight changes of one fold, plus a JSON description of how they were made."""

    deltas: tuple[WeightDelta, ...]
    description: dict[str, Any] = field(default_factory=dict)
    grows: tuple[Growth, ...] = ()
    config_updates: dict[str, int] = field(default_factory=dict)
    """Dotted ``config.json`` keys to set, e.g. ``text_config.intermediate_size`` after a growth."""

    def __post_init__(self) -> None:
        names = [d.module for d in self.deltas] + [g.module for g in self.grows]
        if len(set(names)) != len(names):
            raise ValueError(f"a patch changes each module once, got duplicates in {names}")

    @property
    def modules(self) -> list[str]:
        return [d.module for d in self.deltas] + [g.module for g in self.grows]

    def check(self, model: nn.Module, where: str = "patch") -> None:
        """Every module exists with the delta's shape; every factor is finite (InputError otherwise)."""
        for delta in self.deltas:
            for name, t in (("B", delta.B), ("A", delta.A), ("bias", delta.bias)):
                if t is not None and not torch.isfinite(t).all():
                    raise InputError(where, f"{delta.module}.{name}", "contains NaN or Inf")
            module = _module(model, delta.module, where)
            weight = getattr(module, "weight", None)
            if weight is None or tuple(weight.shape) != delta.shape:
                got = None if weight is None else list(weight.shape)
                raise InputError(
                    where, delta.module, f"weight shape {got} != patch shape {list(delta.shape)}"
                )
            if delta.bias is not None and getattr(module, "bias", None) is None:
                raise InputError(where, f"{delta.module}.bias", "the module has no bias to patch")
        for g in self.grows:
            if not torch.isfinite(g.extra).all():
                raise InputError(where, f"{g.module}.extra", "contains NaN or Inf")
            module = _module(model, g.module, where)
            if (
                not isinstance(module, nn.Linear)
                or module.weight.shape[1 - g.dim] != g.extra.shape[1 - g.dim]
            ):
                raise InputError(where, g.module, f"cannot append {list(g.extra.shape)} along dim {g.dim}")

    @contextmanager
    def apply(self, model: nn.Module) -> Iterator[nn.Module]:
        """Fold the patch into ``model`` in place; on exit the original tensors are put back exactly."""
        self.check(model)
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        swapped: list[tuple[nn.Linear, nn.Parameter]] = []
        configs: list[tuple[Any, str, Any]] = []
        try:
            with torch.no_grad():
                for delta in self.deltas:
                    module = model.get_submodule(delta.module)
                    saved.append((module.weight, module.weight.detach().clone()))
                    module.weight.copy_(delta.apply_to(module.weight))
                    if delta.bias is not None:
                        saved.append((module.bias, module.bias.detach().clone()))
                        module.bias.add_(delta.bias.to(module.bias))
                for g in self.grows:
                    linear = model.get_submodule(g.module)
                    swapped.append((linear, linear.weight))
                    linear.weight = nn.Parameter(g.grown(linear.weight), requires_grad=False)
                    linear.out_features, linear.in_features = linear.weight.shape
            for dotted, value in self.config_updates.items():
                *path, key = dotted.split(".")
                obj = model.config
                for part in path:
                    obj = getattr(obj, part)
                configs.append((obj, key, getattr(obj, key)))
                setattr(obj, key, value)
            yield model
        finally:
            with torch.no_grad():
                for param, original in saved:
                    param.copy_(original)
            for linear, weight in swapped:
                linear.weight = weight
                linear.out_features, linear.in_features = weight.shape
            for obj, key, value in configs:
                setattr(obj, key, value)

    def stats(self) -> dict[str, Any]:
        """Sizes for the report: rank (or appended width) and Frobenius norm per module."""
        stats = {
            d.module: {"rank": d.rank, "norm": round(float(d.dense().detach().norm()), 6)}
            for d in self.deltas
        }
        for g in self.grows:
            stats[g.module] = {"appended": int(g.extra.shape[g.dim]), "norm": round(float(g.extra.norm()), 6)}
        return stats

    def max_rank(self) -> int:
        return max((d.rank for d in self.deltas), default=0)

    def save(self, path: Path) -> None:
        """One safetensors file: ``{module}.B``, ``.A``, ``.bias``; the description in its header."""
        tensors: dict[str, torch.Tensor] = {}
        for d in self.deltas:
            tensors[f"{d.module}.B"], tensors[f"{d.module}.A"] = d.B.contiguous(), d.A.contiguous()
            if d.bias is not None:
                tensors[f"{d.module}.bias"] = d.bias.contiguous()
        for g in self.grows:
            tensors[f"{g.module}.extra{g.dim}"] = g.extra.contiguous()
        meta = {
            "modules": json.dumps([d.module for d in self.deltas]),
            "grows": json.dumps([[g.module, g.dim] for g in self.grows]),
            "config_updates": json.dumps(self.config_updates),
            "description": json.dumps(self.description),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: t.cpu() for k, t in tensors.items()}, str(tmp), metadata=meta)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Patch:
        if not Path(path).is_file():
            raise InputError(str(path), "patch", "no such patch file")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            if "modules" not in meta:
                raise InputError(str(path), "modules", "not a sauce-export patch (header metadata missing)")
            tensors = load_file(str(path))
            for name, tensor in tensors.items():
                if not torch.isfinite(tensor).all():
                    raise InputError(str(path), name, "contains NaN or inf")
            deltas = tuple(
                WeightDelta(m, tensors[f"{m}.B"], tensors[f"{m}.A"], tensors.get(f"{m}.bias"))
                for m in json.loads(meta["modules"])
            )
            grows = tuple(
                Growth(m, dim, tensors[f"{m}.extra{dim}"]) for m, dim in json.loads(meta.get("grows", "[]"))
            )
            return cls(
                deltas,
                json.loads(meta.get("description", "{}")),
                grows,
                json.loads(meta.get("config_updates", "{}")),
            )
        except SafetensorError as err:
            raise InputError(str(path), "patch", f"not a readable safetensors file ({err})") from None
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(str(path), "modules", f"malformed patch header or tensors ({err!r})") from None


def _module(model: nn.Module, name: str, where: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise InputError(where, name, "the model has no such module") from None
