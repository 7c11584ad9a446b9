"""Fidelity of a folded or exported model to the hook-based reference, and the verify gates.

Accuracy alone can hide a fold that answers the quiz right but shifts every distribution, so each
candidate is also compared token by token with the hooked reference on held-out forget and retain
prompts - once as they are, once with unrelated context placed before the question, which is where
a linear patch that fires on the wrong tokens shows up.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from sauce_export.architectures import site_module_name
from sauce_export.data import Concept, Row
from sauce_export.edit import Edit
from sauce_export.evaluate.metrics import metric_rows
from sauce_export.hooks import hidden_of
from sauce_export.lm import Batch, LoadedModel, batches
from sauce_export.progress import track

Context = Callable[[], AbstractContextManager[Any]]


@dataclass(frozen=True)
class Variant:
    """A model to run and the context that turns it into the variant (a hook, a patch, nothing)."""

    name: str
    model: nn.Module
    context: Context = nullcontext


@dataclass
class VerifyGates:
    """Pass/fail thresholds that CI enforces (``verify.gates`` in the recipe)."""

    hooked_forget_margin: float = field(
        default=0.05, metadata={"min": 0, "help": "hooked forget_acc <= chance + this."}
    )
    hooked_keep: float = field(
        default=0.95, metadata={"min": 0, "help": "hooked retain/interference >= this x original."}
    )
    forget_slack: float = field(
        default=0.03, metadata={"min": 0, "help": "exported forget_acc <= hooked + this."}
    )
    keep_slack: float = field(
        default=0.01, metadata={"min": 0, "help": "exported retain/interference >= hooked - this."}
    )
    max_kl_retain: float = field(
        default=0.05, metadata={"min": 0, "help": "mean KL(hooked || exported) on retain prompts, nats."}
    )


def with_context(rows: Sequence[Row], pool: Sequence[Row], seed: int) -> list[Row]:
    """Each row with an unrelated question and its answer placed before the question."""
    rng = random.Random(seed)
    return [replace(r, id=r.id + "#ctx", prompt=_prefix(rng.choice(pool)) + r.prompt) for r in rows]


def _prefix(row: Row) -> str:
    return f"{row.prompt} {row.answer}. "


def fidelity_sets(
    rows: Sequence[Row],
    concept: Concept,
    removed: Sequence[Concept],
    forget_split: str,
    limit: int,
    seed: int,
) -> dict[str, list[Row]]:
    """Held-out forget and retain prompts of one concept, plain and with unrelated context."""
    rng = random.Random(seed)
    chosen = metric_rows(rows, concept, forget_split, forget_split, removed=removed)
    sets = {
        name: rng.sample(chosen[f"{name}_acc"], min(limit, len(chosen[f"{name}_acc"])))
        for name in ("forget", "retain")
    }
    pool = [r for r in rows if not any(c.matches(r) for c in removed)] or list(rows)
    for name in ("forget", "retain"):
        sets[f"{name}_ctx"] = with_context(sets[name], pool, seed)
    return sets


@torch.no_grad()
def _run(variant: Variant, inputs: dict[str, torch.Tensor], site: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs [B,T,V], site output [B,T,d]) of one forward of the variant."""
    seen: dict[str, torch.Tensor] = {}
    module = variant.model.get_submodule(site_module_name(variant.model, site))
    with variant.context():
        # Registered after the variant's own hooks, so it sees the site output they produce.
        handle = module.register_forward_hook(lambda _m, _a, out: seen.__setitem__("h", hidden_of(out)))
        try:
            logits = variant.model(**inputs).logits.float()
        finally:
            handle.remove()
    # On the inputs' device: under a device_map the site layer may sit on another GPU.
    return torch.log_softmax(logits, -1), seen["h"].float().to(logits.device)


RefBatch = tuple[torch.Tensor, torch.Tensor]
"""The reference's outputs on one batch: log-probs at the answer positions, site output at real tokens."""


def _ref_batch(variant: Variant, batch: Batch, site: str) -> RefBatch:
    logp, h = _run(variant, batch.inputs, site)
    return logp[batch.answer_mask], h[batch.inputs["attention_mask"].bool()]


@torch.no_grad()
def reference_outputs(
    lm: LoadedModel, reference: Variant, rows: Sequence[Row], site: str, batch_size: int
) -> list[RefBatch]:
    """The reference's outputs on ``rows``, batched as ``fidelity`` batches them: computed once, so
    a candidate loaded after the reference's model was released (verify's exported model) can
    still be compared with it, and each candidate costs one forward instead of two."""
    return [_ref_batch(reference, batch, site) for batch in batches(lm, rows, batch_size)]


