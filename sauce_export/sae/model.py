"""Sparse autoencoders behind one interface: ``encode(x) -> f``, ``decode(f) -> x_hat``.

All kinds share the parameter layout ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
``W_dec [d_sae, d_in]`` (unit-norm rows), ``b_dec [d_in]``, so selection, the reference edit and
the folds never ask which kind they hold. Encoding is ``act((x - b_dec) @ W_enc + b_enc)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import nn

SaeKind = Literal["topk", "relu", "jumprelu"]


@dataclass
class SaeConfig:
    """What an SAE is and where it reads; saved as ``cfg.json`` next to the weights."""

    d_in: int
    d_sae: int
    kind: SaeKind = "topk"
    k: int = 32
    """Active latents per token (topk only)."""
    site: str = ""
    """Hookpoint it was trained on, e.g. ``language_model.layers.2`` (see architectures.resolve_site)."""
    model: str = ""
    """Model it was trained on (path or Hub id), for mismatch errors."""
    extra: dict[str, object] = field(default_factory=dict)
    """Provenance from foreign formats (SAELens/sparsify config), kept for the model card."""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class SAE(nn.Module):
    """TopK, ReLU or JumpReLU sparse autoencoder."""

    def __init__(self, cfg: SaeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_in))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        # JumpReLU's per-latent threshold; zeros (plain ReLU gate) for the other kinds.
        self.threshold = nn.Parameter(torch.zeros(cfg.d_sae), requires_grad=cfg.kind == "jumprelu")
        self.reset_parameters()

    def reset_parameters(self, seed: int | None = None) -> None:
        """Decoder rows random unit vectors, encoder its transpose (the usual tied init)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        w = torch.randn(self.cfg.d_sae, self.cfg.d_in, generator=gen)
        w = w / w.norm(dim=1, keepdim=True)
        with torch.no_grad():
            self.W_dec.copy_(w)
            self.W_enc.copy_(w.T)
            self.b_enc.zero_()
            self.b_dec.zero_()

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc.dtype)
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """Dense latent activations ``f`` from pre-activations."""
        if self.cfg.kind == "topk":
            vals, idx = pre.topk(self.cfg.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        if self.cfg.kind == "jumprelu":
            return pre * (pre > self.threshold)
        return pre.relu()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_acts(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Unit-norm decoder rows (the scale moves into the encoder, so the function is unchanged)."""
        norms = self.W_dec.norm(dim=1).clamp_min(1e-12)
        self.W_dec.div_(norms[:, None])
        self.W_enc.mul_(norms[None, :])
        self.b_enc.mul_(norms)
        self.threshold.mul_(norms)
