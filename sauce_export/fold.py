"""Folds: turn the hook-based reference edit into plain weight changes (a ``Patch``).

- ``projection`` removes span(W_dec[S]) from every residual writer of layers 0..L (and the token
  embedding / image projector): ``W <- W - Q Q^T W``. Exact as a projection, but a *different* edit
  from the clamp (it acts on every token, also where the latents are off).
- ``lora`` adds ``B A`` to the site layer's writers (``self_attn.o_proj`` and ``mlp.down_proj`` for a
  residual site), with ``B = W_dec[S]^T`` and ``A`` the ridge regression from the modules' inputs to
  the reference's per-token coefficients ``c - f_S`` on a balanced calibration set. ``down_proj``'s
  output is added straight into the site, so a perfect ``A`` there reproduces the hook exactly; KL
  refinement then minimises KL(hooked || folded) on the calibration prompts.
- ``gated`` appends one SiLU-gated neuron per selected latent to the site layer's MLP: its gate reads
  the latent's (least-squares estimated) pre-activation, so it is off where the latent is off - which
  a linear patch cannot be - and its down column is the latent's decoder direction. Every other
  layer gets the same number of all-zero neurons, so ``intermediate_size`` stays uniform and the
  checkpoint loads in stock runtimes; zero neurons add exactly nothing. Then KL refinement.

Tied embeddings (Llama-3.2-1B, Qwen2-0.5B: one matrix is both the input embedding and ``lm_head``,
and only the embedding is on disk): ``projection`` refuses ``include_embed`` (projecting the
embedding would also edit the output vocabulary); ``lora`` and ``gated`` write only the site
layer's Linear writers, never the embedding or ``lm_head``, so the export keeps the one shared
matrix byte-identical and writes no ``lm_head.weight``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

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
from sauce_export.patch import Growth, Patch, WeightDelta
from sauce_export.progress import track
from sauce_export.sites import parse_site


@dataclass
class FoldConfig:
    """How the reference edit becomes weights."""

    method: Literal["projection", "lora", "gated"] = field(
        default="lora",
        metadata={
            "help": "gated (new MLP neurons that fire with the latents), lora (fitted low-rank patch) or "
            "projection (abliteration-style)."
        },
    )
    modules: list[str] = field(
        default_factory=list,
        metadata={
            "help": "lora: writer modules (suffixes of the site layer, e.g. mlp.down_proj); default: the "
            "layer's writers up to the site (o_proj and down_proj for a residual site)."
        },
    )
    first_layer: int = field(
        default=0, metadata={"min": 0, "help": "projection: first layer whose writers are projected."}
    )
    include_embed: bool = field(
        default=True,
        metadata={"help": "projection: also project the token embedding and the image projector."},
    )
    calib_rows: int = field(
        default=2048, metadata={"min": 2, "help": "Calibration rows (half concept, half the rest)."}
    )
    ridge: float = field(
        default=1e-3, metadata={"min": 0, "help": "lora: ridge strength, relative to mean input power."}
    )
    refine_steps: int = field(
        default=300,
        metadata={
            "min": 0,
            "help": "lora/gated: Adam steps minimising KL(hooked || folded) (0: closed form only).",
        },
    )
    refine_lr: float = field(
        default=1e-2,
        metadata={"above": 0, "help": "lora/gated: refinement step size, relative to each tensor's RMS."},
    )
    pad_multiple: int = field(
        default=32,
        metadata={
            "min": 1,
            "help": "gated: round the new intermediate_size up to a multiple of this with zero neurons "
            "(GGUF quantisation blocks need 32).",
        },
    )
    batch_size: int = field(
        default=32, metadata={"min": 1, "help": "Rows per forward pass while calibrating."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the calibration sample."})


def calibration_rows(rows: Sequence[Row], concepts: Sequence[Concept], n: int, seed: int) -> list[Row]:
    """Half rows that show a removed concept, half that do not: the fit must also learn to stay off."""
    rng = random.Random(seed)
    pos = [r for r in rows if any(c.matches(r) for c in concepts)]
    neg = [r for r in rows if not any(c.matches(r) for c in concepts)]
    if not pos:
        raise InputError("fold", "concepts", "no calibration rows show any removed concept")
    half = min(n // 2, len(pos), len(neg)) or min(n, len(pos))
    # Each concept gets an equal share of the positives, and within it the rows that ask about the
    # concept itself come first: the answer the edit must change is where the fit matters most.
    chosen: dict[str, Row] = {}
    for concept in concepts:
        mine = [r for r in pos if concept.matches(r)]
        asks = [r for r in mine if concept.asked_by(r)]
        others = [r for r in mine if not concept.asked_by(r)]
        share = half // len(concepts)
        picked = rng.sample(asks, min(share // 2, len(asks)))
        picked += rng.sample(others, min(share - len(picked), len(others)))
        chosen.update((r.id, r) for r in picked)
    return list(chosen.values()) + rng.sample(neg, min(len(chosen), len(neg)))


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


def writers_for_site(model: nn.Module, site: str) -> list[str]:
    """The site layer's writers up to the site: attention site -> o_proj; MLP site -> down_proj;
    residual site -> both (down_proj's output is added straight into the site, so a fit there is
    exact; o_proj gives the fit the attention's view, which measured closer on the demo)."""
    parsed = parse_site(site)
    spec = spec_for(model)
    layer = f"{spec.layers}.{parsed.layer}"
    o_proj = site_module_name(model, f"layers.{parsed.layer}.attn") + ".o_proj"
    down = f"{layer}.{spec.mlp}.down_proj"
    return {"attn": [o_proj], "mlp": [down]}.get(parsed.kind, [o_proj, down])


@torch.no_grad()
def capture(
    lm: LoadedModel, rows: Sequence[Row], modules: Sequence[str], site: str, batch_size: int, progress: bool
) -> Iterator[tuple[Batch, torch.Tensor, dict[str, torch.Tensor], torch.Tensor]]:
    """Per batch: (batch, kept-token mask, each module's input [B,T,in], the site output [B,T,d])."""
    model, device = lm.model, lm.device  # under a device_map a layer may sit on another GPU
    seen: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda _m, args, name=name: seen.__setitem__(name, args[0].detach().to(device))
        )
        for name in modules
    ]
    site_module = model.get_submodule(site_module_name(model, site))
    handles.append(
        site_module.register_forward_hook(
            lambda _m, _a, out: seen.__setitem__("@site", hidden_of(out).detach().to(device))
        )
    )
    try:
        total = (len(rows) + batch_size - 1) // batch_size
        for batch in track(batches(lm, rows, batch_size), "calibrate", progress, total):
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
    eye = torch.eye(xtx.shape[0], dtype=xtx.dtype, device=xtx.device)
    return torch.linalg.solve(xtx.double() + lam * eye.double(), xtc.double()).T.float()


