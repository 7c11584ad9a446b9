"""Folds: turn the hook-based reference edit into plain weight changes (a ``Patch``).

- ``projection`` removes span(W_dec[S]) from every residual writer of layers 0..L (and the token
  embedding / image projector): ``W <- W - Q Q^T W``. Exact as a projection, but a *different* edit
  from the clamp (it acts on every token, also where the latents are off).
- ``lora`` adds ``B A`` to the writer that produces the site (``mlp.down_proj`` for a residual or MLP
  site, ``self_attn.o_proj`` for an attention site), with ``B = W_dec[S]^T`` and ``A`` the ridge
  regression from the module's input to the reference's per-token coefficients ``c - f_S`` on a
  balanced calibration set. Because that writer's output is added straight into the site, a perfect
  ``A`` reproduces the hook exactly; optional refinement then minimises KL(hooked || folded).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from tqdm import tqdm

from sauce_export.architectures import (
    residual_writers,
    site_module_name,
    spec_for,
    tied_embeddings,
)
from sauce_export.data import Concept, Row
from sauce_export.edit import Edit
from sauce_export.errors import InputError
from sauce_export.hooks import hidden_of
from sauce_export.lm import Batch, LoadedModel, batches
from sauce_export.patch import Patch, WeightDelta
from sauce_export.sites import parse_site


@dataclass
class FoldConfig:
    """How the reference edit becomes weights."""

    method: Literal["projection", "lora"] = field(
        default="lora", metadata={"help": "projection (abliteration-style) or lora (fitted low-rank patch)."}
    )
    modules: list[str] = field(
        default_factory=list,
        metadata={
            "help": "lora: writer modules (suffixes of the site layer, e.g. mlp.down_proj); "
            "default: the writer whose output is the site."
        },
    )
    first_layer: int = field(default=0, metadata={"help": "projection: first layer whose writers are projected."})
    include_embed: bool = field(
        default=True,
        metadata={"help": "projection: also project the token embedding and the image projector."},
    )
    calib_rows: int = field(default=512, metadata={"help": "Calibration rows (half concept, half the rest)."})
    ridge: float = field(default=1e-3, metadata={"help": "lora: ridge strength, relative to mean input power."})
    refine_steps: int = field(default=0, metadata={"help": "lora: Adam steps minimising KL(hooked || folded)."})
    refine_lr: float = field(default=1e-3, metadata={"help": "lora: refinement learning rate."})
    batch_size: int = field(default=32, metadata={"help": "Rows per forward pass while calibrating."})
    seed: int = field(default=0, metadata={"help": "Seed of the calibration sample."})


def calibration_rows(rows: Sequence[Row], concepts: Sequence[Concept], n: int, seed: int) -> list[Row]:
    """Half rows that show a removed concept, half that do not: the fit must also learn to stay off."""
    rng = random.Random(seed)
    pos = [r for r in rows if any(c.matches(r) for c in concepts)]
    neg = [r for r in rows if not any(c.matches(r) for c in concepts)]
    if not pos:
        raise InputError("fold", "concepts", "no calibration rows show any removed concept")
    half = min(n // 2, len(pos), len(neg)) or min(n, len(pos))
    return rng.sample(pos, half) + rng.sample(neg, min(half, len(neg)))


def token_mask(batch: Batch, bos_token_id: int | None) -> torch.Tensor:
    """[B, T] tokens a fold is fitted and judged on: real (not padding) and not BOS.

    The SAE never saw BOS (collection skips it), so its latents there are noise.
    """
    ids = batch.inputs["input_ids"]
    keep = batch.inputs["attention_mask"].bool().clone()
    if bos_token_id is not None:
        keep[:, 0] &= ids[:, 0] != bos_token_id
    return keep


def edit_mask(edit: Edit, ids: torch.Tensor) -> torch.Tensor | None:
    """The edit's own token scope as a mask (None: every token), as ``EditHandle`` computes it."""
    if edit.scope == "all":
        return None
    is_image = ids == edit.image_token_id
    return is_image if edit.scope == "image" else ~is_image


