"""Weight-update unlearning baselines (PEBench's GA, GD, KL, PO and NPO) to compare SAUCE against.

Each method is one short loop over pre-encoded batches: losses are taken on the teacher-forced
answer tokens only (``Batch.answer_mask``), so the prompt and the image are context, never targets.
Every method sees the same forget / retain batches in the same order for a given seed, so a sweep
compares methods, not data orders. Full fine-tuning trains the language model and its head (a VLM's
vision tower and projector frozen); the LoRA variant puts rank-``r`` adapters on the language model's
attention and MLP projections and merges them back, so the result is again a plain model. Which
modules those are comes from the architecture registry, so text-only causal LMs and VLMs train alike.
"""

from __future__ import annotations

import copy
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F

from sauce_export.architectures import lora_targets, text_parameters
from sauce_export.data import Concept, Row
from sauce_export.lm import Batch, LoadedModel, encode_batch

Method = Literal["GA", "GD", "KL", "PO", "NPO"]
METHODS: tuple[Method, ...] = ("GA", "GD", "KL", "PO", "NPO")


@dataclass(frozen=True)
class BaselineConfig:
    """One point of a sweep; the same budget knobs for every method."""

    method: Method
    lora: bool = False
    steps: int = 60
    lr: float = 1e-5
    batch_size: int = 16
    beta: float = 0.1
    """NPO's inverse temperature (ignored by the other methods)."""
    seed: int = 0
    lora_r: int = 8
    refusal: str = "I don't know."
    """PO's target answer on forget questions."""


def forget_retain_rows(rows: Sequence[Row], concepts: Sequence[Concept]) -> tuple[list[Row], list[Row]]:
    """Forget: train questions about a removed concept whose answer is it. Retain: every other train
    row (other concepts of the same kinds and the other question kinds).

    Both keep the forget rows' modality - rows with an image when any forget row has one, text-only
    rows otherwise - since a batch is all one or the other: a VLM trains on its image questions (the
    world's text facts stay out, they measure utility), a text model on its text rows.
    """
    train = [r for r in rows if r.split == "train"]

    def forgets(r: Row) -> bool:
        return any(c.asked_by(r) for c in concepts)

    images = any(forgets(r) and r.image is not None for r in train)
    train = [r for r in train if (r.image is not None) == images]
    forget = [r for r in train if forgets(r)]
    retain = [r for r in train if not forgets(r)]
    return forget, retain


@dataclass
class TrainData:
    """The batches a run draws from, encoded once per setting and shared by every sweep point."""

    forget: list[Batch]
    retain: list[Batch]
    refusal: list[Batch]
    """The forget batches with the answer replaced by the refusal (PO's targets)."""


def encode_train_data(
    lm: LoadedModel,
    forget: Sequence[Row],
    retain: Sequence[Row],
    steps: int,
    batch_size: int,
    seed: int,
    refusal: str = "I don't know.",
) -> TrainData:
    """``steps`` seeded batches from each pool (sampled with replacement across steps)."""
    rng = random.Random(seed)
    f_rows = [rng.sample(list(forget), min(batch_size, len(forget))) for _ in range(steps)]
    r_rows = [rng.sample(list(retain), min(batch_size, len(retain))) for _ in range(steps)]
    return TrainData(
        forget=[encode_batch(lm, b) for b in f_rows],
        retain=[encode_batch(lm, b) for b in r_rows],
        refusal=[encode_batch(lm, [replace(r, answer=refusal) for r in b]) for b in f_rows],
    )


def answer_logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """[N, V] logits at the answer positions of the batch (N = answer tokens in the batch)."""
    return model(**batch.inputs).logits[batch.answer_mask]


def answer_nll(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token NLL over the answer tokens (EOS included)."""
    return F.cross_entropy(answer_logits(model, batch), batch.targets[batch.answer_mask])


def sequence_logprob(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """[B] log pi(answer | prompt): the sum of the answer tokens' log-probs, per row (NPO's unit)."""
    logp = model(**batch.inputs).logits.log_softmax(-1)
    tok = logp.gather(-1, batch.targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * batch.answer_mask).sum(1)


def npo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO (Zhang et al. 2024): -(2/beta) E[log sigmoid(-beta log(pi/pi_ref))]. Bounded below by 0,
    unlike GA's -NLL, so it slows down once the forget answer is unlikely instead of diverging."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp)).mean()


def kl_to_reference(model: torch.nn.Module, ref_logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean KL(p_ref || p_model) over the answer positions: keeps retain answers where they were."""
    logq = answer_logits(model, batch).log_softmax(-1)
    logp = ref_logits.log_softmax(-1)
    return F.kl_div(logq, logp, log_target=True, reduction="batchmean")


