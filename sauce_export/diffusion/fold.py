"""Fold the hooked edit into the UNet and write it as a standalone diffusers pipeline folder (only
the UNet's weight file rewritten) and as a diffusers LoRA file.

The project edit (an affine map of a writer's output) folds exactly into that writer's weight and
bias (``exact_patch``). The gated edit cannot: a LoRA patch on linear writers inside the site's
block is fitted to the *hooked* UNet outputs at every timestep of hooked trajectories (``fit_patch``).

Why fit on hooked trajectories: the edit changes the image from the first step on, so the states
the edited UNet meets are not the original's; a patch fitted on the original's states was faithful
there and collapsed along the edited path (exported/hooked agreement 0.21 in the first attempt).
Why gradient-fit inside the block: the edit is gated (a latent above its mean), a single linear
read of one module cannot switch on and off; patches on two modules with the block's own
nonlinearities (attention softmax, GEGLU) between them can.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from sauce_export.diffusion.unet import ProjectEdit, block_of, site_module
from sauce_export.errors import InputError
from sauce_export.fsutil import atomic_dir
from sauce_export.progress import bar

Patch = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
"""Full UNet module path -> (A [rank, in, *kernel], B [out, rank], bias change or None); the
weight becomes ``W + B @ A`` (over the input axes; a conv's kernel stays on A) and the bias
``b + bias change``."""

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"


@contextmanager
def unet_io(unet: nn.Module) -> Iterator[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """(sample, timestep per row, encoder states, output) of every UNet call; hooks registered
    before this context (the edit) have already shaped the output it records."""
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0]
        t = torch.as_tensor(args[1] if len(args) > 1 else kwargs["timestep"]).expand(x.shape[0])
        pending.append((x.detach(), t.detach(), kwargs["encoder_hidden_states"].detach()))

    def post(_m: nn.Module, _i: object, output: object) -> None:
        out = output[0] if isinstance(output, tuple) else output.sample  # type: ignore[attr-defined,index]
        seen.append((*pending.pop(), out.detach()))

    handles = [unet.register_forward_pre_hook(pre, with_kwargs=True), unet.register_forward_hook(post)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


class Labeller(nn.Module):
    """Steps with the folded UNet and records, at each state it visits, the hooked UNet's output
    there: a refit on these pairs teaches the patch the states its own errors lead to."""

    def __init__(self, folded: nn.Module, hooked: nn.Module) -> None:
        super().__init__()
        self.folded, self.hooked = folded, hooked
        self.samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor) -> object:
        with torch.no_grad():
            ref = self.hooked(x, t, encoder_hidden_states=encoder_hidden_states).sample
        self.samples.append((x, torch.as_tensor(t).expand(x.shape[0]), encoder_hidden_states, ref))
        return self.folded(x, t, encoder_hidden_states=encoder_hidden_states)


class _Lora(nn.Module):
    """``base(x) + out_scale * B (A x / in_scale)``: A and B are fitted at unit scale, so Adam's
    step size suits a block whose activations are in the thousands (this UNet's are)."""

    def __init__(
        self, base: nn.Linear, rank: int, in_scale: float, out_scale: float, gen: torch.Generator
    ) -> None:
        super().__init__()
        self.base, self.in_scale, self.out_scale = base, in_scale, out_scale
        self.A = nn.Parameter(torch.randn(rank, base.in_features, generator=gen) / base.in_features**0.5)
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.out_scale * ((x / self.in_scale) @ self.A.T) @ self.B.T

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the merged form ``W + B @ A``."""
        return (self.A / self.in_scale).detach().clone(), (self.out_scale * self.B).detach().clone()


def linear_module(block: nn.Module, rel: str, where: str) -> nn.Linear:
    """The Linear at ``rel`` inside the site's block (``fold.modules`` entries)."""
    try:
        module = block.get_submodule(rel)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear):
        raise InputError(where, "fold.modules", f"{rel!r} is not a Linear module inside the site's block")
    return module


def fit_patch(
    unet: nn.Module,
    site: str,
    samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    modules: list[str],
    rank: int,
    steps: int,
    lr: float,
    seed: int = 0,
    where: str = "recipe",
    progress: bool = True,
) -> tuple[Patch, dict[str, float]]:
    """Adam on the LoRA factors of ``modules`` (relative to the site) so the patched UNet's output
    matches the hooked UNet's on ``samples`` (inputs of hooked trajectories, every timestep).

    The UNet's output, not the block's: the block's activations are in the thousands and most of
    the edit's change there is normalised away downstream, so a block-level fit spends its capacity
    on directions that do not matter and leaks into ones that do. Returns the patch and, on a
    held-out tenth, the share of the edit's squared effect on the output the patch misses."""
    gen = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(unet).float().requires_grad_(False)
    block_name, block = block_of(model, site, where)
    x, t, e, y = (torch.cat([s[i] for s in samples]) for i in range(4))
    channels = x.shape[1]
    y = y[:, :channels]
    order = torch.randperm(len(x), generator=gen)
    n_val = max(1, len(x) // 10)
    val, train = order[:n_val], order[n_val:]
    bases = {rel: linear_module(block, rel, where) for rel in modules}
    rms: dict[str, tuple[float, float]] = {}

    def measure(rel: str):  # type: ignore[no-untyped-def]
        def hook(_m: nn.Module, args: tuple, out: torch.Tensor) -> None:
            rms.setdefault(rel, (float(args[0].pow(2).mean().sqrt()), float(out.pow(2).mean().sqrt())))

        return hook

    handles = [m.register_forward_hook(measure(rel)) for rel, m in bases.items()]
    with torch.no_grad():
        base_val = model(x[val], t[val], encoder_hidden_states=e[val]).sample[:, :channels]
    for h in handles:
        h.remove()
    effect = float((y[val] - base_val).pow(2).mean().sqrt()) or 1.0
    loras = {}
    for rel, base in bases.items():
        parent, _, name = rel.rpartition(".")
        lora = _Lora(base, rank, rms[rel][0] or 1.0, rms[rel][1] or 1.0, gen)
        setattr(block.get_submodule(parent) if parent else block, name, lora)
        loras[rel] = lora
    params = [p for lo in loras.values() for p in (lo.A, lo.B)]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    batch = min(64, len(train))
    with bar(steps, "fit LoRA fold", progress) as counter:
        for step in range(steps):
            idx = train[torch.randint(len(train), (batch,), generator=gen)]
            out = model(x[idx], t[idx], encoder_hidden_states=e[idx]).sample[:, :channels]
            loss = (out - y[idx]).pow(2).mean() / effect**2
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            counter.update()
            if step % 20 == 0:
                counter.set_postfix(loss=f"{loss.item():.3f}")
    with torch.no_grad():
        out = model(x[val], t[val], encoder_hidden_states=e[val]).sample[:, :channels]
    stats = {
        "missed_share": float(
            (out - y[val]).pow(2).sum() / (base_val - y[val]).pow(2).sum().clamp_min(1e-20)
        ),
        "edit_rms_on_output": effect,
        "samples": len(x),
    }
    patch: Patch = {f"{block_name}.{rel}": (*lo.factors(), None) for rel, lo in loras.items()}
    return patch, stats


def exact_patch(unet: nn.Module, site: str, edit: ProjectEdit, where: str = "recipe") -> Patch:
    """``edit`` folded into the writer at ``site``: its weight and bias become ``M W`` and
    ``M b - (scale - 1) U U^T center`` with ``M = I + (scale - 1) U U^T``, so its output is exactly
    the edited one (float rounding aside). Rank = the number of directions: A = U^T W, B =
    (scale - 1) U over the output channels (a conv's kernel stays on A)."""
    module = site_module(unet, site, where)
    if not isinstance(module, nn.Linear | nn.Conv2d) or module.bias is None:
        raise InputError(
            where,
            "site",
            "the project edit folds exactly only into a Linear or conv writer with a bias "
            "(e.g. down_blocks.1.attentions.0.proj_out), not a whole block",
        )
    u, c = edit.basis.double(), edit.center.double()
    w, b = module.weight.detach().double(), module.bias.detach().double()
    a = torch.einsum("ok,o...->k...", u, w)
    bias = (edit.scale - 1.0) * (u @ (u.T @ (b - c)))
    return {site: (a.float(), ((edit.scale - 1.0) * u).float(), bias.float())}


def weight_change(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``B @ A`` over the input axes: the change of a Linear's or a conv's weight."""
    return (b @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:])


def merged(unet: nn.Module, patch: Patch) -> nn.Module:
    """A copy of ``unet`` with ``W + B @ A`` in every patched module."""
    out = copy.deepcopy(unet)
    with torch.no_grad():
        for name, (a, b, bias) in patch.items():
            module = out.get_submodule(name)
            module.weight.add_(weight_change(a, b).to(module.weight.dtype))
            if bias is not None:
                module.bias.add_(bias.to(module.bias.dtype))
    return out


def save_patch(patch: Patch, path: Path, meta: dict[str, object]) -> None:
    tensors = {}
    for name, (a, b, bias) in patch.items():
        tensors[f"{name}.A"], tensors[f"{name}.B"] = a.contiguous(), b.contiguous()
        if bias is not None:
            tensors[f"{name}.bias"] = bias.contiguous()
    save_file(tensors, str(path), metadata={"meta": json.dumps(meta)})


def load_patch(path: Path) -> Patch:
    t = load_file(str(path))
    return {k[:-2]: (t[k], t[k[:-2] + ".B"], t.get(k[:-2] + ".bias")) for k in t if k.endswith(".A")}


def export_pipeline(source: Path, patch: Patch, out: Path) -> dict[str, object]:
    """``out``: the source pipeline folder with every file copied byte for byte except the UNet's
    weights, where each patched module's weight is ``W + B @ A`` (same keys, dtype, metadata)."""
    src = source / UNET_WEIGHTS
    if not src.is_file():
        raise InputError(str(source), "unet", f"no {UNET_WEIGHTS} (a single-file diffusers UNet is expected)")
    with atomic_dir(out, overwrite=True) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        with safe_open(str(src), "pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        for name, (a, b, bias) in patch.items():
            changes = {"weight": weight_change(a, b), "bias": bias}
            for field, change in changes.items():
                key = f"{name}.{field}"
                if change is None:
                    continue
                if key not in tensors:
                    raise InputError(str(src), key, "patched module missing from the UNet's weights")
                tensors[key] = (tensors[key].float() + change).to(tensors[key].dtype)
        save_file(tensors, str(tmp / UNET_WEIGHTS), metadata=meta)
    changed = sorted(
        [f"{n}.weight" for n in patch] + [f"{n}.bias" for n, p in patch.items() if p[2] is not None]
    )
    return {"path": str(out), "changed_tensors": changed}


def export_lora(patch: Patch, out: Path) -> dict[str, object]:
    """A diffusers LoRA file (PEFT key layout, ``unet.`` prefix) that stock ``load_lora_weights``
    reads; with no alphas stored, diffusers uses alpha = rank, i.e. scale 1: exactly ``B @ A``.
    A conv's A keeps the kernel and its B is 1x1 (PEFT's conv LoRA); bias changes go to
    ``lora_B.bias`` (PEFT's ``lora_bias``, which diffusers detects from the keys and then expects
    for every module: those without a bias change get zeros)."""
    any_bias = any(p[2] is not None for p in patch.values())
    with atomic_dir(out, overwrite=True) as tmp:
        tensors = {}
        for name, (a, b, bias) in patch.items():
            tensors[f"unet.{name}.lora_A.weight"] = a.contiguous()
            tensors[f"unet.{name}.lora_B.weight"] = b.reshape(*b.shape, *[1] * (a.dim() - 2)).contiguous()
            if any_bias:
                zero = torch.zeros(b.shape[0], dtype=b.dtype)
                tensors[f"unet.{name}.lora_B.bias"] = (zero if bias is None else bias).contiguous()
        save_file(tensors, str(tmp / LORA_FILE))
    return {"path": str(out), "file": LORA_FILE, "rank": max(p[0].shape[0] for p in patch.values())}
