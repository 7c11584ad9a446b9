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

import json
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sauce_export.activations import ActivationStore
from sauce_export.architectures import site_module_name, spec_for
from sauce_export.calibrate import Validation
from sauce_export.data import Concept, Row
from sauce_export.errors import CalibrationFailed, InputError
from sauce_export.evaluate.baselines import (
    answer_logits,
    answer_nll,
    forget_retain_rows,
    kl_to_reference,
    npo_loss,
    sequence_logprob,
)
from sauce_export.evaluate.metrics import concept_metrics, correctness, summary_score
from sauce_export.lm import Batch, LoadedModel, encode_batch
from sauce_export.patch import Patch, WeightDelta
from sauce_export.progress import track
from sauce_export.sae.formats import load_sae
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
    search: bool = field(
        default=True,
        metadata={
            "help": "Choose latents, lr and steps on validation rows (calibrate stage) from the grids "
            "below; false: subspace.latents / lr / steps as given."
        },
    )
    latents_grid: list[int] = field(
        default_factory=lambda: [4, 8, 16], metadata={"help": "search: latents per concept tried."}
    )
    lrs: list[float] = field(default_factory=lambda: [0.03, 0.1], metadata={"help": "search: lrs tried."})
    kl_weights: list[float] = field(
        default_factory=lambda: [10.0, 100.0],
        metadata={
            "help": "search: kl_weight values, in order; the next is tried only when no point passed "
            "with the ones before (a fresh text model needed 100 to keep the other persons' facts)."
        },
    )
    step_grid: list[int] = field(
        default_factory=lambda: [50, 100, 200],
        metadata={
            "help": "search: steps scored, in one fit of the largest (it stops early once the score "
            "falls after meeting every limit)."
        },
    )


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


Checkpoint = Callable[[int, SubspaceFit], bool | None]
"""Called after a listed step with the patch active; True stops the fit there."""


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
    on_checkpoint: Checkpoint | None = None,
) -> Patch:
    """Fit ``A`` for ``steps`` Adam steps on train ``rows``; returns the patch. ``on_checkpoint(step,
    fit)`` is called, the patch active, after each step listed in ``checkpoints``; True stops the fit
    there (the validation search's early stop)."""
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
                        if on_checkpoint(step, fit):
                            break
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
            "steps": len(losses),
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


@dataclass
class Scorer:
    """Scores the active patch on every concept's validation rows and keeps the table."""

    validation: Validation
    names: list[str]
    table: list[dict[str, Any]] = field(default_factory=list)
    rows_scored: int = 0

    kl_weight: float | None = None
    """The weight of the fits being scored (shown in the table once the search tries several)."""

    def __call__(self, model: nn.Module, n: int, lr: float, steps: int) -> tuple[float, bool]:
        """(mean summary score, every concept meets its limits) of the model as it runs now."""
        v, scores, passed = self.validation, [], True
        for c in self.names:
            if not v.has_rows(c):
                continue
            ok: dict[str, bool] = {}
            for part, part_rows in v.selections[c].items():
                ok.update(correctness(model, v.encoded[(c, part)]))
                self.rows_scored += len(part_rows)
            m = concept_metrics(ok, v.selections[c])
            why = v.failures(c, m)
            scores.append(summary_score(m, v.original[c]))
            passed = passed and not why
            self.table.append(_entry(c, n, lr, steps, m, scores[-1], why, self.kl_weight))
        return sum(scores) / max(len(scores), 1), passed