def method_loss(
    cfg: BaselineConfig,
    model: torch.nn.Module,
    reference: torch.nn.Module,
    forget: Batch,
    retain: Batch,
    refusal: Batch,
) -> torch.Tensor:
    """The objective of one step. ``reference`` is the frozen original (KL's and NPO's anchor)."""
    if cfg.method == "GA":
        return -answer_nll(model, forget)
    if cfg.method == "GD":
        return -answer_nll(model, forget) + answer_nll(model, retain)
    if cfg.method == "KL":
        with torch.no_grad():
            ref = answer_logits(reference, retain)
        return -answer_nll(model, forget) + kl_to_reference(model, ref, retain)
    if cfg.method == "PO":
        return answer_nll(model, refusal) + answer_nll(model, retain)
    if cfg.method == "NPO":
        with torch.no_grad():
            ref_logp = sequence_logprob(reference, forget)
        return npo_loss(sequence_logprob(model, forget), ref_logp, cfg.beta) + answer_nll(model, retain)
    raise ValueError(f"unknown method {cfg.method!r}")


class _Disabled(torch.nn.Module):
    """The PEFT model with its adapters switched off: the original, without a second copy."""

    def __init__(self, peft_model: torch.nn.Module) -> None:
        super().__init__()
        self.peft_model = peft_model

    def forward(self, **inputs: torch.Tensor) -> object:
        with self.peft_model.disable_adapter():  # type: ignore[operator]
            return self.peft_model(**inputs)


def unlearn(
    model: torch.nn.Module,
    data: TrainData,
    cfg: BaselineConfig,
    on_step: Callable[[int, torch.nn.Module], None] | None = None,
) -> tuple[torch.nn.Module, list[float]]:
    """Train a copy of ``model`` with one baseline; returns (plain unlearned model, loss per step).

    The input model is left untouched (it is the next sweep point's start and NPO/KL's reference).
    ``on_step``: as for ``train_copy`` (compare scores validation rows there to choose the steps).
    """

    def loss(student: torch.nn.Module, reference: torch.nn.Module, step: int) -> torch.Tensor:
        i = step % len(data.forget)
        return method_loss(cfg, student, reference, data.forget[i], data.retain[i], data.refusal[i])

    return train_copy(model, cfg, loss, on_step)


StepLoss = Callable[[torch.nn.Module, torch.nn.Module, int], torch.Tensor]
"""(student, frozen reference, step index) -> the loss of that step."""


def train_copy(
    model: torch.nn.Module,
    cfg: BaselineConfig,
    loss: StepLoss,
    on_step: Callable[[int, torch.nn.Module], None] | None = None,
) -> tuple[torch.nn.Module, list[float]]:
    """``cfg.steps`` AdamW steps of ``loss`` on a copy of ``model`` (full or LoRA, merged back), the
    loop every baseline and every relearning attack share. ``on_step(steps done, student)`` sees the
    student in eval mode after each step (a LoRA student unmerged), e.g. to score it mid-run."""
    torch.manual_seed(cfg.seed)
    student = copy.deepcopy(model)
    for p in student.parameters():
        p.requires_grad_(False)
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, lora_dropout=0.0, target_modules=lora_targets(student)
        )
        with warnings.catch_warnings():  # PEFT asks transformers 5 a deprecated question; not ours
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
            student = get_peft_model(student, lora)
        reference: torch.nn.Module = _Disabled(student)
        params = [p for p in student.parameters() if p.requires_grad]
    else:
        reference = model
        params = text_parameters(student)
        for p in params:
            p.requires_grad_(True)
    student.train()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    losses = []
    for step in range(cfg.steps):
        value = loss(student, reference, step)
        opt.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(value.detach()))
        if on_step is not None:
            student.eval()
            on_step(step + 1, student)
            student.train()
    if cfg.lora:
        student = student.merge_and_unload()  # type: ignore[operator]
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    return student, losses