class Ridge:
    """Ridge regression from inputs x [N, n] to targets c [N, k], streamed batch by batch.

    Holds the rows themselves while there are fewer than n of them and solves the N x N dual
    then; X^T X and X^T C once they outnumber n. Memory is min(N, n) x n floats: a 1B model's
    writers read n = 10240 inputs (X^T X alone: 420 MB, its float64 solve 2 GB more), while a
    fold calibrates on a few thousand tokens.
    """

    def __init__(self, ridge: float) -> None:
        self.ridge, self.tokens = ridge, 0
        self.xs: list[torch.Tensor] = []
        self.cs: list[torch.Tensor] = []
        self.xtx: torch.Tensor | None = None
        self.xtc: torch.Tensor | None = None

    def add(self, x: torch.Tensor, c: torch.Tensor) -> None:
        self.tokens += x.shape[0]
        if self.xtx is None and self.tokens < x.shape[1]:
            self.xs.append(x)
            self.cs.append(c)
            return
        if self.xtx is None or self.xtc is None:  # switch to the sufficient statistics
            x, c = torch.cat([*self.xs, x]), torch.cat([*self.cs, c])
            self.xs, self.cs = [], []
            self.xtx, self.xtc = x.T @ x, x.T @ c
        else:
            self.xtx += x.T @ x
            self.xtc += x.T @ c

    def solve(self) -> torch.Tensor:
        """``A`` [k, n], as ``ridge_solve`` (the same ``lam``), in float64."""
        if self.xtx is not None and self.xtc is not None:
            return ridge_solve(self.xtx, self.xtc, self.ridge)
        x, c = torch.cat(self.xs).double(), torch.cat(self.cs).double()
        # (X^T X + lam I)^-1 X^T C = X^T (X X^T + lam I)^-1 C; mean diag of X^T X = |X|^2 / n.
        gram = x @ x.T
        gram.diagonal().add_(self.ridge * float(x.pow(2).sum()) / x.shape[1])
        return (x.T @ torch.linalg.solve(gram, c)).T.float()


