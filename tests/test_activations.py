from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sauce_export.activations import ActivationStore, CollectConfig, collect
from sauce_export.data import read_rows
from sauce_export.lm import encode_batch, load_model


@pytest.fixture(scope="module")
def lm(tiny_llava_dir: Path):  # type: ignore[no-untyped-def]
    return load_model(str(tiny_llava_dir))


def _all(store: ActivationStore) -> dict[str, torch.Tensor]:
    shards = list(store.shards())
    return {f: torch.cat([getattr(s, f) for s in shards]) for f in ("acts", "row", "pos", "image", "answer")}


def test_collect_shards_match_a_direct_forward(lm, tiny_world: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rows = read_rows(tiny_world / "train.jsonl")[:24]
    store = collect(
        lm,
        rows,
        CollectConfig(site="layers.1", batch_size=8, shard_tokens=300),
        tmp_path / "a",
        progress=False,
    )
    assert len(store.manifest["shards"]) > 1  # memory bounded by a shard, not the whole set
    got = _all(store)
    with torch.no_grad():
        hidden = lm.model(
            **encode_batch(lm, rows[:8]).inputs,
            output_hidden_states=True,
        ).hidden_states[2]
    first = got["row"] == 0
    # BOS (position 0) is never stored; everything else of row 0 equals the model's own hidden state.
    assert int(got["pos"][first].min()) == 1
    length = int(got["pos"][first].max()) + 1
    assert torch.allclose(got["acts"][first], hidden[0, 1:length], atol=1e-5)
    image_id = lm.image_token_id
    assert int(got["image"][first].sum()) == lm.model.config.image_seq_length and image_id is not None
    assert got["answer"][first].sum() >= 2  # answer tokens + EOS are flagged


def test_collect_scope_image_keeps_only_image_tokens(lm, tiny_world: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rows = read_rows(tiny_world / "train.jsonl")[:8]
    store = collect(
        lm,
        rows,
        CollectConfig(site="layers.1", scope="image", batch_size=8),
        tmp_path / "img",
        progress=False,
    )
    got = _all(store)
    assert bool(got["image"].all()) and got["acts"].shape[0] == 8 * lm.model.config.image_seq_length


def test_interrupted_collection_resumes_to_the_same_result(lm, tiny_world: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rows = read_rows(tiny_world / "train.jsonl")[:32]
    cfg = CollectConfig(site="layers.0", batch_size=8, shard_tokens=200)
    full = _all(collect(lm, rows, cfg, tmp_path / "full", progress=False))

    calls = {"n": 0}
    original_forward = lm.model.forward

    def flaky(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original_forward(*args, **kwargs)

    lm.model.forward = flaky
    with pytest.raises(KeyboardInterrupt):
        collect(lm, rows, cfg, tmp_path / "resumed", progress=False)
    lm.model.forward = original_forward
    partial = ActivationStore(tmp_path / "resumed")
    assert not partial.manifest["complete"] and 0 < partial.manifest["done_rows"] < len(rows)
    resumed = _all(collect(lm, rows, cfg, tmp_path / "resumed", progress=False))
    for field in full:
        assert torch.equal(full[field], resumed[field]), field
