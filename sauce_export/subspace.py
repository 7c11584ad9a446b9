"""Feature-subspace unlearning: a low-rank patch that can only write along the removed concepts'
SAE decoder directions, fitted to the unlearning objective itself instead of to the hooked clamp.

``W += B A`` on the site layer's writer (``mlp.down_proj`` for a residual or MLP site, ``o_proj``
for an attention site). ``B`` is an orthonormal basis of span(W_dec[S]) for the union S of the
concepts' selected latents and stays fixed, so whatever ``A`` learns, the patch adds nothing outside
that span: the edit is still explained by named features. ``A`` starts at zero and is fitted by Adam
on forget rows (train questions about a removed concept, half of them behind an unrelated train
question and answer, so the edit does not depend on the question standing alone) with one of

- ``suppress``: a hinge pushing each answer token's logit ``margin`` below the best other token,
- ``po``: the refusal as the answer (preference optimisation, PEBench's PO),
- ``npo``: negative preference optimisation against the original,

plus ``kl_weight`` x KL(original || patched) at the answer positions of retain rows (every other
train row). The result is an ordinary ``Patch``: stored, exported, reloaded and verified like a fold.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sauce_export.architectures import site_module_name, spec_for
from sauce_export.data import Concept, Row
from sauce_export.errors import InputError
from sauce_export.evaluate.baselines import (
    answer_logits,
    answer_nll,
    forget_retain_rows,
    kl_to_reference,
    npo_loss,
    sequence_logprob,
)
from sauce_export.lm import Batch, LoadedModel, encode_batch
from sauce_export.patch import Patch, WeightDelta
from sauce_export.progress import track
from sauce_export.sae.model import SAE
from sauce_export.select import union_features
from sauce_export.sites import parse_site
from sauce_export.verify import with_context

Objective = Literal["suppress", "po", "npo"]


@dataclass
class SubspaceConfig:
    """``subspace`` section of the recipe: how the subspace patch is fitted (``edit.method: subspace``)."""

    objective: Objective = field(
        default="suppress",
        metadata={
            "help": "Forget-row loss: suppress (answer token's logit below the best other token), po "
            "(the refusal as the answer) or npo (negative preference vs the original)."
        },
    )
    latents: int = field(
        default=8,
        metadata={"min": 1, "help": "Selected latents per concept whose directions span the patch."},
    )
    steps: int = field(default=100, metadata={"min": 1, "help": "Adam steps fitting A."})
    lr: float = field(default=0.03, metadata={"above": 0, "help": "Adam learning rate of A."})
    batch_size: int = field(default=16, metadata={"min": 1, "help": "Forget and retain rows per step."})
    kl_weight: float = field(
        default=10.0, metadata={"min": 0, "help": "Weight of KL(original || patched) on retain rows."}
    )
    margin: float = field(
        default=2.0, metadata={"min": 0, "help": "suppress: logit gap below the best other token."}
    )
    beta: float = field(default=0.1, metadata={"above": 0, "help": "npo: inverse temperature."})
    refusal: str = field(default="I don't know.", metadata={"help": "po: the answer taught on forget rows."})
    context_share: float = field(
        default=0.5,
        metadata={
            "min": 0,
            "max": 1,
            "help": "Share of forget rows shown behind an unrelated train question and answer.",
        },
    )
    pool_batches: int = field(
        default=16, metadata={"min": 1, "help": "Distinct encoded batches cycled through by the steps."}
    )
    module: str | None = field(
        default=None,
        metadata={
            "help": "Writer to patch, relative to the site layer (e.g. mlp.down_proj); default: "
            "mlp.down_proj, or the attention's o_proj for an attention site."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the batches and of the row sample."})


def writer_for_site(model: nn.Module, site: str, module: str | None = None) -> str:
    """The Linear the patch goes on: its output is added into the residual at (or before) the site."""
    parsed = parse_site(site)
    if module:
        name = f"{site_module_name(model, f'layers.{parsed.layer}')}.{module}"
    elif parsed.kind == "attn":
        name = site_module_name(model, f"layers.{parsed.layer}.attn") + ".o_proj"
    else:
        name = f"{spec_for(model).layers}.{parsed.layer}.{spec_for(model).mlp}.down_proj"
    try:
        linear = model.get_submodule(name)
    except AttributeError:
        raise InputError("subspace", "module", f"the model has no module {name}") from None
    if not isinstance(linear, nn.Linear):
        raise InputError("subspace", "module", f"{name} is not a Linear writer")
    return name


def basis(sae: SAE, features: Sequence[int]) -> torch.Tensor:
    """[d, k] orthonormal basis of span(W_dec[features]) (float32): the patch's fixed ``B``."""
    q, _ = torch.linalg.qr(sae.W_dec[list(features)].detach().float().T)
    return q.contiguous()


