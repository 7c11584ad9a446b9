"""UNet sites, activation recording across timesteps, and SAeUron's feature edit as a hook.

A site is a diffusers module path of a cross-attention transformer block (``up_blocks.0.attentions.1``)
or of a linear writer inside one (``down_blocks.1.attentions.0.proj_out``); its output ``(B, C, H, W)``
is read as ``B*H*W`` vectors of width C - one per spatial position - at every denoising step, as
SAeUron reads SD-1.4's ``up_blocks.1.attentions.1``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from sauce_export.errors import InputError
from sauce_export.sae.model import SAE


def _blocks(unet: nn.Module) -> list[str]:
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    return [n for n, m in unet.named_modules() if isinstance(m, Transformer2DModel)]


def block_of(unet: nn.Module, site: str, where: str = "recipe") -> tuple[str, nn.Module]:
    """(path, module) of the cross-attention block that is, or holds, ``site``."""
    for name in _blocks(unet):
        if site == name or site.startswith(name + "."):
            return name, unet.get_submodule(name)
    raise InputError(
        where,
        "site",
        f"{site!r} is not a cross-attention block or inside one (sites: {', '.join(_blocks(unet))})",
    )


def site_module(unet: nn.Module, site: str, where: str = "recipe") -> nn.Module:
    """The module at ``site``: a cross-attention block, or a Linear / conv writer inside one (e.g.
    the block's ``proj_out``, what the block adds to its residual); InputError naming the blocks."""
    name, block = block_of(unet, site, where)
    if site == name:
        return block
    try:
        module = unet.get_submodule(site)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear | nn.Conv2d):
        raise InputError(where, "site", f"{site!r} is not a Linear or conv module inside {name}")
    return module


def site_width(unet: nn.Module, site: str, where: str = "recipe") -> int:
    module = site_module(unet, site, where)
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    return int(module.config.in_channels)  # type: ignore[union-attr]


def to_positions(h: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C); a Linear's (B, L, C) already is."""
    return h if h.dim() == 3 else h.flatten(2).transpose(1, 2)


def from_positions(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x if like.dim() == 3 else x.transpose(1, 2).reshape(like.shape)


def _replace_output(output: object, h: torch.Tensor) -> object:
    if isinstance(output, torch.Tensor):
        return h
    if isinstance(output, tuple):
        return (h, *output[1:])
    output.sample = h  # type: ignore[attr-defined]
    return output


def sample_of(output: object) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    return output[0] if isinstance(output, tuple) else output.sample  # type: ignore[attr-defined,index]


@contextmanager
def recording(unet: nn.Module, site: str) -> Iterator[list[torch.Tensor]]:
    """Every forward output of the site, (B, H*W, C) each, in call order (one per denoising step)."""
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, _i: object, output: object) -> None:
        seen.append(to_positions(sample_of(output)).detach())

    handle = site_module(unet, site).register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


class SiteEdit:
    """An edit of the site's output: ``delta(x)`` added to every position vector, at every
    denoising step and both halves of the CFG batch."""

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @contextmanager
    def applied(self, unet: nn.Module, site: str) -> Iterator[None]:
        def hook(_m: nn.Module, _i: object, output: object) -> object:
            h = sample_of(output)
            x = to_positions(h)
            return _replace_output(output, h + from_positions(self.delta(x), h))

        handle = site_module(unet, site).register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()


@dataclass
class FeatureEdit(SiteEdit):
    """SAeUron's intervention: selected latents scaled by ``multiplier`` (negative) where they exceed
    their mean activation, decoded, and added back to the block output with the SAE's
    reconstruction error kept, so positions where no selected latent fires stay bit-equal."""

    sae: SAE
    features: list[int]
    multipliers: list[float]
    """Per selected latent: its multiplier (several concepts: the union, each its own gamma)."""
    thresholds: list[float]
    """Per selected latent: its mean activation on the concept's training positions (the gate)."""

    @torch.no_grad()
    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The change the edit makes to position vectors ``x`` (..., C)."""
        idx = torch.tensor(self.features, dtype=torch.long)
        f = self.sae.encode(x.float())[..., idx]
        active = f > torch.tensor(self.thresholds, dtype=f.dtype)
        gamma = torch.tensor(self.multipliers, dtype=f.dtype)
        change = torch.where(active, (gamma - 1.0) * f, torch.zeros_like(f))
        return (change @ self.sae.W_dec[idx]).to(x.dtype)


@dataclass
class ProjectEdit(SiteEdit):
    """The selected latents' decoder directions scaled by ``scale`` in the block output, measured
    from ``center`` (the mean output on rows without the concept): ``x + (scale - 1) P (x - center)``
    with P the orthogonal projection on their span. Ungated and affine, so it folds exactly into
    the linear writers that sum to the block output (fold.exact_patch): exported == hooked."""

    basis: torch.Tensor
    """(C, k) orthonormal basis of the selected latents' decoder directions."""
    scale: float
    center: torch.Tensor
    """(C,) the point the scaling is measured from."""

    @classmethod
    def of(cls, directions: torch.Tensor, scale: float, center: torch.Tensor) -> ProjectEdit:
        """From decoder rows ``directions`` (k, C)."""
        basis, _ = torch.linalg.qr(directions.detach().double().T)
        return cls(basis.float(), scale, center.detach().float())

    @torch.no_grad()
    def delta(self, x: torch.Tensor) -> torch.Tensor:
        u = self.basis.to(x.dtype)
        return (self.scale - 1.0) * ((x - self.center.to(x.dtype)) @ u) @ u.T
