"""The registry against real tiny models: paths resolve, hooks see the right activations, and the
on-disk keys match what transformers' own ``save_pretrained`` writes."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors import safe_open
from torch import nn

from sauce_export.architectures import (
    REGISTRY,
    decoder_layers,
    disk_key,
    disk_key_in,
    lora_targets,
    num_layers,
    residual_writers,
    resolve_site,
    site_module_name,
    spec_for,
    text_config,
    text_parameters,
    tied_embeddings,
)
from sauce_export.errors import InputError
from sauce_export.evaluate.baselines import BaselineConfig, TrainData, unlearn
from sauce_export.hooks import register_output_hook
from sauce_export.lm import Batch, answer_targets
from sauce_export.sites import Site

TEXT = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "max_position_embeddings": 64,
}


def _llava() -> nn.Module:
    vision = tf.CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    config = tf.LlavaConfig(vision_config=vision, text_config=tf.LlamaConfig(**TEXT), image_token_index=127)
    return tf.LlavaForConditionalGeneration(config)


def _mllama() -> nn.Module:
    vision = tf.MllamaVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_global_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        vision_output_dim=128,
        intermediate_layers_indices=[0],
        max_num_tiles=1,
        supported_aspect_ratios=[[1, 1]],
    )
    text = {k: v for k, v in TEXT.items() if k != "head_dim"}
    text |= {"num_hidden_layers": 4, "cross_attention_layers": [2], "pad_token_id": 0, "bos_token_id": 1}
    text |= {"eos_token_id": 2}
    config = tf.MllamaConfig(vision_config=vision, text_config=tf.MllamaTextConfig(**text))
    return tf.MllamaForConditionalGeneration(config)


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**TEXT)),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**TEXT)),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**TEXT)),
    "llava": _llava,
    "mllama": _mllama,
}
LAYERS_PATH = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "llava": "model.language_model.layers",
    "mllama": "model.language_model.layers",
}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def arch(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, nn.Module, set[str]]:
    """One tiny model per architecture, plus the tensor keys its ``save_pretrained`` wrote."""
    torch.manual_seed(0)
    model = BUILDERS[request.param]().eval()
    out = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(out)
    keys: set[str] = set()
    for file in Path(out).glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            keys |= set(handle.keys())
    return request.param, model, keys


def _ids() -> torch.Tensor:
    return torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))


def test_registry_and_layers(arch: tuple[str, nn.Module, set[str]]) -> None:
    name, model, _ = arch
    assert spec_for(model) is spec_for(model.config) is REGISTRY[name]
    assert spec_for(model).layers == LAYERS_PATH[name]
    assert decoder_layers(model) is model.get_submodule(LAYERS_PATH[name])
    assert num_layers(model) == text_config(model.config).num_hidden_layers
    assert (text_config(model.config) is model.config) == (name not in ("llava", "mllama"))


def test_sites_are_the_activations_hooks_see(arch: tuple[str, nn.Module, set[str]]) -> None:
    """resid site = hidden_states[L + 1]; and resid_L = resid_{L-1} + attn_L + mlp_L, so all three
    sites are the tensors the residual stream is built from."""
    name, model, _ = arch
    base = LAYERS_PATH[name]
    assert site_module_name(model, "layers.1") == f"{base}.1"
    assert site_module_name(model, Site(1, "mlp")) == f"{base}.1.mlp"
    assert site_module_name(model, "layers.1.attn") == f"{base}.1.self_attn"
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for site in ("layers.1", "layers.1.mlp", "layers.1.attn"):
        module = resolve_site(model, site)
        assert module is model.get_submodule(site_module_name(model, site))
        handles.append(
            register_output_hook(module, lambda h, s=site: seen.__setitem__(s, h.detach().clone()))
        )
    with torch.no_grad():
        hidden = model(input_ids=_ids(), output_hidden_states=True).hidden_states
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(seen["layers.1"], hidden[2], rtol=0, atol=0)
    torch.testing.assert_close(hidden[1] + seen["layers.1.attn"] + seen["layers.1.mlp"], hidden[2])


def test_residual_writers(arch: tuple[str, nn.Module, set[str]]) -> None:
    name, model, _ = arch
    base = LAYERS_PATH[name]
    writers = residual_writers(model, [0, 1])
    assert list(writers) == [f"{base}.{i}.{w}" for i in (0, 1) for w in ("self_attn.o_proj", "mlp.down_proj")]
    assert all(isinstance(m, nn.Linear) and m is model.get_submodule(n) for n, m in writers.items())
    full = residual_writers(model, range(num_layers(model)), include_embed=True, include_extra=True)
    assert isinstance(full[spec_for(model).embed], nn.Embedding)
    extra = [n for n in full if not n.startswith(base) and n != spec_for(model).embed]
    assert extra == (["model.multi_modal_projector.linear_2"] if name == "llava" else [])
    if name == "mllama":  # layer 2 is a cross-attention layer: cross_attn.o_proj replaces self_attn.o_proj
        assert list(residual_writers(model, [2])) == [
            f"{base}.2.cross_attn.o_proj",
            f"{base}.2.mlp.down_proj",
        ]


def test_disk_keys_match_save_pretrained(arch: tuple[str, nn.Module, set[str]]) -> None:
    name, model, keys = arch
    spec = spec_for(model)
    names = [*residual_writers(model, range(num_layers(model)), include_embed=True, include_extra=True)]
    names += [
        spec.lm_head,
        spec.final_norm,
        f"{spec.layers}.0.{spec.norms[0]}",
        f"{spec.layers}.1.self_attn.q_proj",
    ]
    for module_name in names:
        found = disk_key_in(keys, model, module_name)
        assert found + ".weight" in keys, (module_name, found)
        assert disk_key(model, module_name) == found  # the preferred layout is what transformers 5.23 writes
    if name in ("llava", "mllama"):
        assert (
            disk_key(model, f"{spec.layers}.1.mlp.down_proj") == "language_model.model.layers.1.mlp.down_proj"
        )
        assert disk_key(model, "lm_head") == "language_model.lm_head"
    # A checkpoint keyed by the in-memory names (native transformers-5 layout) is understood too.
    native = set(model.state_dict())
    for module_name in names:
        assert disk_key_in(native, model, module_name) == module_name
    with pytest.raises(InputError, match="no tensor keys"):
        disk_key_in({"unrelated.weight"}, model, f"{spec.layers}.0.mlp.down_proj")


def test_llava_hub_vision_layout() -> None:
    model = _llava()
    hub_key = "vision_tower.vision_model.encoder.layers.0.mlp.fc2.weight"
    name = "model.vision_tower.encoder.layers.0.mlp.fc2"
    assert name + ".weight" in model.state_dict()
    assert disk_key(model, name) == "vision_tower.encoder.layers.0.mlp.fc2"
    assert disk_key_in({hub_key}, model, name) + ".weight" == hub_key


def test_mllama_cross_attention_site_with_image() -> None:
    """Cross-attention layers run only with images; their attn site is ``cross_attn``."""
    torch.manual_seed(0)
    model = _mllama().eval()
    assert site_module_name(model, "layers.2.attn") == "model.language_model.layers.2.cross_attn"
    seen: list[torch.Tensor] = []
    handle = register_output_hook(resolve_site(model, "layers.2.attn"), seen.append)
    ids = _ids()
    image = {
        "pixel_values": torch.randn(2, 1, 1, 3, 32, 32),
        "aspect_ratio_ids": torch.ones(2, 1, dtype=torch.long),
        "aspect_ratio_mask": torch.ones(2, 1, 1, dtype=torch.long),
        "cross_attention_mask": torch.ones(2, ids.shape[1], 1, 1, dtype=torch.long),
    }
    with torch.no_grad():
        model(input_ids=ids)
        assert seen == []  # text-only forward skips the cross-attention layer
        model(input_ids=ids, **image)
    handle.remove()
    assert len(seen) == 1 and seen[0].shape == (2, ids.shape[1], 64)


@pytest.mark.parametrize("site", ["layers.3", "layers.99", Site(-1)])
def test_out_of_range_layer(site: str | Site) -> None:
    model = BUILDERS["llama"]()
    with pytest.raises(
        InputError, match=r"site: layer -?\d+ is out of range; this model has layers 0\.\.2"
    ) as err:
        resolve_site(model, site, where="sae.json")
    assert err.value.field == "site" and err.value.where == "sae.json"
    with pytest.raises(InputError):
        residual_writers(model, [3])


@pytest.mark.parametrize("site", ["layers.1.resid_mid", "decoder.1", "layers.x"])
def test_unknown_site_name(site: str) -> None:
    with pytest.raises(InputError, match="site: ") as err:
        resolve_site(BUILDERS["llama"](), site)
    assert err.value.field == "site"


def test_unsupported_model_and_bare_backbone() -> None:
    with pytest.raises(InputError, match="model_type: 'gpt2' is not a supported architecture") as err:
        spec_for(tf.GPT2Config(n_layer=1, n_embd=64, n_head=2))
    assert err.value.field == "model_type"
    with pytest.raises(InputError, match=r"no decoder layers at 'model\.layers'"):
        decoder_layers(tf.LlamaModel(tf.LlamaConfig(**TEXT)))


def test_tied_embeddings() -> None:
    tied = tf.LlamaForCausalLM(tf.LlamaConfig(**TEXT, tie_word_embeddings=True))
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    assert tied_embeddings(tied)
    assert not tied_embeddings(BUILDERS["llama"]())
    assert len(text_parameters(tied)) == len(list(tied.parameters()))  # the shared weight once


def test_untied_models(arch: tuple[str, nn.Module, set[str]]) -> None:
    _, model, keys = arch
    assert not tied_embeddings(model)
    assert disk_key_in(keys, model, "lm_head") + ".weight" in keys


def test_baselines_train_only_the_registry_text_model(arch: tuple[str, nn.Module, set[str]]) -> None:
    """Full fine-tuning trains the language model and its head; LoRA adapts exactly the registry's
    projections of the decoder layers. A VLM's vision tower and projector never change."""
    name, model, _ = arch
    spec = spec_for(model)
    targets = {n for n, _ in model.named_modules() if re.fullmatch(lora_targets(model), n)}
    layer_ids = range(num_layers(model))
    assert targets == {
        f"{spec.layers}.{i}.{p}"
        for i in layer_ids
        for p in spec.adapted
        if isinstance(getattr(decoder_layers(model)[i], p.split(".")[0], None), nn.Module)
    }
    assert len(targets) == 7 * num_layers(model)  # mllama's layer 2 has cross_attn q/k/v/o for self_attn's
    if name == "mllama":
        assert f"{spec.layers}.2.cross_attn.k_proj" in targets
    ids = _ids()
    mask, tgt = answer_targets(ids, [7, 7], [2, 3])
    batch = Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, mask, tgt, [])
    data = TrainData([batch], [batch], [batch])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    text = {n for n, p in model.named_parameters() if any(p is q for q in text_parameters(model))}
    assert {"lm_head.weight", f"{spec.layers}.0.mlp.down_proj.weight"} <= text
    assert not any("vision" in n or "projector" in n for n in text)
    for lora, allowed in ((False, text), (True, {t + ".weight" for t in targets})):
        trained, _ = unlearn(model, data, BaselineConfig("PO", lora=lora, steps=1, lr=1e-2))
        assert type(trained) is type(model)  # LoRA merged back: a plain model again
        after = dict(trained.named_parameters())
        assert set(after) == set(before)
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        assert f"{spec.layers}.0.self_attn.q_proj.weight" in changed and changed <= allowed, changed
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # the input is untouched
