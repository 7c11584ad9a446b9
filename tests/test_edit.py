"""The reference edit: the delta-clamp formula, bit-exactness where nothing fires, hooks that go away."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sauce_export.architectures import resolve_site
from sauce_export.edit import Edit
from sauce_export.errors import InputError
from sauce_export.hooks import register_output_hook
from sauce_export.sae.model import SAE, SaeConfig

D = 64
SITE = "layers.1"
IMAGE_ID = 7


def topk_sae(seed: int = 0) -> SAE:
    sae = SAE(SaeConfig(d_in=D, d_sae=256, kind="topk", k=8, site=SITE))
    sae.reset_parameters(seed=seed)
    return sae


def dictionary_sae() -> SAE:
    """ReLU SAE over an orthonormal dictionary: a latent's pre-activation reads its coefficient exactly."""
    sae = SAE(SaeConfig(d_in=D, d_sae=D, kind="relu"))
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(3)))
    with torch.no_grad():
        sae.W_dec.copy_(q)
        sae.W_enc.copy_(q.T)
    return sae


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=D,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


def input_ids(batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(8, 96, (batch, seq), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 1
    return ids


class Recorder:
    """Records the site's (possibly edited) output; registered after the edit it sees the edit."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.seen: list[torch.Tensor] = []
        self.handle = register_output_hook(module, self._record)

    def _record(self, h: torch.Tensor) -> None:
        self.seen.append(h.detach().clone())


def site_acts(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    rec = Recorder(resolve_site(model, SITE))
    with torch.no_grad():
        model(input_ids=ids)
    rec.handle.remove()
    return rec.seen[0]


def late_firing_features(sae: SAE, h: torch.Tensor, n: int = 2, min_pos: int = 3) -> list[int]:
    """Latents that fire somewhere but never before ``min_pos``, so every row has an untouched prefix."""
    fires = sae.encode(h) > 0  # [batch, seq, d_sae]
    ok = fires.any(1).any(0) & ~fires[:, :min_pos].any(1).any(0)
    feats = ok.nonzero().flatten().tolist()[:n]
    assert len(feats) == n, "seed gives too few late-firing latents"
    return feats


def first_firing(sae: SAE, h: torch.Tensor, feats: list[int]) -> list[int | None]:
    fires = (sae.encode(h)[..., feats] > 0).any(-1)
    return [int(row.nonzero()[0]) if row.any() else None for row in fires]


def check_untouched_prefix(before: torch.Tensor, after: torch.Tensor, p0: list[int | None]) -> bool:
    """Logits before the first edited position are bit-equal; at it they differ."""
    for b, p in enumerate(p0):
        end = before.shape[1] if p is None else p
        if not torch.equal(before[b, :end], after[b, :end]):
            return False
        if p is not None and torch.equal(before[b, p], after[b, p]):
            return False
    return True


# --- pure tensor semantics ---------------------------------------------------------------------------


def reference_edit(
    sae: SAE, h: torch.Tensor, feats: list[int], clamp: float | tuple[float, ...], mult: float | None
) -> torch.Tensor:
    """The formula, token by token and feature by feature, in float64."""
    f = sae.encode(h).double()
    out = h.double().clone().reshape(-1, D)
    flat = f.reshape(-1, f.shape[-1])
    for t in range(out.shape[0]):
        for j, i in enumerate(feats):
            if flat[t, i] > 0:
                c = clamp[j] if isinstance(clamp, tuple) else clamp
                target = mult * flat[t, i] if mult is not None else c
                out[t] += (target - flat[t, i]) * sae.W_dec[i].double()
    return out.reshape(h.shape)


@pytest.mark.parametrize(
    ("clamp", "mult"), [(0.0, None), (-2.0, None), (0.0, -3.0), ((0.0, -2.0, -5.0), None)]
)
def test_edit_hidden_matches_formula(clamp: float | tuple[float, ...], mult: float | None) -> None:
    sae = topk_sae()
    h = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(1))
    feats = (sae.encode(h) > 0).sum((0, 1)).argsort(descending=True)[:3].tolist()  # frequent latents
    edit = Edit(sae, tuple(feats), SITE, clamp=clamp, multiplier=mult)
    with torch.no_grad():
        out = edit.edit_hidden(h)
        want = reference_edit(sae, h, feats, clamp, mult)
        assert torch.allclose(out.double(), want, atol=1e-5)
        assert torch.allclose(h + edit.coefficients(h) @ sae.W_dec[feats], out, atol=1e-6)
    untouched = ~(sae.encode(h)[..., feats] > 0).any(-1)
    assert untouched.any() and (~untouched).any()
    assert torch.equal(out[untouched], h[untouched])
    assert torch.equal(edit.coefficients(h)[untouched], torch.zeros(int(untouched.sum()), 3))


@pytest.mark.parametrize(("clamp", "mult", "expect"), [(-1.5, None, "clamp"), (0.0, -2.0, "mult")])
def test_edited_latent_reads_its_target(clamp: float, mult: float | None, expect: str) -> None:
    """On an exact dictionary, the edited latent's pre-activation equals the target: c or gamma * f."""
    sae = dictionary_sae()
    h = torch.randn(3, 5, D, generator=torch.Generator().manual_seed(2))
    feats = [4, 11]
    edit = Edit(sae, tuple(feats), SITE, clamp=clamp, multiplier=mult)
    with torch.no_grad():
        pre_before, pre_after = sae.pre_acts(h)[..., feats], sae.pre_acts(edit.edit_hidden(h))[..., feats]
    active = pre_before > 0
    want = torch.full_like(pre_before, clamp) if expect == "clamp" else mult * pre_before
    assert torch.allclose(pre_after[active], want[active], atol=1e-5)
    # Other latents are orthogonal: untouched up to float noise.
    assert torch.allclose(pre_after[~active], pre_before[~active], atol=1e-5)


def test_clamp_everywhere_touches_inactive_tokens() -> None:
    sae = dictionary_sae()
    h = torch.randn(1, 8, D, generator=torch.Generator().manual_seed(4))
    edit = Edit(sae, (4,), SITE, clamp=-1.0, only_where_active=False)
    with torch.no_grad():
        before, pre = sae.pre_acts(h)[..., 4], sae.pre_acts(edit.edit_hidden(h))[..., 4]
    # h + (c - f) W_dec: active tokens land on c, inactive ones (f = 0) move by c as well.
    assert (before <= 0).any() and (before > 0).any()
    assert torch.allclose(pre, torch.where(before > 0, -1.0, before - 1.0), atol=1e-5)


def test_token_mask_limits_the_edit() -> None:
    sae = dictionary_sae()
    h = torch.randn(2, 6, D, generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, 2] = True
    edit = Edit(sae, (1, 2, 3), SITE, clamp=-1.0, only_where_active=False)
    out = edit.edit_hidden(h, mask)
    assert torch.equal(out[~mask], h[~mask]) and not torch.equal(out[mask], h[mask])
    with pytest.raises(ValueError):
        edit.edit_hidden(h, mask[:, :3])


# --- hooked model -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_bit_exact_where_nothing_fires(model: LlamaForCausalLM, dtype: torch.dtype) -> None:
    model = model.to(dtype)
    try:
        sae, ids = topk_sae(), input_ids()
        h = site_acts(model, ids)
        feats = late_firing_features(sae, h)
        p0 = first_firing(sae, h, feats)
        edit = Edit(sae, tuple(feats), SITE, clamp=0.0)
        with torch.no_grad():
            before = model(input_ids=ids).logits
            with edit.apply(model) as handle:
                assert handle.active
                rec = Recorder(resolve_site(model, SITE))
                hooked = model(input_ids=ids).logits
                rec.handle.remove()
            after = model(input_ids=ids).logits
        assert hooked.dtype == dtype and rec.seen[0].dtype == dtype
        assert check_untouched_prefix(before, hooked, p0)
        # At the site itself every token where no selected latent fires is untouched, even after p0.
        fires = (sae.encode(h)[..., feats] > 0).any(-1)
        assert torch.equal(rec.seen[0][~fires], h[~fires]) and not torch.equal(rec.seen[0][fires], h[fires])
        assert torch.equal(after, before), "the model must be exactly itself once the context exits"
    finally:
        model.to(torch.float32)


def test_full_reconstruction_fails_the_bit_exact_check(model: LlamaForCausalLM) -> None:
    """Guard on the test itself: decoding the clamped reconstruction (dropping the SAE error) is wrong
    and ``check_untouched_prefix`` catches it."""
    sae, ids = topk_sae(), input_ids()
    h = site_acts(model, ids)
    feats = late_firing_features(sae, h)

    def wrong(x: torch.Tensor) -> torch.Tensor:
        f = sae.encode(x)
        f[..., feats] = 0.0
        return sae.decode(f).to(x.dtype)

    with torch.no_grad():
        before = model(input_ids=ids).logits
        handle = register_output_hook(resolve_site(model, SITE), wrong)
        hooked = model(input_ids=ids).logits
        handle.remove()
    assert not check_untouched_prefix(before, hooked, first_firing(sae, h, feats))


def test_manual_remove(model: LlamaForCausalLM) -> None:
    ids = input_ids(seed=3)
    edit = Edit(topk_sae(), tuple(range(256)), SITE, clamp=-1.0)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        handle = edit.apply(model)
        assert not torch.equal(model(input_ids=ids).logits, before)
        handle.remove()
        handle.remove()
        assert not handle.active and torch.equal(model(input_ids=ids).logits, before)


@pytest.mark.parametrize("scope", ["image", "text"])
def test_scope_touches_only_its_tokens(model: LlamaForCausalLM, scope: str) -> None:
    sae, ids = topk_sae(), input_ids(seed=1)
    ids[:, 4:8] = IMAGE_ID
    h = site_acts(model, ids)
    is_image = ids == IMAGE_ID
    in_scope = is_image if scope == "image" else ~is_image
    edit = Edit(
        sae, (0, 1, 2), SITE, clamp=-1.0, only_where_active=False, scope=scope, image_token_id=IMAGE_ID
    )
    with torch.no_grad(), edit.apply(model):
        rec = Recorder(resolve_site(model, SITE))
        model(input_ids=ids)
        rec.handle.remove()
        want = edit.edit_hidden(h, in_scope)
    out = rec.seen[0]
    assert torch.equal(out, want)
    assert torch.equal(out[~in_scope], h[~in_scope])
    assert not torch.equal(out[in_scope], h[in_scope])


def test_scope_works_in_generate_with_kv_cache(model: LlamaForCausalLM) -> None:
    sae = topk_sae()
    ids = input_ids(batch=1, seq=10, seed=2)
    ids[:, 2:5] = IMAGE_ID
    edit = Edit(
        sae, (0, 1, 2, 3), SITE, clamp=-3.0, only_where_active=False, scope="text", image_token_id=IMAGE_ID
    )
    kwargs = {"max_new_tokens": 4, "do_sample": False, "return_dict_in_generate": True, "output_logits": True}
    with torch.no_grad():
        plain = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        with edit.apply(model):
            rec = Recorder(resolve_site(model, SITE))
            cached = model.generate(ids, attention_mask=torch.ones_like(ids), use_cache=True, **kwargs)
            rec.handle.remove()
            full = model.generate(ids, attention_mask=torch.ones_like(ids), use_cache=False, **kwargs)
    assert [t.shape[1] for t in rec.seen] == [10, 1, 1, 1], "later steps must see only the new token"
    assert torch.equal(cached.sequences, full.sequences)
    for a, b in zip(cached.logits, full.logits, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert not all(torch.allclose(a, b) for a, b in zip(plain.logits, cached.logits, strict=True))


def test_scope_without_input_ids_is_a_clear_error(model: LlamaForCausalLM) -> None:
    edit = Edit(topk_sae(), (0,), SITE, scope="image", image_token_id=IMAGE_ID)
    embeds = model.get_input_embeddings()(input_ids())
    with torch.no_grad(), edit.apply(model), pytest.raises(RuntimeError, match="input_ids"):
        model(inputs_embeds=embeds)


# --- value object -----------------------------------------------------------------------------------


def test_dict_round_trip_and_validation() -> None:
    sae = topk_sae()
    edit = Edit(sae, [5, 3], SITE, clamp=-0.5, scope="image", image_token_id=IMAGE_ID)  # type: ignore[arg-type]
    assert edit.features == (5, 3)
    again = Edit.from_dict(edit.to_dict(), sae)
    assert again == edit
    with pytest.raises(InputError):
        Edit.from_dict(edit.to_dict(), dictionary_sae())
    with pytest.raises(InputError):
        Edit(sae, (256,), SITE)
    with pytest.raises(InputError):
        Edit(sae, (1,), SITE, clamp=1.0)
    per_feature = Edit(sae, (5, 3), SITE, clamp=[0.0, -4.0])  # type: ignore[arg-type]
    assert per_feature.clamps == (0.0, -4.0) and Edit.from_dict(per_feature.to_dict(), sae) == per_feature
    assert Edit(sae, (5, 3), SITE, clamp=-1.0).clamps == (-1.0, -1.0)
    with pytest.raises(InputError, match="2 values for 3 features"):
        Edit(sae, (5, 3, 1), SITE, clamp=(0.0, -1.0))
    with pytest.raises(InputError, match="must be 0 or negative"):
        Edit(sae, (5, 3), SITE, clamp=(0.0, 2.0))
    with pytest.raises(InputError):
        Edit(sae, (1,), SITE, scope="image")
    with pytest.raises(InputError):
        Edit(sae, (), SITE)
