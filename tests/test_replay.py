"""Replay: the layers above the site re-run on stored site outputs give the full hooked forward's logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sauce_export.data import read_rows
from sauce_export.edit import Edit
from sauce_export.evaluate.metrics import correctness
from sauce_export.lm import batches, load_model
from sauce_export.replay import Replay
from sauce_export.sae.model import SAE, SaeConfig


@pytest.mark.parametrize(("site", "exact"), [("layers.1", True), ("layers.1.mlp", False)])
def test_replay_matches_the_hooked_model(
    tiny_world: Path, tiny_llava_dir: Path, site: str, exact: bool
) -> None:
    lm = load_model(str(tiny_llava_dir))
    rows = read_rows(tiny_world / "validation.jsonl")[:24] + read_rows(tiny_world / "train.jsonl")[-8:]
    assert {r.image is None for r in rows} == {True, False}  # image and text batches
    encoded = list(batches(lm, rows, 16))
    replay = Replay(lm.model, site, encoded)
    # a residual site is replayed from the stored outputs; a site inside a layer runs full forwards
    assert replay.exact is exact and len(replay) == len(encoded) == 3
    assert replay.correctness(None) == correctness(lm.model, encoded)
    d = lm.model.config.text_config.hidden_size
    sae = SAE(SaeConfig(d_in=d, d_sae=4 * d, kind="topk", k=8, site=site))
    sae.reset_parameters(seed=1)
    for scope in ("all", "text"):
        edit = Edit(
            sae, tuple(range(0, 4 * d, 3)), site, -40.0, scope=scope, image_token_id=lm.image_token_id
        )
        for index, batch in enumerate(encoded):
            with torch.no_grad():
                original = lm.model(**batch.inputs).logits
                with edit.apply(lm.model):
                    hooked = lm.model(**batch.inputs).logits
            assert (hooked - original).abs().max() > 0.1  # the edit moves the logits
            assert (replay.logits(edit, index) - hooked).abs().max() < 1e-4
        with edit.apply(lm.model):
            assert replay.correctness(edit) == correctness(lm.model, encoded)
    assert replay.correctness(None, 1, 2).keys() == {r.id for r in encoded[1].rows}