def search(
    lm: LoadedModel,
    sae: SAE,
    site: str,
    ranked: Mapping[str, Sequence[int]],
    own: Mapping[str, int | None],
    rows: Sequence[Row],
    concepts: Sequence[Concept],
    cfg: SubspaceConfig,
    validation: Validation,
    progress: bool = True,
) -> dict[str, Any]:
    """Latents per concept x lr x steps, each fitted on train ``rows`` and scored on validation rows
    (``validation``: the clamp calibration's row sets, limits and original scores). The choice is the
    highest mean summary score among points where every concept meets its limits (ties: fewer
    latents, then fewer steps). A fit stops at the first checkpoint that does not beat the best
    passing one before it; the latent counts stop at the first perfect score. Raises CalibrationFailed with the table when no point passes."""
    start = time.time()
    scorer = Scorer(validation, [str(c) for c in concepts])
    passing: list[tuple[float, int, int, float, float]] = []
    fits = 0
    weights = list(dict.fromkeys(cfg.kl_weights or [cfg.kl_weight]))
    for kl_weight in weights:
        if passing:
            break  # a larger weight only trades forgetting for retain that already passes
        scorer.kl_weight = kl_weight if len(weights) > 1 else None
        tried: set[tuple[tuple[int, ...], ...]] = set()
        for n in sorted(set(cfg.latents_grid)):
            if passing and max(p[0] for p in passing) >= 1.0:
                break  # a perfect score: more latents could only tie, and ties go to fewer
            selected = {c: list(ranked[c][: own.get(c) or n]) for c in scorer.names}
            key = tuple(tuple(f) for f in selected.values())
            if key in tried:
                continue  # fewer ranked latents than n: the same patch as a smaller n
            tried.add(key)
            for lr in cfg.lrs:
                best = [-1.0]

                def checkpoint(
                    step: int,
                    fit: SubspaceFit,
                    n: int = n,
                    lr: float = lr,
                    best: list = best,
                    kl_weight: float = kl_weight,
                ) -> bool:
                    score, passed = scorer(fit.model, n, lr, step)
                    if passed:
                        passing.append((score, n, step, lr, kl_weight))
                    stop = best[0] >= 0 and score <= best[0]  # no better than a passing checkpoint
                    best[0] = max(best[0], score) if passed else best[0]
                    return stop

                steps = sorted(set(cfg.step_grid))
                run_cfg = replace(cfg, lr=lr, steps=steps[-1], kl_weight=kl_weight)
                fit_subspace(lm, sae, site, selected, rows, concepts, run_cfg, progress, steps, checkpoint)
                fits += 1
    cost = {"fits": fits, "rows_scored": scorer.rows_scored, "seconds": round(time.time() - start, 1)}
    if not passing:
        raise CalibrationFailed("no subspace point meets every concept's limits on validation", scorer.table)
    score, n, steps, lr, kl_weight = max(passing, key=lambda p: (p[0], -p[1], -p[2]))
    for e in scorer.table:
        if (e["top_n"], e["lr"], e["steps"], e["kl_weight"]) == (n, lr, steps, kl_weight):
            e.update(chosen=True, why="chosen: best mean score meeting every limit")
    selected = {c: list(ranked[c][: own.get(c) or n]) for c in scorer.names}
    return {
        "latents": n,
        "lr": lr,
        "steps": steps,
        "kl_weight": kl_weight,
        "score": round(score, 4),
        "selected": selected,
        "table": scorer.table,
        **cost,
    }


def _entry(
    concept: str,
    n: int,
    lr: float,
    steps: int,
    m: Mapping[str, float | None],
    score: float,
    why: list[str],
    kl_weight: float | None = None,
) -> dict[str, Any]:
    """One calibration-table row (the clamp search's columns; the clamp is none, size = latents)."""
    kl = "" if kl_weight is None else f" kl {kl_weight:g}"
    return {
        "concept": concept,
        "phase": f"subspace lr {lr:g} steps {steps}{kl}",
        "method": "subspace",
        "top_n": n,
        "clamp": None,
        "size": n,
        "lr": lr,
        "steps": steps,
        "kl_weight": kl_weight,
        **{k: m.get(k) for k in ("forget_acc", "retain_acc", "interference_acc")},
        "score": round(score, 4),
        "passed": not why,
        "chosen": False,
        "why": "; ".join(why) or "meets every limit",
    }