TIED_EMBEDDINGS = (
    "the input embedding is tied to lm_head; projecting it would also edit the output "
    "vocabulary. Set fold.include_embed: false (or untie the checkpoint first)"
)


def projection_fold(model: nn.Module, edit: Edit, cfg: FoldConfig) -> Patch:
    """``W <- (I - Q Q^T) W`` on the writers of layers first_layer..L (+ embeddings, image projector)."""
    layer = parse_site(edit.site).layer
    if cfg.include_embed and tied_embeddings(model):
        raise InputError("fold", "include_embed", TIED_EMBEDDINGS)
    q, _ = torch.linalg.qr(edit.sae.W_dec[list(edit.features)].detach().float().T)  # [d, k]
    writers = residual_writers(
        model,
        range(cfg.first_layer, layer + 1),
        include_embed=cfg.include_embed,
        include_extra=cfg.include_embed,
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
        {
            "method": "projection",
            "layers": [cfg.first_layer, layer],
            "rank": q.shape[1],
            "modules": list(writers),
        },
    )


def lora_fold(
    lm: LoadedModel, edit: Edit, rows: Sequence[Row], cfg: FoldConfig, progress: bool = True
) -> Patch:
    """Ridge regression from the writer's input to the reference coefficients, then optional KL refinement."""
    model = lm.model
    layer_prefix = site_module_name(model, f"layers.{parse_site(edit.site).layer}")
    modules = [f"{layer_prefix}.{m}" for m in cfg.modules] or writers_for_site(model, edit.site)
    for name in modules:
        if not isinstance(model.get_submodule(name), nn.Linear):
            raise InputError("fold", "modules", f"{name} is not a Linear writer")
    fit = Ridge(cfg.ridge)
    for batch, keep, inputs, site_h in capture(lm, rows, modules, edit.site, cfg.batch_size, progress):
        # float32 statistics whatever the model's dtype: X^T X of bf16 inputs would lose the fit.
        x = torch.cat([inputs[m][keep].float() for m in modules], dim=-1)  # [N, sum(in)]
        mask = edit_mask(edit, batch.inputs["input_ids"])
        fit.add(x, edit.coefficients(site_h, mask)[keep].float())  # coefficients [N, k]
    if fit.tokens == 0:
        raise InputError("fold", "calib_rows", "no calibration tokens")
    tokens = fit.tokens
    a_all = fit.solve()  # [k, sum(in)]
    b = edit.sae.W_dec[list(edit.features)].detach().float().T.contiguous()  # [d, k]
    widths = [model.get_submodule(m).in_features for m in modules]
    a_parts = torch.split(a_all, widths, dim=1)
    deltas = [WeightDelta(m, b.clone(), a.contiguous()) for m, a in zip(modules, a_parts, strict=True)]
    # Each module gets B A_m; their outputs add into the same residual, so the sum is B A x.
    patch = Patch(
        tuple(deltas),
        {
            "method": "lora",
            "modules": modules,
            "rank": b.shape[1],
            "calib_tokens": tokens,
            "ridge": cfg.ridge,
        },
    )
    if cfg.refine_steps > 0:
        parts = {
            d.module: ([nn.Parameter(d.B.clone()), nn.Parameter(d.A.clone())], _lowrank_add) for d in deltas
        }
        refined = kl_refine(lm, edit, rows, cfg, parts, progress)
        deltas = [WeightDelta(m, b.detach().clone(), a.detach().clone()) for m, ((b, a), _) in parts.items()]
        patch = Patch(
            tuple(deltas), {**patch.description, "refine_steps": cfg.refine_steps, "refine": refined}
        )
    return patch


