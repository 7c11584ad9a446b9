"""UNet sites, activation recording across timesteps, and SAeUron's feature edit as a hook.

A site is a diffusers module path of a cross-attention transformer block (``up_blocks.0.attentions.1``);
its output ``(B, C, H, W)`` is read as ``B*H*W`` vectors of width C - one per spatial position - at
every denoising step, as SAeUron reads SD-1.4's ``up_blocks.1.attentions.1``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from sauce_export.errors import InputError
from sauce_export.sae.model import SAE


def site_module(unet: nn.Module, site: str, where: str = "recipe") -> nn.Module:
    """The cross-attention block at ``site``; InputError naming the sites that exist otherwise."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    blocks = [n for n, m in unet.named_modules() if isinstance(m, Transformer2DModel)]
    if site not in blocks:
        raise InputError(
            where, "site", f"{site!r} is not a cross-attention block (sites: {', '.join(blocks)})"
        )
    return unet.get_submodule(site)


def site_width(unet: nn.Module, site: str, where: str = "recipe") -> int:
    return int(site_module(unet, site, where).config.in_channels)


def to_positions(h: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C)."""
    return h.flatten(2).transpose(1, 2)


def from_positions(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).reshape(like.shape)


def _replace_output(output: object, h: torch.Tensor) -> object:
    if isinstance(output, tuple):
        return (h, *output[1:])
    output.sample = h  # type: ignore[attr-defined]
    return output


def _sample_of(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.sample  # type: ignore[attr-defined,index]


@contextmanager
def recording(unet: nn.Module, site: str) -> Iterator[list[torch.Tensor]]:
    """Every forward output of the site, (B, H*W, C) each, in call order (one per denoising step)."""
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, _i: object, output: object) -> None:
        seen.append(to_positions(_sample_of(output)).detach())

    handle = site_module(unet, site).register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@dataclass
class FeatureEdit:
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

    @contextmanager
    def applied(self, unet: nn.Module, site: str) -> Iterator[None]:
        def hook(_m: nn.Module, _i: object, output: object) -> object:
            h = _sample_of(output)
            x = to_positions(h)
            return _replace_output(output, h + from_positions(self.delta(x), h))

        handle = site_module(unet, site).register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()