@dataclass
class Pool:
    """The encoded batches the steps cycle through, with the original model's outputs they need."""

    forget: list[Batch]
    refusal: list[Batch]
    retain: list[Batch]
    retain_logits: list[torch.Tensor]
    forget_logp: list[torch.Tensor]


def training_rows(rows: Sequence[Row], concepts: Sequence[Concept]) -> tuple[list[Row], list[Row]]:
    """(forget, retain) train rows, as the gradient baselines use them; both must be non-empty."""
    forget, retain = forget_retain_rows(rows, concepts)
    if not forget:
        raise InputError("subspace", "concepts", "no train question asks about a removed concept")
    if not retain:
        raise InputError("subspace", "concepts", "no other train rows to keep")
    return forget, retain


@torch.no_grad()
def build_pool(
    lm: LoadedModel, forget: Sequence[Row], retain: Sequence[Row], cfg: SubspaceConfig, progress: bool
) -> Pool:
    """``pool_batches`` seeded batches of forget rows (a ``context_share`` of them behind an unrelated
    retain row) and of retain rows, plus the original's retain logits and forget log-likelihoods."""
    rng = random.Random(cfg.seed)
    n = min(cfg.pool_batches, cfg.steps)
    pool = Pool([], [], [], [], [])
    for i in track(range(n), "subspace data", progress):
        f_rows = rng.sample(list(forget), min(cfg.batch_size, len(forget)))
        cut = round(len(f_rows) * cfg.context_share)
        f_rows = with_context(f_rows[:cut], retain, cfg.seed + i) + f_rows[cut:]
        r_rows = rng.sample(list(retain), min(cfg.batch_size, len(retain)))
        pool.forget.append(encode_batch(lm, f_rows))
        pool.refusal.append(encode_batch(lm, [replace(r, answer=cfg.refusal) for r in f_rows]))
        pool.retain.append(encode_batch(lm, r_rows))
        pool.retain_logits.append(answer_logits(lm.model, pool.retain[-1]).float())
        if cfg.objective == "npo":
            pool.forget_logp.append(sequence_logprob(lm.model, pool.forget[-1]).float())
    return pool