AddFn = Callable[[torch.Tensor, Sequence[nn.Parameter]], torch.Tensor]


def kl_refine(
    lm: LoadedModel,
    edit: Edit,
    rows: Sequence[Row],
    cfg: FoldConfig,
    parts: dict[str, tuple[list[nn.Parameter], AddFn]],
    progress: bool,
) -> dict[str, float]:
    """Adam steps (in place) on each module's parameters, whose ``add(x, params)`` is added to that
    module's output, minimising KL(hooked || model) on the kept tokens of ``rows``.

    Step sizes are relative (``refine_lr`` x each tensor's RMS), since a gate's read and its
    near-constant up vector differ in scale by orders of magnitude. A fifth of the rows is held out;
    if refinement does not lower KL there, the closed-form parameters are kept.
    """
    model = lm.model
    state = {"on": False}  # the reference forward runs without the additions

    def hook_for(params: list[nn.Parameter], add: AddFn):  # type: ignore[no-untyped-def]
        # The parameters and their addition stay float32; only the sum takes the model's dtype.
        return lambda _m, args, out: out + add(args[0].float(), params).to(out.dtype) if state["on"] else None

    params = [p for ps, _ in parts.values() for p in ps]
    initial = [p.detach().clone() for p in params]
    optim = torch.optim.Adam(
        [{"params": [p], "lr": cfg.refine_lr * float(p.detach().pow(2).mean().sqrt())} for p in params]
    )
    encoded = list(batches(lm, rows, max(1, cfg.batch_size // 2)))
    random.Random(cfg.seed).shuffle(encoded)
    held = encoded[: max(1, len(encoded) // 5)]
    train = encoded[len(held) :] or held
    rng = random.Random(cfg.seed)

    def kl(batch: Batch) -> torch.Tensor:
        keep = token_mask(batch, lm.tokenizer.bos_token_id)
        state["on"] = False
        with torch.no_grad(), edit.apply(model):
            ref = torch.log_softmax(model(**batch.inputs).logits[keep].float(), -1)
        state["on"] = True
        logp = torch.log_softmax(model(**batch.inputs).logits[keep].float(), -1)
        return (ref.exp() * (ref - logp)).sum(-1).mean()

    def held_kl() -> float:
        with torch.no_grad():
            return sum(float(kl(b)) for b in held) / len(held)

    hooks = [model.get_submodule(n).register_forward_hook(hook_for(*part)) for n, part in parts.items()]
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        before = held_kl()
        for _ in track(range(cfg.refine_steps), "refine fold", progress):
            loss = kl(rng.choice(train))
            optim.zero_grad()
            loss.backward()
            optim.step()
        after = held_kl()
        if after > before:
            with torch.no_grad():
                for p, init in zip(params, initial, strict=True):
                    p.copy_(init)
    finally:
        for handle in hooks:
            handle.remove()
        for p, requires in frozen:
            p.requires_grad_(requires)
    return {
        "held_out_kl_before": round(before, 6),
        "held_out_kl_after": round(after, 6),
        "kept": after <= before,
    }


def _lowrank_add(x: torch.Tensor, params: Sequence[nn.Parameter]) -> torch.Tensor:
    b, a = params
    return (x @ a.T) @ b.T


def _neurons_add(x: torch.Tensor, params: Sequence[nn.Parameter]) -> torch.Tensor:
    gate, up, down = params
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


def gated_fold(
    lm: LoadedModel, edit: Edit, rows: Sequence[Row], cfg: FoldConfig, progress: bool = True
) -> Patch:
    """One new neuron per latent in the site layer's MLP: ``silu(g.x) * (u.x)`` with ``g.x`` the
    least-squares estimate of the latent's pre-activation (sharpened so silu acts like relu) and
    ``u.x`` ~ 1 (the normalised input has a near-constant direction), writing ``scale * W_dec[i]``."""
    model, spec = lm.model, spec_for(lm.model)
    text_cfg = getattr(model.config, "text_config", model.config)
    if getattr(text_cfg, "hidden_act", "silu") != "silu":
        raise InputError("fold", "method", f"gated needs a SiLU MLP, this model uses {text_cfg.hidden_act}")
    if edit.multiplier is None and any(edit.clamps):
        raise InputError(
            "fold", "method", "gated folds clamp 0 or a multiplier; use lora for a negative clamp"
        )
    site = parse_site(edit.site)
    mlp = f"{spec.layers}.{site.layer}.{spec.mlp}"
    feats = list(edit.features)
    xtx = xtp = xt1 = None
    tokens = 0
    for _batch, keep, inputs, site_h in capture(lm, rows, [mlp], edit.site, cfg.batch_size, progress):
        x = inputs[mlp][keep].float()
        pre = edit.sae.pre_acts(site_h[keep].to(edit.sae.W_dec.dtype)).float()[:, feats]
        ones = x.new_ones(x.shape[0], 1)
        xtx = x.T @ x if xtx is None else xtx + x.T @ x
        xtp = x.T @ pre if xtp is None else xtp + x.T @ pre
        xt1 = x.T @ ones if xt1 is None else xt1 + x.T @ ones
        tokens += x.shape[0]
    if xtx is None or xtp is None or xt1 is None:
        raise InputError("fold", "calib_rows", "no calibration tokens")
    read = ridge_solve(xtx, xtp, cfg.ridge)  # [k, d]: x -> latent pre-activation
    const = ridge_solve(xtx, xt1, cfg.ridge)  # [1, d]: x -> 1
    # Sharpen: silu(a z) / a -> relu(z) as a grows; a = 4 / (rms of the estimated pre-activation).
    rms = (torch.einsum("kd,de,ke->k", read, xtx, read) / tokens).clamp_min(1e-12).sqrt()
    sharp = 4.0 / rms
    scale = -1.0 if edit.multiplier is None else edit.multiplier - 1.0
    params = [
        nn.Parameter(read * sharp[:, None]),
        nn.Parameter(const.repeat(len(feats), 1) / sharp[:, None]),
        nn.Parameter(scale * edit.sae.W_dec[feats].detach().float().T.contiguous()),
    ]
    refined = (
        kl_refine(lm, edit, rows, cfg, {mlp: (params, _neurons_add)}, progress) if cfg.refine_steps else {}
    )
    width = int(text_cfg.intermediate_size)
    new_width = -(-(width + len(feats)) // max(cfg.pad_multiple, 1)) * max(cfg.pad_multiple, 1)
    pad = new_width - width - len(feats)
    gate, up, down = (p.detach() for p in params)
    gate, up = (torch.cat([t, t.new_zeros(pad, t.shape[1])]) for t in (gate, up))
    down = torch.cat([down, down.new_zeros(down.shape[0], pad)], dim=1)
    grows = []
    for layer in range(len(model.get_submodule(spec.layers))):
        here = layer == site.layer
        prefix = f"{spec.layers}.{layer}.{spec.mlp}"
        grows += [
            Growth(f"{prefix}.gate_proj", 0, gate if here else torch.zeros_like(gate)),
            Growth(f"{prefix}.up_proj", 0, up if here else torch.zeros_like(up)),
            Growth(f"{prefix}.down_proj", 1, down if here else torch.zeros_like(down)),
        ]
    key = "text_config.intermediate_size" if text_cfg is not model.config else "intermediate_size"
    return Patch(
        (),
        {
            "method": "gated",
            "layer": site.layer,
            "neurons": len(feats),
            "intermediate_size": [width, new_width],
            "refine_steps": cfg.refine_steps,
            "refine": refined,
        },
        tuple(grows),
        {key: new_width},
    )


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
        make = gated_fold if cfg.method == "gated" else lora_fold
        patch = make(lm, edit, calib, cfg, progress)
    patch.check(lm.model, where="fold")
    return patch
