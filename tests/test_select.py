"""Selection recovers latents planted in synthetic activations; the pick rules behave."""

from __future__ import annotations

import pytest
import torch

from sauce_export.errors import InputError
from sauce_export.sae.model import SAE, SaeConfig
from sauce_export.select import (
    ConceptStats,
    concept_stats,
    contrast_scores,
    group_sums,
    load_scores,
    saeuron_scores,
    save_scores,
    select_features,
    union_clamps,
    union_features,
)

D = 48
PLANTED = [5, 17, 33]
COMMON = 40  # fires on every token, a bit louder on the concept: mean-based scores are tempted
LEAKY = 9  # fires on most concept tokens but also on a quarter of the others


def dictionary_sae(seed: int = 0) -> SAE:
    """A ReLU SAE whose decoder is a known orthonormal dictionary, so ``encode`` recovers codes exactly."""
    sae = SAE(SaeConfig(d_in=D, d_sae=D, kind="relu"))
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(seed)))
    with torch.no_grad():
        sae.W_dec.copy_(q)
        sae.W_enc.copy_(q.T)
        sae.b_enc.fill_(-1e-3)  # float noise of the round trip must not count as firing
    return sae


def synthetic(sae: SAE, n: int, concept: bool, gen: torch.Generator) -> torch.Tensor:
    codes = torch.zeros(n, D)
    background = [i for i in range(D) if i not in [*PLANTED, COMMON, LEAKY]]
    for row in codes:
        idx = torch.tensor(background)[torch.randperm(len(background), generator=gen)[:4]]
        row[idx] = torch.rand(4, generator=gen) * 2 + 0.5
    codes[:, COMMON] = 3.0 + (1.0 if concept else 0.0)
    leak = torch.rand(n, generator=gen) < (0.9 if concept else 0.25)
    codes[leak, LEAKY] = 1.5
    if concept:
        for i in PLANTED:
            fires = torch.rand(n, generator=gen) < 0.8
            codes[fires, i] = torch.rand(int(fires.sum()), generator=gen) + 1.0
    return codes @ sae.W_dec.detach()


@pytest.fixture(scope="module")
def stats() -> ConceptStats:
    sae = dictionary_sae()
    gen = torch.Generator().manual_seed(1)
    pos = [synthetic(sae, 100, True, gen) for _ in range(3)]
    neg = [synthetic(sae, 150, False, gen) for _ in range(4)]
    return concept_stats(sae, pos, neg)


def test_stats_stream_and_count(stats: ConceptStats) -> None:
    assert (stats.n_pos, stats.n_neg) == (300, 600)
    assert stats.freq_neg[PLANTED].eq(0).all()
    assert stats.freq_pos[COMMON] == 1.0 and stats.freq_neg[COMMON] == 1.0
    assert torch.allclose(stats.mu_neg[COMMON], torch.tensor(3.0 - 1e-3, dtype=torch.float64), atol=1e-5)


def test_one_pass_group_sums_match_two_sided_stats() -> None:
    """Tokens in three groups, streamed once in mixed chunks: each group against the rest gives the
    statistics of streaming that group and the rest separately."""
    sae = dictionary_sae()
    gen = torch.Generator().manual_seed(3)
    parts = [synthetic(sae, n, concept, gen) for n, concept in ((40, True), (50, False), (30, False))]
    acts = torch.cat(parts)
    groups = torch.cat([torch.full((len(p),), g) for g, p in enumerate(parts)])
    order = torch.randperm(len(acts), generator=gen)
    sums = group_sums(sae, zip(acts[order].split(16), groups[order].split(16), strict=True), 3)
    assert sums.count.tolist() == [40, 50, 30]
    for g in range(3):
        want = concept_stats(sae, [parts[g]], [p for i, p in enumerate(parts) if i != g])
        got = sums.stats(g)
        assert (got.n_pos, got.n_neg) == (want.n_pos, want.n_neg)
        for name in ("mu_pos", "mu_neg", "freq_pos", "freq_neg"):
            assert torch.allclose(getattr(got, name), getattr(want, name), atol=1e-6), name
    assert torch.allclose(sums.means()[1], concept_stats(sae, [parts[1]], [parts[0]]).mu_pos, atol=1e-6)


