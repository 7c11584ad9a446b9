"""Is it really gone? Attacks on an unlearned model (DESIGN §15).

Each attack changes the weights or the prompts of a finished model and re-scores it:
- **relearning**: a short fine-tune (full or LoRA, the baselines' own loop) on half of the removed
  concepts' train questions, or on unrelated rows, scored after 5 / 20 / 50 steps on the held-out
  evaluation rows and on the other half (Lucki et al. 2024: ~10 unrelated examples bring most of
  RMU's removed knowledge back);
- **quantization**: weight-only fake quantization of every linear layer of the language model and
  its head, in blocks of 32 inputs like GGUF's q8_0 / q4_0 (Zhang et al. 2024: 4-bit weights
  restore much of what gradient unlearning removed);
- **prompts**: unrelated context before the question (as in verify), held-out paraphrases, and
  multi-hop questions that name the concept through another entity where the data has them;
- **probing**: a linear probe per layer, fitted on the original model's validation rows to read the
  answer from the residual stream at the end of the prompt, applied to the attacked model's forget
  rows: how often it still reads the removed concept.

The robust score is the summary score after the worst attack. Probes read activations, not answers,
so they are reported beside it, not in it.
"""

from __future__ import annotations

import copy
import hashlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sauce_export.architectures import decoder_layers, spec_for
from sauce_export.data import Concept, Row
from sauce_export.errors import InputError
from sauce_export.evaluate.baselines import BaselineConfig, answer_nll, train_copy
from sauce_export.evaluate.metrics import correctness, summary_score
from sauce_export.lm import Batch, LoadedModel, batches, encode_batch

QUANT_BITS = {"int8": 8, "int4": 4}
QUANT_BLOCK = 32
RELEARN_STEPS = (5, 20, 50)
PROBE_ROWS = 512
"""Validation rows a concept's probes are fitted on at most (a seeded sample)."""

Score = Callable[[nn.Module], dict[str, Any]]
"""A model -> {"concepts": {concept: metrics}, "score": summary score, ...} (compare's EvalSet.score)."""


@dataclass(frozen=True)
class AttackConfig:
    """The attacks' budget: every relearning run is scored after each of ``steps`` and the strongest
    learning rate of the sweep counts (the attacker's best, not a choice made for the method); an
    empty learning-rate list skips that mode."""

    steps: tuple[int, ...] = RELEARN_STEPS
    lrs_full: tuple[float, ...] = (1e-4, 1e-3)
    lrs_lora: tuple[float, ...] = (1e-3, 1e-2)
    batch_size: int = 16
    unrelated_rows: int = 16
    """Size of the pool of unrelated train rows the unrelated relearning draws its batches from."""
    quant: tuple[str, ...] = ("int8", "int4")
    seed: int = 0
    eval_rows: int = 128
    """Retain and interference rows per concept the attacks score at most (a seeded sample; every
    forget and generality row is kept): each relearning run is scored several times."""
    held_back_rows: int = 256
    """The other half's rows scored after relearning at most (a seeded sample): scoring all of them
    (4230 on the demo's three concepts) cost three times the relearning steps themselves."""