@torch.no_grad()
def top_tokens(
    lm: LoadedModel,
    sae: SAE,
    store: ActivationStore,
    rows: Sequence[Row],
    features: Sequence[int],
    k: int = 5,
) -> dict[str, list[dict[str, Any]]]:
    """Per latent, the ``k`` stored train tokens where it fires most: the token, its row (id and
    labels) and the activation (what a reader checks a latent against before trusting the patch
    built on it; an image token says little alone, its row's labels say whose image it was)."""
    feats = list(features)
    best_val = torch.full((len(feats), k), float("-inf"))
    best_at = torch.zeros((len(feats), k, 2), dtype=torch.long)
    for shard in store.shards():
        f = sae.encode(shard.acts.to(sae.W_dec))[:, feats].float().cpu().T  # [|S|, n]
        where = torch.stack([shard.row.long(), shard.pos.long()], -1)  # [n, 2]
        vals = torch.cat([best_val, f], 1)
        ats = torch.cat([best_at, where[None].expand(len(feats), -1, -1)], 1)
        best_val, idx = vals.topk(min(k, vals.shape[1]), dim=1)
        best_at = ats.gather(1, idx[..., None].expand(-1, -1, 2))
    ids: dict[int, list[int]] = {}
    out: dict[str, list[dict[str, Any]]] = {}
    for i, latent in enumerate(feats):
        found = []
        for value, (row_idx, pos) in zip(best_val[i].tolist(), best_at[i].tolist(), strict=True):
            if value <= 0:
                break  # the latent fired on fewer than k stored tokens
            if row_idx not in ids:
                ids[row_idx] = encode_batch(lm, [rows[row_idx]]).inputs["input_ids"][0].tolist()
            token = lm.tokenizer.convert_ids_to_tokens(ids[row_idx][pos])
            row = rows[row_idx]
            found.append({"token": token, "row": row.id, "labels": row.labels, "act": round(value, 4)})
        out[str(latent)] = found
    return out


def latents_markdown(fold: Mapping[str, Any]) -> str:
    """The patch's latents: concept, write norm along the decoder direction, top train tokens with
    their row's label of the concept's kind."""
    desc, tokens = fold.get("description", {}), fold.get("top_tokens", {})
    owner = {str(f): c for c, fs in desc.get("latents", {}).items() for f in fs}
    lines = [
        "| latent | concept | write norm | top-activating train tokens (activation, the row's label) |",
        "|---|---|---|---|",
    ]
    for latent, norm in desc.get("writes", {}).items():
        concept = owner.get(latent, "-")
        kind = concept.split(":", 1)[0]

        def cell(t: dict[str, Any], kind: str = kind) -> str:
            label = t.get("labels", {}).get(kind)
            return f"`{t['token']}` ({t['act']:.2f}" + (f", {kind} {label})" if label else ")")

        top = ", ".join(cell(t) for t in tokens.get(latent, [])) or "-"
        lines.append(f"| {latent} | {concept} | {norm:.3f} | {top} |")
    return "\n".join(lines)


def fit_for_run(
    lm: LoadedModel,
    run_dir: Path,
    site: str,
    concepts: Sequence[Concept],
    rows: Sequence[Row],
    cfg: SubspaceConfig,
    method: str,
    checkpoints: Sequence[int] = (),
    on_checkpoint: Checkpoint | None = None,
) -> Patch:
    """The subspace patch for ``concepts`` from a finished run's SAE and latent ranking (``method``'s
    score, else the first the run ranked), at the latents and lr the run's calibration chose on
    validation rows (else ``cfg``'s), for ``cfg.steps`` steps: what ``compare`` trains on a budget
    (``checkpoints`` / ``on_checkpoint`` as in ``fit_subspace``)."""
    sae = load_sae(run_dir / "train-sae" / "sae").to(lm.device)
    ranked = json.loads((run_dir / "select" / "stage.json").read_text())["result"]["ranked"]
    report = json.loads((run_dir / "report.json").read_text())
    chosen = (report.get("calibration") or {}).get("subspace") or {}
    n, lr = chosen.get("latents", cfg.latents), chosen.get("lr", cfg.lr)
    kl_weight = chosen.get("kl_weight", cfg.kl_weight)
    selected = {}
    for c in concepts:
        lists = ranked[str(c)]
        selected[str(c)] = list(lists.get(method) or next(iter(lists.values())))[:n]
    run_cfg = replace(cfg, lr=lr, kl_weight=kl_weight)
    return fit_subspace(lm, sae, site, selected, rows, concepts, run_cfg, False, checkpoints, on_checkpoint)
