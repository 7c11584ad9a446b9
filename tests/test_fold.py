"""Folds on tiny random models: projection removes a planted span exactly, the ridge recovers a
planted linear map, and the lora and gated folds reproduce the hooked edit far better than no fold."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sauce_export.data import Concept, read_rows
from sauce_export.edit import Edit
from sauce_export.errors import InputError
from sauce_export.fold import FoldConfig, Ridge, calibration_rows, capture, fold, projection_fold, ridge_solve
from sauce_export.lm import batches, load_model
from sauce_export.patch import Growth, Patch, WeightDelta
from sauce_export.sae.model import SAE, SaeConfig
from sauce_export.verify import Variant, fidelity


def _tiny_llama(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg).eval()


def _sae(d_in: int, d_sae: int, seed: int = 0) -> SAE:
    sae = SAE(SaeConfig(d_in=d_in, d_sae=d_sae, kind="topk", k=4))
    sae.reset_parameters(seed=seed)
    return sae


def test_projection_removes_planted_span_exactly() -> None:
    model = _tiny_llama()
    sae = _sae(32, 16)
    edit = Edit(sae=sae, features=(3, 7), site="layers.1")
    patch = projection_fold(model, edit, FoldConfig(method="projection"))
    q, _ = torch.linalg.qr(sae.W_dec[[3, 7]].detach().T)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        before = model(ids, output_hidden_states=True).hidden_states[2]
        with patch.apply(model):
            after = model(ids, output_hidden_states=True).hidden_states[2]
        restored = model(ids, output_hidden_states=True).hidden_states[2]
    assert (before @ q).norm() > 0.1 * before.norm()  # the span was there
    assert (after @ q).norm() < 1e-5 * after.norm()  # and is gone after layer 1
    assert torch.equal(before, restored)  # apply() puts the weights back bit-exactly
    # embeddings, and o_proj/down_proj of layers 0 and 1
    assert len(patch.deltas) == 5 and patch.max_rank() == 2


def test_projection_refuses_tied_embeddings() -> None:
    model = _tiny_llama(tie=True)
    edit = Edit(sae=_sae(32, 16), features=(1,), site="layers.0")
    with pytest.raises(InputError, match="tied"):
        projection_fold(model, edit, FoldConfig(method="projection"))
    patch = projection_fold(model, edit, FoldConfig(method="projection", include_embed=False))
    assert "model.embed_tokens" not in patch.modules


def test_ridge_recovers_planted_linear_map() -> None:
    gen = torch.Generator().manual_seed(0)
    a_true = torch.randn(3, 20, generator=gen)
    x = torch.randn(2000, 20, generator=gen)
    c = x @ a_true.T + 1e-3 * torch.randn(2000, 3, generator=gen)
    a = ridge_solve(x.T @ x, x.T @ c, ridge=1e-6)
    assert torch.allclose(a, a_true, atol=1e-3)
    shrunk = ridge_solve(x.T @ x, x.T @ c, ridge=10.0)
    assert shrunk.norm() < 0.5 * a_true.norm()  # the ridge term really regularises


def test_patch_rejects_nan_and_missing_module() -> None:
    model = _tiny_llama()
    bad = Patch(
        (WeightDelta("model.layers.0.mlp.down_proj", torch.full((32, 1), float("nan")), torch.ones(1, 64)),)
    )
    with pytest.raises(InputError, match="NaN"):
        bad.check(model)
    missing = Patch((WeightDelta("model.layers.9.mlp.down_proj", torch.ones(32, 1), torch.ones(1, 64)),))
    with pytest.raises(InputError, match="no such module"):
        missing.check(model)


@pytest.fixture(scope="module")
def pca_edit(tiny_world, tiny_llava_dir):
    """The tiny LLaVA, its rows, and an edit whose latents really fire there: the SAE's first 8
    decoder rows are the top principal directions of layer 1's output."""
    lm = load_model(str(tiny_llava_dir))
    d = lm.model.config.text_config.hidden_size
    rows = read_rows(tiny_world / "train.jsonl")
    site_h = torch.cat(
        [h[keep] for _, keep, _, h in capture(lm, rows[:64], [], "layers.1", 16, progress=False)]
    )
    mean = site_h.mean(0)
    directions = torch.linalg.svd(site_h - mean, full_matrices=False).Vh[:8]
    sae = _sae(d, 4 * d)
    with torch.no_grad():
        sae.W_dec[:8] = directions
        sae.W_enc[:, :8] = directions.T
        sae.b_dec.copy_(mean)
    edit = Edit(sae=sae, features=tuple(range(8)), site="layers.1", image_token_id=lm.image_token_id)
    person = next(r.labels["person"] for r in rows if "person" in r.labels)
    held_out = read_rows(tiny_world / "eval.jsonl")[:48]
    return lm, rows, held_out, edit, Concept("person", person)


