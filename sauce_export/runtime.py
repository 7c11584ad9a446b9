"""Where and in which precision the model runs: the recipe's ``runtime`` section.

The model is loaded once, in its checkpoint's own dtype by default (a bf16 7B model takes 14 GB,
not the 28 GB of a float32 copy), on one device or spread by a transformers ``device_map``.
Nothing upcasts the model; what needs float32 gets it locally, on the tensors it reads: the SAE
(trained and applied in float32, edit.py casts the hidden state in and back), the fold's least
squares and KL refinement (fold.py), the patch arithmetic (patch.py, export.py) and every
log-softmax a metric or the refinement takes (verify.py, fold.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import PretrainedConfig

from sauce_export.architectures import text_config
from sauce_export.errors import InputError

DTYPES = ("bfloat16", "float16", "float32")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass
class RuntimeConfig:
    """Device and dtype of the model for every stage (CLI: ``--device``, ``--dtype``)."""

    device: str = field(
        default="auto",
        metadata={
            "help": "auto (CUDA when available, else CPU), cpu, cuda or cuda:N. Under torchrun each "
            "rank takes cuda:LOCAL_RANK (gloo on the CPU, nccl on CUDA; docs/distributed.md)."
        },
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = field(
        default="auto",
        metadata={
            "help": "Model dtype: auto (the checkpoint's own, from config.json), bfloat16, float16 or "
            "float32. The SAE, fold and metrics compute in float32 whatever this is."
        },
    )
    device_map: Literal["auto", "balanced", "balanced_low_0", "sequential"] | None = field(
        default=None,
        metadata={
            "help": "Passed to transformers to spread a model too large for one device over the "
            "GPUs (and CPU); replaces runtime.device for the model. Not under torchrun (each rank "
            "holds a whole model)."
        },
    )


def check_device(value: str, where: str, dotted: str) -> str:
    """``value`` if it names a device this recipe may ask for (availability is checked at load)."""
    if not _DEVICE.fullmatch(value):
        raise InputError(where, dotted, f"must be auto, cpu, cuda or cuda:N, got {value!r}")
    return value


def override(cfg: RuntimeConfig, device: str | None, dtype: str | None) -> None:
    """Apply the CLI's ``--device`` / ``--dtype`` over the recipe's ``runtime``."""
    if device is not None:
        cfg.device = check_device(device, "command line", "--device")
    if dtype is not None:
        if dtype not in ("auto", *DTYPES):
            raise InputError("command line", "--dtype", f"must be one of auto, {', '.join(DTYPES)}")
        cfg.dtype = dtype  # type: ignore[assignment]


def resolve_device(name: str, where: str) -> torch.device:
    """The torch device ``name`` means here; asking for a CUDA device this machine lacks is bad input."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(check_device(name, where, "runtime.device"))
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise InputError(
                where, "runtime.device", f"{name} requested but this machine has {count} CUDA devices"
            )
    return device


def checkpoint_dtype(config: PretrainedConfig) -> torch.dtype:
    """The dtype ``config.json`` records (top level, else the text model's); float32 when it says none."""
    for cfg in (config, text_config(config)):
        value = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
        if isinstance(value, torch.dtype):
            return value
        if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
            return getattr(torch, value)
    return torch.float32


def resolve_dtype(name: str, config: PretrainedConfig) -> torch.dtype:
    return checkpoint_dtype(config) if name == "auto" else getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Placement:
    """A resolved ``runtime``: what ``lm.load_model`` receives."""

    dtype: torch.dtype
    device: torch.device
    device_map: str | None = None

    def load_options(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "device": self.device, "device_map": self.device_map}


def placement(cfg: RuntimeConfig, config: PretrainedConfig, where: str) -> Placement:
    return Placement(resolve_dtype(cfg.dtype, config), resolve_device(cfg.device, where), cfg.device_map)
