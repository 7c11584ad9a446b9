"""Train the demo models on the fictitious world, on the CPU, from a seed.

``sauce-export world train`` rebuilds the shipped checkpoints: the LLaVA-architecture VLM (image
questions + text facts) and the text-only Llama (facts). Loss is cross-entropy on answer tokens
only; images are pre-processed once, since the world reuses each image for several questions.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

from sauce_export.data import Row, read_rows
from sauce_export.fsutil import atomic_dir
from sauce_export.lm import LoadedModel, answer_length, answer_targets, answer_text, batches, correct
from sauce_export.progress import bar
from sauce_export.world.generate import IMAGE_SIZE
from sauce_export.world.model import (
    CHAT_TEMPLATE,
    IMAGE_TOKEN,
    build_llama,
    build_llava,
    build_processor,
    build_tokenizer,
    save_model,
)


@dataclass
class WorldTrainConfig:
    """Training knobs for the demo models (defaults reproduce the shipped checkpoints)."""

    seed: int = 0
    steps: int = 4000
    """Optimizer steps for the VLM (the text model uses steps // 4)."""
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    fact_every: int = 6
    """Every n-th VLM step trains on the text-only fact questions."""
    threads: int = 2
    probe_weight: float = 1.0
    """Weight of the auxiliary image-label loss on pooled image tokens (0 disables it)."""


@dataclass
class _Example:
    ids: list[int]
    n_answer: int
    image: int | None


def _examples(
    lm: LoadedModel, rows: list[Row], image_index: dict[Path, int], image_tokens: int
) -> list[_Example]:
    tok = lm.tokenizer
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    out = []
    for row in rows:
        prompt, full = answer_text(lm, row)
        full_ids = tok(full).input_ids
        n_answer = answer_length(tok, prompt, full)
        ids = []
        for t in full_ids:
            ids.extend([t] * image_tokens if t == image_id else [t])
        out.append(_Example(ids, n_answer, image_index[row.image] if row.image is not None else None))
    return out


def _collate(examples: list[_Example], pixels: torch.Tensor | None, pad_id: int) -> tuple[dict, torch.Tensor]:
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = 1
    _, targets = answer_targets(ids, [len(e.ids) for e in examples], [e.n_answer for e in examples])
    inputs = {"input_ids": ids, "attention_mask": mask}
    if examples[0].image is not None and pixels is not None:
        inputs["pixel_values"] = pixels[[e.image for e in examples]]
    return inputs, targets


class _ImageProbe(torch.nn.Module):
    """Linear heads on the mean-pooled projector output, one per image label kind.

    A from-scratch VLM otherwise sits for thousands of steps at chance on image questions: the
    language model must learn to route image tokens to the answer while the vision tower has
    nothing to route yet. Supervising pooled image tokens directly makes every image token carry
    its labels early (uniform attention then already reads them). Discarded after training.
    """

    def __init__(self, model: torch.nn.Module, label_sizes: list[int]) -> None:
        super().__init__()
        width = model.config.text_config.hidden_size
        self.heads = torch.nn.ModuleList(torch.nn.Linear(width, n) for n in label_sizes)
        self.features: torch.Tensor | None = None
        self.handle = model.model.multi_modal_projector.register_forward_hook(self._capture)

    def _capture(self, _m: torch.nn.Module, _i: object, out: torch.Tensor) -> None:
        self.features = out

    def loss(self, labels: torch.Tensor) -> torch.Tensor:
        assert self.features is not None
        pooled = self.features.mean(dim=1)
        return sum(
            torch.nn.functional.cross_entropy(head(pooled), labels[:, i]) for i, head in enumerate(self.heads)
        )  # type: ignore[return-value]


def _fit(
    model: torch.nn.Module,
    groups: list[list[_Example]],
    weights: list[int],
    pixels: torch.Tensor | None,
    pad_id: int,
    steps: int,
    cfg: WorldTrainConfig,
    desc: str,
    image_labels: torch.Tensor | None = None,
    label_sizes: list[int] | None = None,
) -> float:
    rng = random.Random(cfg.seed)
    probe = _ImageProbe(model, label_sizes) if image_labels is not None and label_sizes else None
    params = list(model.parameters()) + (list(probe.parameters()) if probe else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    loss_ema = float("nan")
    counter = bar(steps, desc)
    for step in range(steps):
        group = groups[0]
        for g, every in zip(groups[1:], weights[1:], strict=True):
            if every and step % every == every - 1:
                group = g
        batch = [group[rng.randrange(len(group))] for _ in range(cfg.batch_size)]
        inputs, targets = _collate(batch, pixels, pad_id)
        logits = model(**inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        total = loss
        if probe is not None and "pixel_values" in inputs:
            total = loss + cfg.probe_weight * probe.loss(image_labels[[e.image for e in batch]])  # type: ignore[index]
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_ema = loss.item() if math.isnan(loss_ema) else 0.95 * loss_ema + 0.05 * loss.item()
        counter.update()
        if step % 20 == 0:
            counter.set_postfix(loss=f"{loss_ema:.4f}")
    counter.close()
    if probe is not None:
        probe.handle.remove()
    model.eval()
    return loss_ema


@torch.no_grad()
def accuracy_by_kind(lm: LoadedModel, rows: list[Row], batch_size: int = 128) -> dict[str, float]:
    """Exact greedy-answer accuracy per (split, question_kind)."""
    hits: dict[str, list[int]] = {}
    for batch in batches(lm, rows, batch_size):
        ok = correct(lm.model(**batch.inputs).logits, batch)
        for row, good in zip(batch.rows, ok.tolist(), strict=True):
            hits.setdefault(f"{row.split}/{row.question_kind}", []).append(int(good))
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}


def train_world_models(world_dir: Path, out_dir: Path, cfg: WorldTrainConfig) -> dict[str, object]:
    """Train both demo models from a built world; writes ``world-llava/`` and ``world-llama/``."""
    torch.set_num_threads(cfg.threads)
    start = time.time()
    train_rows = read_rows(world_dir / "train.jsonl")
    eval_rows = read_rows(world_dir / "eval.jsonl") + read_rows(world_dir / "facts.jsonl")
    image_rows = [r for r in train_rows if r.image is not None]
    fact_rows = [r for r in train_rows if r.image is None]

    texts = [f"USER: {r.prompt} ASSISTANT: {r.answer}" for r in train_rows + eval_rows]
    tokenizer = build_tokenizer(texts)
    tokenizer.chat_template = CHAT_TEMPLATE
    processor = build_processor(tokenizer, IMAGE_SIZE)
    llava = build_llava(tokenizer, IMAGE_SIZE, cfg.seed)
    lm = LoadedModel(llava, tokenizer, processor, "world-llava")

    paths = sorted({r.image for r in image_rows if r.image is not None})
    index = {p: i for i, p in enumerate(paths)}
    pixels = processor.image_processor(
        images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt"
    )["pixel_values"]
    kinds = ("person", "event", "colour", "material")
    first = {}
    for r in image_rows:
        first.setdefault(r.image, r)
    vocab = {k: sorted({r.labels[k] for r in image_rows}) for k in kinds}
    image_labels = torch.tensor([[vocab[k].index(first[p].labels[k]) for k in kinds] for p in paths])
    image_tokens = llava.config.image_seq_length
    groups = [_examples(lm, image_rows, index, image_tokens), _examples(lm, fact_rows, index, image_tokens)]
    pad = tokenizer.pad_token_id
    loss_vlm = _fit(
        llava,
        groups,
        [1, cfg.fact_every],
        pixels,
        pad,
        cfg.steps,
        cfg,
        "train world-llava",
        image_labels,
        [len(vocab[k]) for k in kinds] if cfg.probe_weight > 0 else None,
    )
    acc_vlm = accuracy_by_kind(lm, eval_rows)

    llama = build_llama(tokenizer, cfg.seed)
    text_lm = LoadedModel(llama, tokenizer, None, "world-llama")
    text_cfg = WorldTrainConfig(**{**asdict(cfg), "batch_size": 32})
    loss_llama = _fit(
        llama, [groups[1]], [1], None, pad, max(200, cfg.steps // 4), text_cfg, "train world-llama"
    )
    acc_llama = accuracy_by_kind(text_lm, [r for r in eval_rows if r.image is None])

    report = {
        "command": f"sauce-export world train --world {world_dir} --out {out_dir} --seed {cfg.seed}",
        "config": asdict(cfg),
        "seconds": round(time.time() - start, 1),
        "world-llava": {"final_loss": loss_vlm, "accuracy": acc_vlm},
        "world-llama": {"final_loss": loss_llama, "accuracy": acc_llama},
    }
    for name, model, proc in (("world-llava", llava, processor), ("world-llama", llama, None)):
        with atomic_dir(out_dir / name, overwrite=True) as tmp:
            save_model(model, tokenizer, proc, tmp)
    (out_dir / "world-models.json").write_text(json.dumps(report, indent=1))
    return report


def train_text_model(world_dir: Path, out: Path, cfg: WorldTrainConfig) -> dict[str, object]:
    """A fresh text-only Llama (the demo's shape) on a fact world's ``train.jsonl``; writes ``out``.

    The tokenizer is fitted on every split's text (a vocabulary, not answers). Accuracy per split and
    question kind is measured on validation and eval and written to ``out/training.json``.
    """
    torch.set_num_threads(cfg.threads)
    start = time.time()
    train_rows = read_rows(world_dir / "train.jsonl")
    held = read_rows(world_dir / "validation.jsonl") + read_rows(world_dir / "eval.jsonl")
    tokenizer = build_tokenizer([f"USER: {r.prompt} ASSISTANT: {r.answer}" for r in train_rows + held])
    tokenizer.chat_template = CHAT_TEMPLATE
    model = build_llama(tokenizer, cfg.seed)
    lm = LoadedModel(model, tokenizer, None, str(out))
    examples = _examples(lm, train_rows, {}, 0)
    loss = _fit(model, [examples], [1], None, tokenizer.pad_token_id, cfg.steps, cfg, f"train {out.name}")
    report = {
        "config": asdict(cfg),
        "seconds": round(time.time() - start, 1),
        "final_loss": loss,
        "accuracy": accuracy_by_kind(lm, held),
    }
    with atomic_dir(out, overwrite=True) as tmp:
        save_model(model, tokenizer, None, tmp)
        (tmp / "training.json").write_text(json.dumps(report, indent=1))
    return report
