"""Fold the hooked edit into the UNet: a LoRA patch on linear writers inside the site's block, fitted
to the *hooked* block outputs at every timestep of hooked trajectories; written as a standalone
diffusers pipeline folder (only the UNet's weight file rewritten) and as a diffusers LoRA file.

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

from sauce_export.diffusion.unet import site_module
from sauce_export.errors import InputError
from sauce_export.fsutil import atomic_dir
from sauce_export.progress import bar

Patch = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Full UNet module path -> (A [rank, in], B [out, rank]); the weight becomes ``W + B @ A``."""

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"


@contextmanager
def block_io(unet: nn.Module, site: str) -> Iterator[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """(input hidden states, encoder hidden states, output) of every call of the site's block; hooks
    registered before this context (the edit) have already changed the output it records."""
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    block = site_module(unet, site)

    def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        pending.append((args[0].detach(), kwargs["encoder_hidden_states"].detach()))

    def post(_m: nn.Module, _i: object, output: object) -> None:
        h = output[0] if isinstance(output, tuple) else output.sample  # type: ignore[attr-defined,index]
        seen.append((*pending.pop(), h.detach()))

    handles = [block.register_forward_pre_hook(pre, with_kwargs=True), block.register_forward_hook(post)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


class _Lora(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, gen: torch.Generator) -> None:
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.randn(rank, base.in_features, generator=gen) / base.in_features**0.5)
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.A.T) @ self.B.T


def linear_module(block: nn.Module, rel: str, where: str) -> nn.Linear:
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
    samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    modules: list[str],
    rank: int,
    steps: int,
    lr: float,
    seed: int = 0,
    where: str = "recipe",
    progress: bool = True,
) -> tuple[Patch, dict[str, float]]:
    """Adam on the LoRA factors of ``modules`` (relative to the site) so the block reproduces the
    hooked outputs in ``samples``; returns the patch and the held-out relative error (the share of
    the edit's squared change it misses, and the patched block's change where the edit made none)."""
    gen = torch.Generator().manual_seed(seed)
    block = copy.deepcopy(site_module(unet, site)).float().requires_grad_(False)
    loras = {}
    for rel in modules:
        parent, _, name = rel.rpartition(".")
        lora = _Lora(linear_module(block, rel, where), rank, gen)
        setattr(block.get_submodule(parent) if parent else block, name, lora)
        loras[rel] = lora
    x = torch.cat([s[0] for s in samples])
    e = torch.cat([s[1] for s in samples])
    y = torch.cat([s[2] for s in samples])
    order = torch.randperm(len(x), generator=gen)
    n_val = max(1, len(x) // 10)
    val, train = order[:n_val], order[n_val:]
    with torch.no_grad():
        base_val = block(x[val], encoder_hidden_states=e[val], return_dict=False)[0]
    params = [p for lo in loras.values() for p in (lo.A, lo.B)]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    batch = min(128, len(train))
    with bar(steps, "fit LoRA fold", progress) as counter:
        for step in range(steps):
            idx = train[torch.randint(len(train), (batch,), generator=gen)]
            out = block(x[idx], encoder_hidden_states=e[idx], return_dict=False)[0]
            loss = (out - y[idx]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            counter.update()
            if step % 20 == 0:
                counter.set_postfix(loss=f"{loss.item():.2e}")
    with torch.no_grad():
        out = block(x[val], encoder_hidden_states=e[val], return_dict=False)[0]
        edit = (y[val] - base_val).pow(2).sum(1)  # per position: the edit's squared change
        miss = (out - y[val]).pow(2).sum(1)
        touched = edit > 1e-10
    stats = {
        "missed_share": float(miss[touched].sum() / edit[touched].sum()) if touched.any() else 0.0,
        "leak_rms_untouched": float(miss[~touched].mean().sqrt()) if (~touched).any() else 0.0,
        "edit_rms_touched": float(edit[touched].mean().sqrt()) if touched.any() else 0.0,
        "samples": len(x),
        "touched_share": float(touched.float().mean()),
    }
    patch = {f"{site}.{rel}": (lo.A.detach().clone(), lo.B.detach().clone()) for rel, lo in loras.items()}
    return patch, stats


def merged(unet: nn.Module, patch: Patch) -> nn.Module:
    """A copy of ``unet`` with ``W + B @ A`` in every patched module."""
    out = copy.deepcopy(unet)
    with torch.no_grad():
        for name, (a, b) in patch.items():
            w = out.get_submodule(name).weight
            w.add_((b @ a).to(w.dtype))
    return out


def save_patch(patch: Patch, path: Path, meta: dict[str, object]) -> None:
    tensors = {}
    for name, (a, b) in patch.items():
        tensors[f"{name}.A"], tensors[f"{name}.B"] = a.contiguous(), b.contiguous()
    save_file(tensors, str(path), metadata={"meta": json.dumps(meta)})


def load_patch(path: Path) -> Patch:
    t = load_file(str(path))
    return {k[:-2]: (t[k], t[k[:-2] + ".B"]) for k in t if k.endswith(".A")}


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
        for name, (a, b) in patch.items():
            key = f"{name}.weight"
            if key not in tensors:
                raise InputError(str(src), key, "patched module missing from the UNet's weights")
            w = tensors[key]
            tensors[key] = (w.float() + b @ a).to(w.dtype)
        save_file(tensors, str(tmp / UNET_WEIGHTS), metadata=meta)
    changed = sorted(f"{n}.weight" for n in patch)
    return {"path": str(out), "changed_tensors": changed}


def export_lora(patch: Patch, out: Path) -> dict[str, object]:
    """A diffusers LoRA file (PEFT key layout, ``unet.`` prefix) that stock ``load_lora_weights``
    reads; with no alphas stored, diffusers uses alpha = rank, i.e. scale 1: exactly ``B @ A``."""
    with atomic_dir(out, overwrite=True) as tmp:
        tensors = {}
        for name, (a, b) in patch.items():
            tensors[f"unet.{name}.lora_A.weight"] = a.contiguous()
            tensors[f"unet.{name}.lora_B.weight"] = b.contiguous()
        save_file(tensors, str(tmp / LORA_FILE))
    return {"path": str(out), "file": LORA_FILE, "rank": max(a.shape[0] for a, _ in patch.values())}