@torch.no_grad()
def fidelity(
    lm: LoadedModel,
    reference: Variant | list[RefBatch],
    candidate: Variant,
    rows: Sequence[Row],
    edit: Edit,
    batch_size: int,
    progress: bool = True,
) -> dict[str, float]:
    """Mean KL(reference || candidate) and top-1 agreement at answer positions; cosine of the site
    output over all real tokens; mean activation of the selected latents under the candidate.
    ``reference``: a variant, or its ``reference_outputs`` on these rows."""
    kl_sum = agree = n_answer = 0.0
    cos_sum = n_tokens = act_sum = 0.0
    total = (len(rows) + batch_size - 1) // batch_size
    encoded = track(batches(lm, rows, batch_size), f"fidelity {candidate.name}", progress, total)
    for i, batch in enumerate(encoded):
        p_ref, ref_h = (
            reference[i] if isinstance(reference, list) else _ref_batch(reference, batch, edit.site)
        )
        logp, h = _run(candidate, batch.inputs, edit.site)
        answer = batch.answer_mask
        kl_sum += float((p_ref.exp() * (p_ref - logp[answer])).sum(-1).sum())
        agree += float((p_ref.argmax(-1) == logp[answer].argmax(-1)).sum())
        n_answer += int(answer.sum())
        real = batch.inputs["attention_mask"].bool()
        cos_sum += float(torch.cosine_similarity(ref_h, h[real], dim=-1).sum())
        act_sum += float(edit.sae.encode(h[real].to(edit.sae.W_dec))[:, list(edit.features)].sum())
        n_tokens += int(real.sum())
    return {
        "kl": kl_sum / max(n_answer, 1),
        "top1": agree / max(n_answer, 1),
        "cos": cos_sum / max(n_tokens, 1),
        "feature_act": act_sum / max(n_tokens, 1),
    }


@dataclass(frozen=True)
class Cached:
    """A reference variant's name and its ``reference_outputs`` per fidelity set."""

    name: str
    sets: dict[str, list[RefBatch]]


def fidelity_report(
    lm: LoadedModel,
    reference: Variant | Cached,
    candidate: Variant,
    sets: dict[str, list[Row]],
    edit: Edit,
    batch_size: int,
    progress: bool = True,
) -> dict[str, float]:
    """DESIGN §7 keys: kl_vs_hooked_{forget,retain}[_ctx], top1_agree_vs_hooked, cos_site_vs_hooked
    (``hooked`` is the reference's name: ``folded`` when the reference is the subspace patch)."""
    out: dict[str, float] = {}
    ref = reference.name
    agree = cos = weight = 0.0
    for name, rows in sets.items():
        if not rows:
            continue
        ref_set = reference.sets[name] if isinstance(reference, Cached) else reference
        f = fidelity(lm, ref_set, candidate, rows, edit, batch_size, progress)
        out[f"kl_vs_{ref}_{name}"] = round(f["kl"], 6)
        out[f"top1_agree_vs_{ref}_{name}"] = round(f["top1"], 4)
        agree, cos, weight = agree + f["top1"] * len(rows), cos + f["cos"] * len(rows), weight + len(rows)
        out[f"feature_act_{name}"] = round(f["feature_act"], 5)
    out[f"top1_agree_vs_{ref}"] = round(agree / max(weight, 1), 4)
    out[f"cos_site_vs_{ref}"] = round(cos / max(weight, 1), 6)
    return out


_KEPT = ("retain_acc", "interference_acc")


def gate_checks(
    concepts: list[dict[str, Any]], gates: VerifyGates, variant: str | None, reference: str = "hooked"
) -> list[dict[str, Any]]:
    """The reference (the hooked clamp, or the subspace patch ``folded``) vs original (always), and
    ``variant`` (exported) vs the reference when given."""
    checks = []
    for c in concepts:
        m, name = c["metrics"], f"{c['kind']}:{c['name']}"
        orig, hooked = m["original"], m[reference]
        margin, keep = gates.hooked_forget_margin, gates.hooked_keep
        checks += _bounds(
            f"{name} {reference}",
            hooked,
            (f"chance + {margin}", c["chance_acc"] + margin),
            {k: (f"{keep} x original", keep * orig[k]) for k in _KEPT if orig[k] is not None},
        )
        if variant is None or variant not in m:
            continue
        got, slack = m[variant], gates.keep_slack
        checks += _bounds(
            f"{name} {variant}",
            got,
            (f"{reference} + {gates.forget_slack}", hooked["forget_acc"] + gates.forget_slack),
            {k: (f"{reference} - {slack}", hooked[k] - slack) for k in _KEPT if hooked[k] is not None},
        )
        kl = got.get(f"kl_vs_{reference}_retain")
        if kl is not None:
            rule = f"{name} {variant} KL({reference}||{variant}) retain <= {gates.max_kl_retain}"
            checks.append(_check(rule, kl, gates.max_kl_retain, "<="))
    return checks


def _bounds(
    label: str,
    got: dict[str, Any],
    forget_max: tuple[str, float],
    keep_min: dict[str, tuple[str, float]],
) -> list[dict[str, Any]]:
    """forget_acc at most one bound; each kept metric at least its own."""
    checks = [_check(f"{label} forget_acc <= {forget_max[0]}", got["forget_acc"], forget_max[1], "<=")]
    for metric, (rule, floor) in keep_min.items():
        if got[metric] is not None:
            checks.append(_check(f"{label} {metric} >= {rule}", got[metric], floor, ">="))
    return checks


def _check(name: str, value: float, threshold: float, op: str) -> dict[str, Any]:
    passed = value <= threshold + 1e-12 if op == "<=" else value >= threshold - 1e-12
    return {
        "name": name,
        "value": round(value, 4),
        "threshold": round(threshold, 4),
        "op": op,
        "passed": passed,
    }