def suppress_loss(logits: torch.Tensor, targets: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean hinge ``max(0, z_answer - max_{other} z + margin)`` over the given positions: zero once
    every answer token is ``margin`` below the best alternative, so it stops pushing there."""
    z = logits.float()
    answer = z.gather(-1, targets[:, None]).squeeze(-1)
    other = z.scatter(-1, targets[:, None], float("-inf")).max(-1).values
    return F.relu(answer - other + margin).mean()


class SubspaceFit:
    """``A`` [k, in] for ``W += B A`` on one writer, hooked into the live model while fitting."""

    def __init__(self, model: nn.Module, module: str, b: torch.Tensor) -> None:
        self.model, self.module = model, module
        linear = model.get_submodule(module)
        self.b = b.to(linear.weight.device)
        self.a = nn.Parameter(torch.zeros(b.shape[1], linear.in_features, device=linear.weight.device))

    @contextmanager
    def active(self) -> Iterator[None]:
        """The patch as a hook (float32 ``B A x`` added to the writer's output), removed on exit."""

        def add(_m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            return out + ((args[0].float() @ self.a.T) @ self.b.T).to(out.dtype)

        handle = self.model.get_submodule(self.module).register_forward_hook(add)
        try:
            yield
        finally:
            handle.remove()

    def patch(self, description: dict[str, Any]) -> Patch:
        delta = WeightDelta(self.module, self.b.detach().cpu().clone(), self.a.detach().cpu().clone())
        return Patch((delta,), description)


def step_loss(fit: SubspaceFit, pool: Pool, i: int, cfg: SubspaceConfig) -> torch.Tensor:
    """Objective on the ``i``-th forget batch plus ``kl_weight`` x KL on the ``i``-th retain batch."""
    model = fit.model
    forget = pool.forget[i]
    if cfg.objective == "suppress":
        # The answer's own tokens, not the EOS after them: ending an answer is not the concept.
        words = forget.answer_mask & forget.answer_mask.roll(-1, dims=1)
        logits = model(**forget.inputs).logits[words]
        loss = suppress_loss(logits, forget.targets[words], cfg.margin)
    elif cfg.objective == "po":
        loss = answer_nll(model, pool.refusal[i])
    else:
        loss = npo_loss(sequence_logprob(model, forget), pool.forget_logp[i], cfg.beta)
    if cfg.kl_weight > 0:
        loss = loss + cfg.kl_weight * kl_to_reference(model, pool.retain_logits[i], pool.retain[i])
    return loss


def features_of(selected: Mapping[str, Sequence[int]], latents: int) -> dict[str, list[int]]:
    """Each concept's ``latents`` best-ranked latents."""
    return {c: list(f[:latents]) for c, f in selected.items()}


def fit_subspace(
    lm: LoadedModel,
    sae: SAE,
    site: str,
    selected: Mapping[str, Sequence[int]],
    rows: Sequence[Row],
    concepts: Sequence[Concept],
    cfg: SubspaceConfig,
    progress: bool = True,
    checkpoints: Sequence[int] = (),
    on_checkpoint: Any = None,
) -> Patch:
    """Fit ``A`` for ``steps`` Adam steps on train ``rows``; returns the patch. ``on_checkpoint(step,
    fit)`` is called after each step listed in ``checkpoints`` (the validation search's early stop)."""
    model = lm.model
    features = union_features(selected.values())
    if not features:
        raise InputError("subspace", "latents", "no latents selected; nothing spans the patch")
    module = writer_for_site(model, site, cfg.module)
    forget, retain = training_rows(rows, concepts)
    pool = build_pool(lm, forget, retain, cfg, progress)
    fit = SubspaceFit(model, module, basis(sae, features))
    torch.manual_seed(cfg.seed)
    optim = torch.optim.Adam([fit.a], lr=cfg.lr)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    losses: list[float] = []
    try:
        with fit.active():
            for step in track(range(1, cfg.steps + 1), "subspace fit", progress):
                loss = step_loss(fit, pool, (step - 1) % len(pool.forget), cfg)
                optim.zero_grad()
                loss.backward()
                optim.step()
                losses.append(float(loss.detach()))
                if step in checkpoints and on_checkpoint is not None:
                    with torch.no_grad():
                        on_checkpoint(step, fit)
    finally:
        for p, requires in frozen:
            p.requires_grad_(requires)
    return fit.patch(
        {
            "method": "subspace",
            "objective": cfg.objective,
            "modules": [module],
            "rank": len(features),
            "latents": {c: list(f) for c, f in selected.items()},
            "features": list(features),
            "steps": cfg.steps,
            "lr": cfg.lr,
            "kl_weight": cfg.kl_weight,
            "forget_rows": len(forget),
            "retain_rows": len(retain),
            "loss_first": round(losses[0], 6),
            "loss_last": round(losses[-1], 6),
            "writes": latent_writes(sae, features, fit.b, fit.a.detach()),
        }
    )


def latent_writes(sae: SAE, features: Sequence[int], b: torch.Tensor, a: torch.Tensor) -> dict[str, float]:
    """Per latent, the norm of what the patch writes along its decoder direction: ``B A`` written as
    ``W_dec[S]^T C`` (exact, since B spans the same space), the norm of ``C``'s row of that latent."""
    d = sae.W_dec[list(features)].detach().float().T.to(b.device)  # [d, k]
    coeff = torch.linalg.lstsq(d, b.float() @ a.float()).solution  # [k, in]
    return {str(f): round(float(row.norm()), 6) for f, row in zip(features, coeff, strict=True)}


def outside_span(patch: Patch, sae: SAE, features: Sequence[int]) -> float:
    """Largest relative norm of a delta's component outside span(W_dec[features]): 0 up to rounding."""
    q = basis(sae, features)
    worst = 0.0
    for delta in patch.deltas:
        dense = delta.dense().to(q.device)
        rest = dense - q @ (q.T @ dense)
        worst = max(worst, float(rest.norm() / dense.norm().clamp_min(1e-30)))
    return worst