def writer_for_site(model: nn.Module, site: str) -> str:
    """The module whose output is added straight into the site: folding there is exact."""
    parsed = parse_site(site)
    if parsed.kind == "attn":
        return site_module_name(model, site) + ".o_proj"
    return f"{spec_for(model).layers}.{parsed.layer}.{spec_for(model).mlp}.down_proj"


@torch.no_grad()
def capture(
    lm: LoadedModel, rows: Sequence[Row], modules: Sequence[str], site: str, batch_size: int, progress: bool
) -> Iterator[tuple[Batch, torch.Tensor, dict[str, torch.Tensor], torch.Tensor]]:
    """Per batch: (batch, kept-token mask, each module's input [B,T,in], the site output [B,T,d])."""
    model = lm.model
    seen: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda _m, args, name=name: seen.__setitem__(name, args[0].detach())
        )
        for name in modules
    ]
    site_module = model.get_submodule(site_module_name(model, site))
    handles.append(
        site_module.register_forward_hook(lambda _m, _a, out: seen.__setitem__("@site", hidden_of(out).detach()))
    )
    try:
        total = (len(rows) + batch_size - 1) // batch_size
        for batch in tqdm(batches(lm, rows, batch_size), total=total, desc="calibrate", disable=not progress):
            seen.clear()
            model(**batch.inputs)
            keep = token_mask(batch, lm.tokenizer.bos_token_id)
            yield batch, keep, {m: seen[m] for m in modules}, seen["@site"]
    finally:
        for handle in handles:
            handle.remove()


def ridge_solve(xtx: torch.Tensor, xtc: torch.Tensor, ridge: float) -> torch.Tensor:
    """``A`` [k, in] minimising ``sum_t |A x_t - c_t|^2 + lam |A|^2`` from the sufficient statistics
    ``X^T X`` and ``X^T C``; ``lam`` is ``ridge`` times the mean input power, so it is scale-free."""
    lam = ridge * float(xtx.diagonal().mean())
    eye = torch.eye(xtx.shape[0], dtype=xtx.dtype)
    return torch.linalg.solve(xtx.double() + lam * eye.double(), xtc.double()).T.float()


def projection_fold(model: nn.Module, edit: Edit, cfg: FoldConfig) -> Patch:
    """``W <- (I - Q Q^T) W`` on the writers of layers first_layer..L (+ embeddings, image projector)."""
    layer = parse_site(edit.site).layer
    if cfg.include_embed and tied_embeddings(model):
        raise InputError(
            "fold",
            "include_embed",
            "the input embedding is tied to lm_head; projecting it would also edit the output "
            "vocabulary. Set fold.include_embed: false (or untie the checkpoint first)",
        )
    q, _ = torch.linalg.qr(edit.sae.W_dec[list(edit.features)].detach().float().T)  # [d, k]
    writers = residual_writers(
        model, range(cfg.first_layer, layer + 1), include_embed=cfg.include_embed, include_extra=cfg.include_embed
    )
    deltas = []
    for name, module in writers.items():
        w = module.weight.detach().float()
        if isinstance(module, nn.Embedding):  # [vocab, d]: rows live in the residual space
            deltas.append(WeightDelta(name, -(w @ q), q.T.contiguous()))
            continue
        bias = getattr(module, "bias", None)
        bias_delta = None if bias is None else -(q @ (q.T @ bias.detach().float()))
        deltas.append(WeightDelta(name, -q, (q.T @ w).contiguous(), bias_delta))
    return Patch(
        tuple(deltas),
        {"method": "projection", "layers": [cfg.first_layer, layer], "rank": q.shape[1], "modules": list(writers)},
    )


