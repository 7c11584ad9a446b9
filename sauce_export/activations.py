"""Collect site activations into safetensors shards on disk, resumably, memory bounded by one shard.

Each shard holds ``acts [n, d]`` plus per-token metadata (``row`` index into the source rows,
``pos``, ``image`` token flag, ``answer`` flag), so later stages pick concept tokens, prompt-only
tokens or image tokens without running the model again. BOS is never stored: a latent that fires
on BOS (which the SAE never saw) would otherwise top the concept scores (DESIGN §6).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sauce_export.architectures import resolve_site
from sauce_export.data import Row
from sauce_export.errors import InputError
from sauce_export.hooks import register_output_hook
from sauce_export.lm import LoadedModel, batches
from sauce_export.progress import bar

Scope = str  # "all" | "image" | "text"


@dataclass(frozen=True)
class CollectConfig:
    """How activations are collected (part of the stage hash)."""

    site: str
    scope: Scope = "all"
    batch_size: int = 64
    shard_tokens: int = 65536
    dtype: str = "float32"
    """Of the stored activations (the pipeline passes the model's unless ``collect.dtype`` is set)."""


@dataclass
class Shard:
    acts: torch.Tensor
    row: torch.Tensor
    pos: torch.Tensor
    image: torch.Tensor
    answer: torch.Tensor


class ActivationStore:
    """A directory of shards; iterating yields one shard at a time (re-iterable)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.manifest = json.loads((self.directory / "manifest.json").read_text())

    @property
    def d_in(self) -> int:
        return int(self.manifest["d_in"])

    @property
    def tokens_stored(self) -> int:
        """Activations in the store (0 for a store written before the count was kept)."""
        return int(self.manifest.get("tokens", 0))

    def shards(self) -> Iterator[Shard]:
        for name in self.manifest["shards"]:
            t = load_file(self.directory / name)
            yield Shard(t["acts"], t["row"], t["pos"], t["image"].bool(), t["answer"].bool())

    def part(self, rank: int, world: int) -> ActivationStore:
        """The shards rank ``rank`` of ``world`` trains on: the ones it collected when this store was
        collected by ``world`` ranks, else every world-th shard from ``rank`` (disjoint, covering)."""
        view = ActivationStore.__new__(ActivationStore)
        view.directory = self.directory
        parts = self.manifest.get("parts")
        shards = parts[rank] if parts and len(parts) == world else self.manifest["shards"][rank::world]
        view.manifest = {**self.manifest, "shards": shards}
        return view

    def tokens(self, keep: Callable[[Shard], torch.Tensor] | None = None) -> Iterator[torch.Tensor]:
        """Activation chunks ``[n, d]``, optionally filtered per token by ``keep(shard) -> bool mask``."""
        for shard in self.shards():
            yield shard.acts if keep is None else shard.acts[keep(shard)]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.tokens()


def _token_mask(lm: LoadedModel, ids: torch.Tensor, attention: torch.Tensor, scope: Scope) -> torch.Tensor:
    keep = attention.bool().clone()
    bos = getattr(lm.tokenizer, "bos_token_id", None)
    if bos is not None:
        keep &= ids != bos
    image_id = lm.image_token_id
    if scope != "all" and image_id is not None:
        keep &= (ids == image_id) if scope == "image" else (ids != image_id)
    return keep


@torch.no_grad()
def collect(
    lm: LoadedModel,
    rows: Sequence[Row],
    cfg: CollectConfig,
    out: Path,
    progress: bool = True,
    part: tuple[int, int] = (0, 1),
) -> ActivationStore:
    """Run the model over ``rows`` and store the site's activations; resumes a partial ``out``.

    ``part=(rank, world)``: only every world-th row from ``rank`` (in the fixed order below), with
    the stored ``row`` indices still into all of ``rows`` (``merge_parts`` then lists every part)."""
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    manifest = {
        "config": asdict(cfg),
        "rows": len(rows),
        "done_rows": 0,
        "shards": [],
        "d_in": 0,
        "complete": False,
    }
    if part != (0, 1):
        manifest["part"] = list(part)
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if all(old.get(k) == manifest.get(k) for k in ("config", "rows", "part")):
            manifest = old
    if manifest["complete"]:
        return ActivationStore(out)

    site_module = resolve_site(lm.model, cfg.site)
    captured: list[torch.Tensor] = []
    dtype = getattr(torch, cfg.dtype)
    # Shards live on the CPU (then disk) whatever device the model runs on.
    handle = register_output_hook(
        site_module, lambda h: captured.append(h.detach().to("cpu", dtype)) and None
    )
    buffer: list[Shard] = []

    def flush(processed: int) -> None:
        if buffer:
            merged = {
                f: torch.cat([getattr(s, f) for s in buffer])
                for f in ("acts", "row", "pos", "image", "answer")
            }
            merged["image"], merged["answer"] = (
                merged["image"].to(torch.uint8),
                merged["answer"].to(torch.uint8),
            )
            name = f"shard_{len(manifest['shards']):05d}.safetensors"
            tmp = out / f".{name}.tmp"
            save_file({k: v.contiguous() for k, v in merged.items()}, tmp)
            os.replace(tmp, out / name)
            manifest["shards"].append(name)
            manifest["tokens"] = manifest.get("tokens", 0) + merged["acts"].shape[0]
            buffer.clear()
        manifest["done_rows"] = processed
        manifest_path.write_text(json.dumps(manifest, indent=1))

    # A fixed order (image rows first, as batches() groups them); resuming skips flushed chunks.
    order = sorted(range(len(rows)), key=lambda i: rows[i].image is None)[part[0] :: part[1]]
    start = manifest["done_rows"]
    counter = bar(len(order), f"collect {cfg.site}", progress, initial=start)
    try:
        for chunk_start in range(start, len(order), cfg.batch_size):
            chunk = order[chunk_start : chunk_start + cfg.batch_size]
            index_of = {id(rows[i]): i for i in chunk}
            for batch in batches(lm, [rows[i] for i in chunk], cfg.batch_size):
                captured.clear()
                lm.model(**batch.inputs)
                hidden = captured[-1]
                ids, attention = batch.inputs["input_ids"].cpu(), batch.inputs["attention_mask"].cpu()
                keep = _token_mask(lm, ids, attention, cfg.scope)
                broken = (keep & ~torch.isfinite(hidden).all(-1)).any(1)
                if broken.any():
                    row = batch.rows[int(broken.nonzero()[0])]
                    problem = f"activations contain NaN or inf (row {row.id}): check the model's weights"
                    raise InputError(lm.path, cfg.site, problem)
                row_idx = torch.tensor([index_of[id(r)] for r in batch.rows]).unsqueeze(1).expand_as(ids)
                pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
                # answer_mask marks positions predicting an answer token; the tokens sit one later.
                answer = torch.zeros_like(keep)
                answer[:, 1:] = batch.answer_mask[:, :-1].cpu()
                image = ids == lm.image_token_id if lm.image_token_id is not None else torch.zeros_like(keep)
                buffer.append(Shard(hidden[keep], row_idx[keep], pos[keep], image[keep], answer[keep]))
                manifest["d_in"] = hidden.shape[-1]
            counter.update(len(chunk))
            if sum(s.acts.shape[0] for s in buffer) >= cfg.shard_tokens:
                flush(chunk_start + len(chunk))
        flush(len(order))
    finally:
        handle.remove()
        counter.close()
    manifest["complete"] = True
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return ActivationStore(out)


def merge_parts(out: Path, parts: Sequence[Path]) -> ActivationStore:
    """One store at ``out`` listing the shards of the stores in ``parts`` (subdirectories of ``out``
    that ranks collected), keeping which part each shard came from for ``ActivationStore.part``."""
    stores = [ActivationStore(p) for p in parts]
    lists = [[str(s.directory.relative_to(out) / name) for name in s.manifest["shards"]] for s in stores]
    first = stores[0].manifest
    manifest = {
        "config": first["config"],
        "rows": first["rows"],
        "done_rows": sum(s.manifest["done_rows"] for s in stores),
        "tokens": sum(s.tokens_stored for s in stores),
        "shards": [name for names in lists for name in names],
        "parts": lists,
        "d_in": max(s.d_in for s in stores),
        "complete": True,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return ActivationStore(out)