def test_chunking_does_not_change_stats() -> None:
    sae = dictionary_sae()
    gen = torch.Generator().manual_seed(2)
    pos, neg = synthetic(sae, 64, True, gen), synthetic(sae, 64, False, gen)
    whole = concept_stats(sae, [pos], [neg])
    chunked = concept_stats(sae, pos.split(10), iter(neg.split(7)))
    for name in ("mu_pos", "mu_neg", "freq_pos", "freq_neg"):
        assert torch.allclose(getattr(whole, name), getattr(chunked, name), atol=1e-6)


@pytest.mark.parametrize("score", [saeuron_scores, contrast_scores])
def test_scores_rank_planted_latents_first(stats: ConceptStats, score) -> None:
    scores = score(stats)
    assert sorted(select_features(scores, top_n=3)) == PLANTED
    assert COMMON not in select_features(scores, top_n=4)


def test_contrast_penalises_collateral_firing(stats: ConceptStats) -> None:
    contrast = contrast_scores(stats)
    # LEAKY fires on 25% of other tokens: it ranks below every planted latent but above background.
    assert contrast[LEAKY] < contrast[PLANTED].min()
    assert select_features(contrast, top_n=4)[-1] == LEAKY


def test_top_n_ties_and_min_score() -> None:
    scores = torch.tensor([1.0, 2.0, 2.0, 0.0, -1.0, 2.0])
    assert select_features(scores, top_n=2) == [1, 2]
    assert select_features(scores, top_n=10) == [1, 2, 5, 0]  # 0.0 and -1.0 never qualify
    assert select_features(scores, top_n=10, min_score=1.5) == [1, 2, 5]
    assert select_features(scores, top_n=0) == []


def test_percentile() -> None:
    scores = torch.arange(100, dtype=torch.float32)
    assert select_features(scores, percentile=95) == [99, 98, 97, 96, 95]
    assert select_features(scores, percentile=100) == [99]
    assert len(select_features(scores, percentile=0)) == 99  # everything above min_score=0


def test_exactly_one_rule() -> None:
    with pytest.raises(InputError):
        select_features(torch.ones(3))
    with pytest.raises(InputError):
        select_features(torch.ones(3), top_n=1, percentile=50)
    with pytest.raises(InputError):
        select_features(torch.ones(3), percentile=150)


def test_union_features() -> None:
    assert union_features([[7, 3], [3, 1], []]) == [1, 3, 7]


def test_union_clamps_take_the_most_negative_target() -> None:
    selected = {"a": [7, 3], "b": [3, 1], "c": [9]}
    assert union_clamps(selected, {"a": -30.0, "b": -60.0, "c": 0.0}) == [-60.0, -60.0, -30.0, 0.0]
    assert union_clamps(selected, {"a": 0.0, "b": 0.0, "c": 0.0}) == [0.0] * 4


def test_save_and_load_scores(tmp_path, stats: ConceptStats) -> None:
    scores = {"alice": saeuron_scores(stats), "blue": contrast_scores(stats)}
    selected = {c: select_features(s, top_n=3) for c, s in scores.items()}
    path = save_scores(tmp_path / "scores.json", scores, selected, top=5)
    loaded, loaded_sel = load_scores(path)
    assert loaded_sel == selected
    for c, s in scores.items():
        assert torch.allclose(loaded[c].double(), s, atol=1e-6)
    import json

    summary = json.loads(path.read_text())["concepts"]["alice"]
    assert len(summary["top"]) == 5 and summary["top"][0]["feature"] == selected["alice"][0]


def test_bad_chunk_shape_is_input_error() -> None:
    with pytest.raises(InputError):
        concept_stats(dictionary_sae(), [torch.zeros(3, D + 1)], [torch.zeros(3, D)])


def test_specific_scores_demote_latents_shared_with_one_sibling() -> None:
    from sauce_export.select import specific_scores

    # latent 0: only the target; latent 1: target and sibling A equally; latent 2: everywhere.
    target = torch.tensor([1.0, 1.0, 1.0])
    sibling_a = torch.tensor([0.0, 1.0, 1.0])
    sibling_b = torch.tensor([0.0, 0.0, 1.0])
    scores = specific_scores(target, [sibling_a, sibling_b])
    assert scores.argmax().item() == 0
    assert scores[1] <= 0 and scores[2] <= 0
    assert select_features(scores, top_n=3) == [0]