def lora_fold(
    lm: LoadedModel, edit: Edit, rows: Sequence[Row], cfg: FoldConfig, progress: bool = True
) -> Patch:
    """Ridge regression from the writer's input to the reference coefficients, then optional KL refinement."""
    model = lm.model
    layer_prefix = site_module_name(model, f"layers.{parse_site(edit.site).layer}")
    modules = [f"{layer_prefix}.{m}" for m in cfg.modules] or [writer_for_site(model, edit.site)]
    for name in modules:
        if not isinstance(model.get_submodule(name), nn.Linear):
            raise InputError("fold", "modules", f"{name} is not a Linear writer")
    xtx: torch.Tensor | None = None
    xtc: torch.Tensor | None = None
    tokens = 0
    for batch, keep, inputs, site_h in capture(lm, rows, modules, edit.site, cfg.batch_size, progress):
        x = torch.cat([inputs[m][keep].float() for m in modules], dim=-1)  # [N, sum(in)]
        mask = edit_mask(edit, batch.inputs["input_ids"])
        coeff = edit.coefficients(site_h, mask)[keep].float()  # [N, k]
        xtx = x.T @ x if xtx is None else xtx + x.T @ x
        xtc = x.T @ coeff if xtc is None else xtc + x.T @ coeff
        tokens += x.shape[0]
    if xtx is None or xtc is None:
        raise InputError("fold", "calib_rows", "no calibration tokens")
    a_all = ridge_solve(xtx, xtc, cfg.ridge)  # [k, sum(in)]
    b = edit.sae.W_dec[list(edit.features)].detach().float().T.contiguous()  # [d, k]
    widths = [model.get_submodule(m).in_features for m in modules]
    a_parts = torch.split(a_all, widths, dim=1)
    deltas = [
        WeightDelta(m, b.clone(), a.contiguous()) for m, a in zip(modules, a_parts, strict=True)
    ]
    # Each module gets B A_m; their outputs add into the same residual, so the sum is B A x.
    patch = Patch(
        tuple(deltas),
        {"method": "lora", "modules": modules, "rank": b.shape[1], "calib_tokens": tokens, "ridge": cfg.ridge},
    )
    if cfg.refine_steps > 0:
        patch = refine(lm, edit, patch, rows, cfg, progress)
    return patch


def refine(
    lm: LoadedModel, edit: Edit, patch: Patch, rows: Sequence[Row], cfg: FoldConfig, progress: bool
) -> Patch:
    """A few Adam steps on (B, A) of every delta minimising KL(hooked || folded) on kept tokens."""
    model = lm.model
    params = {d.module: (nn.Parameter(d.B.clone()), nn.Parameter(d.A.clone())) for d in patch.deltas}
    state = {"on": False}  # the reference forward runs with the patch off

    def add_lowrank(b: torch.Tensor, a: torch.Tensor):  # type: ignore[no-untyped-def]
        return lambda _m, args, out: out + (args[0] @ a.T) @ b.T if state["on"] else None

    hooks = [model.get_submodule(n).register_forward_hook(add_lowrank(b, a)) for n, (b, a) in params.items()]
    optim = torch.optim.Adam([p for pair in params.values() for p in pair], lr=cfg.refine_lr)
    encoded = list(batches(lm, rows, max(1, cfg.batch_size // 2)))
    rng = random.Random(cfg.seed)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        for _ in tqdm(range(cfg.refine_steps), desc="refine fold", disable=not progress):
            batch = rng.choice(encoded)
            keep = token_mask(batch, lm.tokenizer.bos_token_id)
            state["on"] = False
            with torch.no_grad(), edit.apply(model):
                ref = torch.log_softmax(model(**batch.inputs).logits[keep].float(), -1)
            state["on"] = True
            logp = torch.log_softmax(model(**batch.inputs).logits[keep].float(), -1)
            loss = (ref.exp() * (ref - logp)).sum(-1).mean()
            optim.zero_grad()
            loss.backward()
            optim.step()
    finally:
        for handle in hooks:
            handle.remove()
        for p, requires in frozen:
            p.requires_grad_(requires)
    deltas = tuple(WeightDelta(n, b.detach().clone(), a.detach().clone()) for n, (b, a) in params.items())
    return Patch(deltas, {**patch.description, "refine_steps": cfg.refine_steps, "refine_lr": cfg.refine_lr})


def fold(
    lm: LoadedModel,
    edit: Edit,
    rows: Sequence[Row],
    concepts: Sequence[Concept],
    cfg: FoldConfig,
    progress: bool = True,
) -> Patch:
    """Dispatch on ``cfg.method``; the result is always checked against the model (finite, shapes)."""
    if cfg.method == "projection":
        patch = projection_fold(lm.model, edit, cfg)
    else:
        calib = calibration_rows(rows, concepts, cfg.calib_rows, cfg.seed)
        patch = lora_fold(lm, edit, calib, cfg, progress)
    patch.check(lm.model, where="fold")
    return patch
