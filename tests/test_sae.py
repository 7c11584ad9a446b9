"""SAE training, stats and the three on-disk formats (ours, SAELens, sparsify)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from sauce_export.errors import InputError
from sauce_export.sae.formats import load_sae, same_model, save_sae
from sauce_export.sae.model import SAE, SaeConfig
from sauce_export.sae.train import SaeStats, TrainConfig, sae_stats, train_sae


def random_dictionary(n_atoms: int, d_in: int, seed: int) -> torch.Tensor:
    """Unit-norm atoms. Use a seed other than the SAE's: SAE.reset_parameters(seed) draws the same
    Gaussian stream and would start on the answer."""
    atoms = torch.randn(n_atoms, d_in, generator=torch.Generator().manual_seed(seed))
    return atoms / atoms.norm(dim=1, keepdim=True)


def planted(n: int, atoms: torch.Tensor, mean_active: float, seed: int) -> torch.Tensor:
    """Tokens that are sparse non-negative mixtures of ``atoms`` (Zipf-ish frequencies), plus a
    little noise and a large common offset, as residual activations have."""
    g = torch.Generator().manual_seed(seed)
    n_atoms, d_in = atoms.shape
    freq = torch.arange(1, n_atoms + 1).float() ** -0.5
    freq *= mean_active / freq.sum()
    active = torch.rand(n, n_atoms, generator=g) < freq
    codes = active * (torch.empty(n, n_atoms).exponential_(1.0, generator=g) + 0.5)
    offset = 3.0 * torch.randn(d_in, generator=torch.Generator().manual_seed(0))
    return codes @ atoms + 0.02 * torch.randn(n, d_in, generator=g) + offset


class ShardStore:
    """A re-iterable store yielding one shard at a time, like an activation cache on disk."""

    def __init__(self, x: torch.Tensor, shard: int) -> None:
        self.x, self.shard = x, shard

    def __iter__(self):
        return iter(self.x.split(self.shard))


# ------------------------------------------------------------------------------------------ training


def test_train_topk_recovers_planted_dictionary():
    atoms = random_dictionary(192, 64, seed=7)
    x = planted(40_000, atoms, mean_active=4, seed=1)
    cfg = TrainConfig(expansion=4, k=12, epochs=8, batch_size=1024)
    sae, stats = train_sae(ShardStore(x, 7_000), 64, cfg, progress=False)
    assert stats.fvu < 0.10 and stats.dead_frac <= 0.05 and stats.l0 <= cfg.k, stats
    again = sae_stats(sae, x)  # the returned stats are the data's, however it is sharded
    assert (again.fvu, again.l0, again.dead_frac) == pytest.approx((stats.fvu, stats.l0, stats.dead_frac))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(256))
    # It reads raw activations (the offset went into b_dec), found the atoms, and generalises.
    cos = (atoms @ sae.W_dec.T).max(dim=1).values
    assert cos.median() > 0.93 and (cos > 0.9).float().mean() > 0.6, cos
    assert sae_stats(sae, planted(5_000, atoms, mean_active=4, seed=2)).fvu < 0.11


def test_train_relu_and_jumprelu_fit():
    x = planted(20_000, random_dictionary(32, 16, seed=7), mean_active=3, seed=1)
    for kind, penalty in (("relu", {"l1_coeff": 0.3}), ("jumprelu", {"l0_coeff": 3e-2})):
        cfg = TrainConfig(kind=kind, expansion=4, epochs=15, batch_size=512, **penalty)  # type: ignore[arg-type]
        sae, stats = train_sae(x, 16, cfg, progress=False)
        assert sae.cfg.kind == kind
        assert stats.fvu < 0.2 and stats.l0 < 8, (kind, stats)  # sparse: well under d_in=16 active


def test_train_is_deterministic_and_accepts_shards():
    x = planted(6_000, random_dictionary(32, 16, seed=7), mean_active=3, seed=1)
    cfg = TrainConfig(expansion=4, k=4, steps=15, batch_size=512, seed=3)
    a, _ = train_sae(x, 16, cfg, progress=False)
    b, _ = train_sae(x, 16, cfg, progress=False)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    c, _ = train_sae([x[:2_500], x[2_500:]], 16, cfg, progress=False)
    assert not torch.equal(a.W_dec, c.W_dec)  # other batches, same kind of result
    with pytest.raises(InputError) as err:
        train_sae(x, 17, cfg, progress=False)
    assert err.value.field == "d_in"


def test_sae_stats_hand_made():
    sae = SAE(SaeConfig(d_in=2, d_sae=3, kind="relu"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))  # latent 2 can never fire
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])  # the last token is not reconstructed
    # squared error 1; variance around the mean (0, 2/3): 1 + 4/9 + 16/9 + 1 + 4/9 = 14/3
    expected = SaeStats(fvu=3 / 14, l0=2 / 3, dead_frac=1 / 3)
    for data in (x, [x[:1], x[1:]]):
        got = sae_stats(sae, data)
        assert got.fvu == pytest.approx(expected.fvu) and got.l0 == pytest.approx(expected.l0)
        assert got.dead_frac == pytest.approx(expected.dead_frac)


# ------------------------------------------------------------------------------------- our format


def _random_sae(kind: str = "jumprelu", **cfg) -> SAE:
    sae = SAE(SaeConfig(d_in=16, d_sae=64, kind=kind, k=4, **cfg))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        sae.threshold.abs_()
    return sae


def test_save_load_round_trip_is_bit_exact(tmp_path: Path):
    sae = _random_sae(site="layers.2", model="org/tiny-llama", extra={"note": "x"})
    save_sae(sae, tmp_path / "sae")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # no temporary left behind
    again = load_sae(tmp_path / "sae")
    assert again.cfg == sae.cfg
    for (name, p), q in zip(sae.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(p, q) and p.dtype == q.dtype, name
    save_sae(again, tmp_path / "sae")  # overwriting our own SAE is fine
    assert torch.equal(load_sae(tmp_path / "sae" / "sae.safetensors").W_enc, sae.W_enc)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(InputError) as err:
        save_sae(sae, tmp_path / "other")
    assert err.value.field == "directory"


def test_mismatches_name_the_field(tmp_path: Path):
    save_sae(_random_sae(site="layers.2", model="org/tiny-llama"), tmp_path / "sae")
    ok = load_sae(tmp_path / "sae", d_in=16, site="model.language_model.layers.2", model="/ckpts/tiny-llama/")
    assert ok.cfg.site == "layers.2"
    bad = {"d_in": {"d_in": 32}, "site": {"site": "layers.3.mlp"}, "model": {"model": "org/other"}}
    for field, kwargs in bad.items():
        with pytest.raises(InputError) as err:
            load_sae(tmp_path / "sae", where="recipe.sae", **kwargs)
        assert err.value.field == field and err.value.where == "recipe.sae"
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "cfg.json").write_text(json.dumps({"hello": 1}))
    (tmp_path / "junk" / "sae.safetensors").write_bytes(b"")
    for path, field in ((tmp_path / "junk", "format"), (tmp_path / "missing", "path")):
        with pytest.raises(InputError) as err:
            load_sae(path)
        assert err.value.field == field
    assert same_model("EleutherAI/pythia-70m", "pythia-70m") and not same_model("gpt2", "gpt2-xl")


# --------------------------------------------------------------------------------- foreign formats


def _randomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_saelens_directories(tmp_path: Path):
    saes = pytest.importorskip("sae_lens.saes")
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.training.activation_scaler import ActivationScaler, ActivationWhitening

    meta = {"model_name": "gpt2", "hook_name": "blocks.2.hook_resid_post"}
    variants = {
        "standard": (saes.StandardSAE, saes.StandardSAEConfig, {}),
        "standard_no_bdec_in": (saes.StandardSAE, saes.StandardSAEConfig, {"apply_b_dec_to_input": False}),
        "topk": (saes.TopKSAE, saes.TopKSAEConfig, {"k": 5}),
        "topk_rescaled": (saes.TopKSAE, saes.TopKSAEConfig, {"k": 5, "rescale_acts_by_decoder_norm": True}),
        "jumprelu": (saes.JumpReLUSAE, saes.JumpReLUSAEConfig, {}),
    }
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))
    for i, (name, (cls, cfg_cls, kwargs)) in enumerate(variants.items()):
        lib = cls(cfg_cls(d_in=16, d_sae=64, metadata=SAEMetadata(**meta), **kwargs))
        _randomise(lib, i)  # thresholds of both signs, decoder rows of any norm
        lib.save_model(tmp_path / name)
        ours = load_sae(tmp_path / name, d_in=16, site="layers.2", model="openai-community/gpt2")
        f = lib.encode(x).detach()
        torch.testing.assert_close(ours.encode(x), f, atol=1e-5, rtol=0, msg=name)
        torch.testing.assert_close(ours.decode(f), lib.decode(f).detach(), atol=1e-5, rtol=0, msg=name)
        assert (ours.cfg.site, ours.cfg.model, ours.cfg.extra["format"]) == ("layers.2", "gpt2", "saelens")
    for field, kwargs in {
        "d_in": {"d_in": 8},
        "site": {"site": "layers.1"},
        "model": {"model": "gpt2-xl"},
    }.items():
        with pytest.raises(InputError) as err:
            load_sae(tmp_path / "topk", **kwargs)
        assert err.value.field == field

    # Affine input normalisations are folded as SAELens' own fold_* methods do; per-token ones refused.
    g = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    m = q * torch.rand(16, generator=g).add(0.5)
    scalers = {
        "expected_average_only_in": ActivationScaler(scaling_factor=0.37),
        "covariance_whitening": ActivationScaler(
            whitening=ActivationWhitening(
                mean=torch.randn(16, generator=g), matrix=m, inverse_matrix=torch.linalg.inv(m)
            )
        ),
    }
    for norm, scaler in scalers.items():
        lib = saes.StandardSAE(
            saes.StandardSAEConfig(
                d_in=16, d_sae=64, normalize_activations=norm, metadata=SAEMetadata(**meta)
            )
        )
        _randomise(lib, 7)
        lib.save_model(tmp_path / norm)
        with pytest.raises(InputError) as err:  # statistics missing: never silently skipped
            load_sae(tmp_path / norm)
        assert err.value.field == "normalize_activations"
        scaler.save(str(tmp_path / norm / "activation_scaler.json"))
        with pytest.warns(UserWarning, match="normalised activations"):
            ours = load_sae(tmp_path / norm)
        assert ours.cfg.extra["activation_normalization"] == norm
        if scaler.scaling_factor is not None:
            lib.fold_activation_norm_scaling_factor(scaler.scaling_factor)
        else:
            wh = scaler.whitening
            lib.fold_activation_whitening(wh.mean, wh.matrix, wh.inverse_matrix)
        f = lib.encode(x).detach()
        torch.testing.assert_close(ours.encode(x), f, atol=1e-5, rtol=1e-5, msg=norm)
        torch.testing.assert_close(ours.decode(f), lib.decode(f).detach(), atol=1e-5, rtol=1e-5, msg=norm)
    lib = saes.StandardSAE(saes.StandardSAEConfig(d_in=16, d_sae=64, normalize_activations="layer_norm"))
    lib.save_model(tmp_path / "ln")
    with pytest.raises(InputError) as err:
        load_sae(tmp_path / "ln")
    assert err.value.field == "normalize_activations"


def test_sparsify_directories(tmp_path: Path):
    sparsify = pytest.importorskip("sparsify")
    from sparsify.__main__ import RunConfig

    run = tmp_path / "run"
    for seed, hook in enumerate(("layers.2", "layers.3")):
        lib = sparsify.SparseCoder(16, sparsify.SparseCoderConfig(num_latents=64, k=5))
        _randomise(lib, seed)
        lib.save_to_disk(run / hook)
    RunConfig(sae=sparsify.SparseCoderConfig(num_latents=64, k=5), model="EleutherAI/pythia-70m").save_json(
        str(run / "config.json")
    )
    ours = load_sae(run, site="model.layers.2", d_in=16, model="pythia-70m")
    assert (ours.cfg.site, ours.cfg.model, ours.cfg.k) == ("layers.2", "EleutherAI/pythia-70m", 5)
    lib = sparsify.SparseCoder.load_from_disk(run / "layers.2")
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = lib.encode(x)
        f = torch.zeros(256, 64).scatter(1, out.top_indices, out.top_acts)
        torch.testing.assert_close(ours.encode(x), f, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            ours.decode(f), lib.decode(out.top_acts, out.top_indices), atol=1e-5, rtol=0
        )
    assert load_sae(run / "layers.3").cfg.site == "layers.3"
    cases = {
        "site": (run, {}),
        "model": (run / "layers.2", {"model": "gpt2"}),
        "d_in": (run, {"site": "layers.3", "d_in": 8}),
    }
    for field, (path, kwargs) in cases.items():
        with pytest.raises(InputError) as err:
            load_sae(path, **kwargs)
        assert err.value.field == field


@pytest.mark.slow
def test_train_benchmark_d128():
    """The target use: d_in=128, 200k tokens, defaults; FVU <= 0.10, <= 10% dead, ~1 minute."""
    x = planted(200_000, random_dictionary(512, 128, seed=1234), mean_active=8, seed=1234)
    start = time.perf_counter()
    _, stats = train_sae(x, 128, TrainConfig(), progress=False)
    elapsed = time.perf_counter() - start
    print(f"benchmark: {stats} in {elapsed:.1f} s")
    assert stats.fvu <= 0.10 and stats.dead_frac <= 0.10