# ---------------------------------------------------------------------------- relearning data
def halves(rows: Sequence[Row]) -> tuple[list[Row], list[Row]]:
    """(relearn on, measure on): whole images (or text rows) go to one side, ranked by a hash of
    their name, so no image of the measured half is ever trained on."""

    def group(row: Row) -> str:
        return row.image.name if row.image is not None else row.id

    names = sorted({group(r) for r in rows}, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    first = set(names[: (len(names) + 1) // 2])
    return [r for r in rows if group(r) in first], [r for r in rows if group(r) not in first]


def relearn_batches(
    lm: LoadedModel, pool: Sequence[Row], steps: int, batch_size: int, seed: int
) -> list[Batch]:
    """``steps`` seeded batches drawn from ``pool`` (with replacement across steps)."""
    rng = random.Random(seed)
    return [encode_batch(lm, rng.sample(list(pool), min(batch_size, len(pool)))) for _ in range(steps)]


def relearn(
    model: nn.Module,
    train: Sequence[Batch],
    *,
    lora: bool,
    lr: float,
    steps: Sequence[int],
    seed: int,
    score: Score,
    held_back: Sequence[Batch] = (),
) -> dict[int, dict[str, Any]]:
    """Fine-tune a copy of ``model`` on the answers of ``train`` (answer NLL, the baselines' loop);
    at each of ``steps`` the student is scored, plus its accuracy on ``held_back`` when given."""
    cfg = BaselineConfig("PO", lora=lora, steps=max(steps), lr=lr, seed=seed)
    scored: dict[int, dict[str, Any]] = {}

    def loss(student: nn.Module, _reference: nn.Module, step: int) -> torch.Tensor:
        return answer_nll(student, train[step % len(train)])

    def checkpoint(done: int, student: nn.Module) -> None:
        if done in steps:
            scored[done] = score(student)
            if held_back:
                ok = correctness(student, held_back)
                scored[done]["half_acc"] = sum(ok.values()) / len(ok)

    train_copy(model, cfg, loss, checkpoint)
    return scored


# ---------------------------------------------------------------------------- quantization
@torch.no_grad()
def fake_quantize(weight: torch.Tensor, bits: int, block: int = QUANT_BLOCK) -> torch.Tensor:
    """Round-trip a [out, in] weight through symmetric ``bits``-bit integers with one absmax scale per
    ``block`` inputs (the last block zero-padded), as GGUF's q8_0 / q4_0 store it."""
    out_f, in_f = weight.shape
    pad = (-in_f) % block
    w = torch.nn.functional.pad(weight.float(), (0, pad)).reshape(out_f, -1, block)
    top = 2 ** (bits - 1) - 1
    scale = w.abs().amax(-1, keepdim=True) / top
    q = torch.where(scale > 0, (w / scale.clamp(min=1e-12)).round().clamp(-top, top) * scale, 0.0)
    return q.reshape(out_f, -1)[:, :in_f].to(weight.dtype)


@torch.no_grad()
def quantized(model: nn.Module, name: str) -> nn.Module:
    """A copy with every linear layer of the decoder layers and the LM head fake-quantized (the vision
    tower and projector stay: llama.cpp ships them apart, in their own precision)."""
    bits = QUANT_BITS[name]
    out = copy.deepcopy(model)
    head = out.get_submodule(spec_for(out).lm_head)
    linears = [m for m in decoder_layers(out).modules() if isinstance(m, nn.Linear)]
    for module in [*linears, head]:
        module.weight.copy_(fake_quantize(module.weight, bits))
    return out


# ---------------------------------------------------------------------------- probes
@torch.no_grad()
def prompt_states(model: nn.Module, encoded: Sequence[Batch]) -> torch.Tensor:
    """[layers + 1, rows, d] residual stream at each row's last prompt token (the position that
    predicts the first answer token; the answer itself is never seen there)."""
    out = []
    for batch in encoded:
        hidden = model(**batch.inputs, output_hidden_states=True).hidden_states
        where = batch.answer_mask.float().argmax(1)
        rows = torch.arange(len(where))
        out.append(torch.stack([h[rows, where].float() for h in hidden]))
    return torch.cat(out, 1)


@dataclass
class Probes:
    """One ridge-regression classifier per layer from the standardized state to the answer."""

    labels: list[str]
    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    """[layers + 1, d + 1, classes] (the last input row is the bias)."""

    @classmethod
    def fit(cls, states: torch.Tensor, answers: Sequence[str], ridge: float = 1.0) -> Probes:
        labels = sorted(set(answers))
        target = torch.zeros(len(answers), len(labels))
        target[torch.arange(len(answers)), [labels.index(a) for a in answers]] = 1.0
        mean, std = states.mean(1, keepdim=True), states.std(1, keepdim=True).clamp(min=1e-6)
        x = _with_bias((states - mean) / std)
        eye = torch.eye(x.shape[-1]) * ridge
        weight = torch.linalg.solve(x.transpose(1, 2) @ x + eye, x.transpose(1, 2) @ target)
        return cls(labels, mean, std, weight)

    def predict(self, states: torch.Tensor) -> list[list[str]]:
        """Per layer, the predicted answer of each row."""
        logits = _with_bias((states - self.mean) / self.std) @ self.weight
        return [[self.labels[i] for i in layer.tolist()] for layer in logits.argmax(-1)]


def _with_bias(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(*x.shape[:-1], 1)], -1)


@dataclass
class ProbeSet:
    """A concept's probes and the evaluation forget rows they are applied to. The probes read the
    concept's identity (``labels[kind]``: the person, the event, ...) from the original model's
    validation questions about its kind - the answer itself on an image world, the subject of a
    fact question ("What job does P have?") on a fact world."""

    concept: Concept
    probes: Probes
    forget: list[Batch]
    validation_acc: list[float]
    """Per layer, the probes' accuracy on the rows they were fitted on (how readable the kind is)."""
    original_read: list[float] = field(default_factory=list)
    """Per layer, ``read`` of the original model (what a model that forgot nothing shows)."""

    @classmethod
    def build(
        cls,
        lm: LoadedModel,
        concept: Concept,
        validation: Sequence[Row],
        forget: Sequence[Row],
        batch_size: int,
    ) -> ProbeSet:
        about = [r for r in validation if r.subject == concept.kind and concept.kind in r.labels]
        rows = random.Random(0).sample(about, min(PROBE_ROWS, len(about)))
        names = [r.labels[concept.kind] for r in rows]
        states = prompt_states(lm.model, list(batches(lm, rows, batch_size)))
        probes = Probes.fit(states, names)
        hits = [
            sum(p == n for p, n in zip(layer, names, strict=True)) / len(rows)
            for layer in probes.predict(states)
        ]
        made = cls(concept, probes, list(batches(lm, forget, batch_size)), hits)
        made.original_read = made.read(lm.model)
        return made

    def read(self, model: nn.Module) -> list[float]:
        """Per layer, the share of forget rows whose state the probe still reads as the concept."""
        predicted = self.probes.predict(prompt_states(model, self.forget))
        return [sum(p == self.concept.name for p in layer) / len(layer) for layer in predicted]


# ---------------------------------------------------------------------------- the suite
@dataclass
class AttackData:
    """What one setting's attacks need, built once and shared by every method's model."""

    concept_train: list[Batch]
    """Relearning batches from one half of the removed concepts' train questions."""
    concept_held_back: list[Batch]
    """The other half, measured after relearning."""
    unrelated_train: list[Batch]
    """Relearning batches from a small pool of train rows about nothing removed."""
    probes: list[ProbeSet]


def attack_data(
    lm: LoadedModel,
    forget: Sequence[Row],
    retain: Sequence[Row],
    validation: Sequence[Row],
    eval_forget: dict[Concept, list[Row]],
    cfg: AttackConfig,
    batch_size: int,
) -> AttackData:
    """``forget`` / ``retain``: the setting's train rows (compare's forget_retain_rows);
    ``eval_forget``: each concept's evaluation forget rows (what the probes read)."""
    first, second = halves(forget)
    if not first or not second:
        problem = "relearning needs the removed concepts' train questions on at least two images"
        raise InputError("data.train", "labels", problem)
    rng = random.Random(cfg.seed)
    pool = rng.sample(list(retain), min(cfg.unrelated_rows, len(retain)))
    second = rng.sample(second, min(cfg.held_back_rows, len(second)))
    steps = max(cfg.steps)
    return AttackData(
        concept_train=relearn_batches(lm, first, steps, cfg.batch_size, cfg.seed),
        concept_held_back=list(batches(lm, second, batch_size)),
        unrelated_train=relearn_batches(lm, pool, steps, cfg.batch_size, cfg.seed),
        probes=[ProbeSet.build(lm, c, validation, rows, batch_size) for c, rows in eval_forget.items()],
    )


def paraphrased(
    plain: dict[str, Any], original: dict[str, dict[str, Any]], metric: str = "generality_acc"
) -> dict[str, Any]:
    """Other questions as the forget questions: the score with ``metric`` (the held-out paraphrases,
    or the multi-hop questions that reach the concept through another entity) in forget's place."""
    swap = {c: {**m, "forget_acc": m[metric]} for c, m in plain["concepts"].items()}
    ref = {c: {**m, "forget_acc": m[metric]} for c, m in original.items()}
    scores = [summary_score(swap[c], ref[c]) for c in swap]
    return {"concepts": swap, "score": sum(scores) / len(scores)}


def worst_attack(attacks: dict[str, dict[str, Any]]) -> str:
    """The attack with the lowest score: the robust score is the score after it (an attack scored
    None - the original model could not answer its prompts either - does not count)."""
    return min((n for n in attacks if attacks[n]["score"] is not None), key=lambda n: attacks[n]["score"])


def attack_model(
    model: nn.Module,
    data: AttackData,
    cfg: AttackConfig,
    *,
    original: dict[str, dict[str, Any]],
    score: Score,
    score_context: Score,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Every attack on ``model`` (``plain``: its score without one); ``original``: the original
    model's per-concept metrics on the rows ``score`` reads. Relearning keeps, per (data, full/LoRA,
    steps), the learning rate that brought most back (the lowest score)."""
    attacks: dict[str, dict[str, Any]] = {}

    def timed(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        start = time.perf_counter()
        attacks[name] = {**fn(), "seconds": round(time.perf_counter() - start, 2)}
        log(f"{name}: score {attacks[name]['score']:.3f}")

    timed("context", lambda: score_context(model))
    plain = score(model)
    attacks["paraphrase"] = paraphrased(plain, original)
    if all("multihop_acc" in m for m in original.values()):
        attacks["multihop"] = paraphrased(plain, original, "multihop_acc")
    for name in cfg.quant:
        timed(name, lambda name=name: score(quantized(model, name)))
    for data_name, train, held in (
        ("concept", data.concept_train, data.concept_held_back),
        ("unrelated", data.unrelated_train, data.concept_held_back),
    ):
        for lora, lrs in ((False, cfg.lrs_full), (True, cfg.lrs_lora)):
            if not lrs:  # no relearning in this mode
                continue
            start = time.perf_counter()
            runs = {
                lr: relearn(
                    model,
                    train,
                    lora=lora,
                    lr=lr,
                    steps=cfg.steps,
                    seed=cfg.seed,
                    score=score,
                    held_back=held,
                )
                for lr in lrs
            }
            seconds = round(time.perf_counter() - start, 2)  # the whole sweep, shared by its rows
            for steps in cfg.steps:
                lr, worst = min(((lr, run[steps]) for lr, run in runs.items()), key=lambda p: p[1]["score"])
                name = f"relearn {data_name} {'LoRA' if lora else 'full'} {steps}"
                attacks[name] = {**worst, "lr": lr, "seconds": seconds}
                log(f"{name}: score {worst['score']:.3f} (lr {lr:g})")
    worst_name = worst_attack(attacks)
    probes = {}
    for probe in data.probes:
        read = probe.read(model)
        probes[str(probe.concept)] = {
            "forget_read": read,
            "original_read": probe.original_read,
            "max": max(read),
            "validation_acc": probe.validation_acc,
        }
    return {
        "plain": plain,
        "attacks": attacks,
        "robust_score": attacks[worst_name]["score"],
        "worst_attack": worst_name,
        "probes": probes,
    }


# ---------------------------------------------------------------------------- captions (VLM)
CAPTIONS = {
    "caption describe": "Who is the {profession} from {hometown}?",
    "caption describe, blank image": "The person in the picture is the {profession} from {hometown}. "
    "Who is in the picture?",
}
"""A person described by their world attributes instead of shown; the answer is their name."""


def caption_selections(
    persons: Sequence[dict[str, str]], facts: Sequence[Row], concepts: Sequence[Concept], blank: Path
) -> dict[str, dict[str, dict[str, list[Row]]]]:
    """Per caption attack, per removed person: forget = the prompts about them, retain = the same
    prompts about every other person. ``caption describe*`` name the person's profession and town
    (text only, or under a blank image) and ask who it is; ``caption name`` asks the world's text
    fact questions by the person's name (``facts``): the person reached through words, not a picture."""
    removed = [c for c in concepts if c.kind == "person"]
    described = {
        attack: [
            Row(
                id=f"{attack}|{p['name']}",
                prompt=template.format(**p),
                answer=p["name"],
                image=blank if "blank" in attack else None,
                labels={"person": p["name"]},
                question_kind="person",
                split="caption",
            )
            for p in persons
        ]
        for attack, template in CAPTIONS.items()
    }
    described["caption name"] = [r for r in facts if "person" in r.labels and r.subject != "person"]
    return {
        attack: {
            str(c): {
                "forget_acc": [r for r in rows if c.matches(r)],
                "generality_acc": [],
                "retain_acc": [r for r in rows if not any(x.matches(r) for x in removed)],
                "interference_acc": [],
            }
            for c in removed
        }
        for attack, rows in described.items()
    }