def _closer_than_original(lm, edit, patch, held_out) -> None:
    hooked = Variant("hooked", lm.model, lambda: edit.apply(lm.model))
    folded = fidelity(
        lm, hooked, Variant("folded", lm.model, lambda: patch.apply(lm.model)), held_out, edit, 16, False
    )
    original = fidelity(lm, hooked, Variant("original", lm.model), held_out, edit, 16, False)
    assert original["cos"] < 0.999  # the edit really changes the site
    assert folded["cos"] > original["cos"]
    assert folded["kl"] < 0.5 * original["kl"]


def test_lora_fold_tracks_hooked_edit(pca_edit) -> None:
    lm, rows, held_out, edit, concept = pca_edit
    patch = fold(lm, edit, rows, [concept], FoldConfig(method="lora", calib_rows=64, refine_steps=0), False)
    assert patch.modules == [
        "model.language_model.layers.1.self_attn.o_proj",
        "model.language_model.layers.1.mlp.down_proj",
    ]
    _closer_than_original(lm, edit, patch, held_out)


def test_gated_fold_adds_uniform_neurons_and_tracks_hooked_edit(pca_edit) -> None:
    lm, rows, held_out, edit, concept = pca_edit
    cfg = FoldConfig(method="gated", calib_rows=64, refine_steps=20)
    patch = fold(lm, edit, rows, [concept], cfg, progress=False)
    size = lm.model.config.text_config.intermediate_size
    new = patch.config_updates["text_config.intermediate_size"]
    assert new % 32 == 0 and size + 8 <= new < size + 8 + 32  # 8 neurons, padded to 32s
    assert len(patch.grows) == 3 * lm.model.config.text_config.num_hidden_layers
    for g in patch.grows:
        assert g.extra.shape[g.dim] == new - size
        assert (g.extra.abs().sum() > 0) == (".layers.1." in g.module)  # zeros on every other layer
    _closer_than_original(lm, edit, patch, held_out)
    with patch.apply(lm.model):
        assert lm.model.config.text_config.intermediate_size == new
        assert lm.model.get_submodule("model.language_model.layers.0.mlp.down_proj").in_features == new
    assert lm.model.config.text_config.intermediate_size == size  # restored


def test_zero_neurons_change_nothing(pca_edit) -> None:
    lm, _, held_out, _, _ = pca_edit
    layers = lm.model.config.text_config.num_hidden_layers
    d, n = lm.model.config.text_config.hidden_size, 32
    grows = tuple(
        Growth(f"model.language_model.layers.{i}.mlp.{name}", dim, torch.zeros(shape))
        for i in range(layers)
        for name, dim, shape in (("gate_proj", 0, (n, d)), ("up_proj", 0, (n, d)), ("down_proj", 1, (d, n)))
    )
    patch = Patch((), {}, grows)
    batch = next(iter(batches(lm, held_out[:8], 8)))
    with torch.no_grad():
        before = lm.model(**batch.inputs).logits
        with patch.apply(lm.model):
            after = lm.model(**batch.inputs).logits
    assert (before - after).abs().max() < 1e-5


def test_calibration_rows_balance_concepts_and_rest(tiny_world) -> None:
    rows = read_rows(tiny_world / "train.jsonl")
    person = next(r.labels["person"] for r in rows if "person" in r.labels)
    concepts = [Concept("person", person), Concept("event", "concert")]
    calib = calibration_rows(rows, concepts, 64, seed=0)
    pos = [r for r in calib if any(c.matches(r) for c in concepts)]
    neg = [r for r in calib if not any(c.matches(r) for c in concepts)]
    assert len(pos) == len(neg) > 0 and len({r.id for r in calib}) == len(calib)
    for c in concepts:
        mine = [r for r in pos if c.matches(r)]
        assert len(mine) >= 16 * 0.75  # each concept gets its share of the 32 positives
        assert sum(r.question_kind == c.kind for r in mine) >= 8  # questions about the concept itself
    assert calib == calibration_rows(rows, concepts, 64, seed=0)  # deterministic


def test_ridge_streams_rows_then_statistics() -> None:
    """Fewer rows than inputs: the dual solve on the rows kept; more: X^T X. Both are the ridge fit."""
    g = torch.Generator().manual_seed(0)
    for n_rows, kept_rows in ((50, True), (300, False)):
        x, c = torch.randn(n_rows, 120, generator=g, dtype=torch.float64), torch.randn(n_rows, 3, generator=g)
        fit = Ridge(1e-3)
        for start in range(0, n_rows, 37):
            fit.add(x[start : start + 37].float(), c[start : start + 37])
        assert (fit.xtx is None) == kept_rows and fit.tokens == n_rows
        expected = ridge_solve(x.T @ x, x.T @ c.double(), 1e-3)  # float64 statistics
        assert torch.allclose(fit.solve(), expected.float(), atol=1e-4, rtol=1e-3)
