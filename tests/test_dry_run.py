"""``run --dry-run`` on the real LLaVA-1.5-7B and Llama-3.2-11B-Vision configs, and the two recipes.

Fixture sources (config.json only, no weights; both load with ``AutoConfig.from_pretrained``):
- ``tests/fixtures/llava-1.5-7b/config.json``: verbatim ``llava-hf/llava-1.5-7b-hf`` config.json, as
  stored in the public repo tung2kg1/AI-Stock-Chart-Analysis (``llava-1.5-7b-hf/config.json``) and
  quoted identically in harleyszhang/lite_llama's tests.
- ``tests/fixtures/llama-3.2-11b-vision/config.json``: RECONSTRUCTED, no verbatim copy was found. It
  follows the layout of ``meta-llama/Llama-3.2-11B-Vision-Instruct``'s config.json (a full
  transformers 4.45 ``to_dict`` dump) from two public quotes of that file's contents: the 11B
  text_config (a fine-tuning script loading a mirror of the Instruct model) and the vision_config
  (an FSDP benchmark script; its text_config was edited there). Architecture numbers match the
  model card: 40 text layers (cross-attention at 3, 8, ..., 38), d_model 4096, MLP 14336, GQA 32/8,
  vocab 128256 (+8 image rows in the embedding), 560px tiles, 4 tiles, patch 14, 32 + 8 vision
  layers; 10.67B parameters on the meta device against the published 10.6B.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from transformers import AutoConfig

from sauce_export.cli import main
from sauce_export.dry_run import dry_run, gpus_needed
from sauce_export.errors import InputError
from sauce_export.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
LLAVA = ROOT / "tests/fixtures/llava-1.5-7b"
MLLAMA = ROOT / "tests/fixtures/llama-3.2-11b-vision"
LLAVA_RECIPE = ROOT / "recipes/llava-1.5-7b.yaml"
MLLAMA_RECIPE = ROOT / "recipes/llama-3.2-11b-vision.yaml"


def _variant(base: Path, tmp_path: Path, **changes: Any) -> Path:
    """A copy of ``base`` with top-level keys or ``section.key`` values replaced."""
    raw = yaml.safe_load(base.read_text())
    for key, value in changes.items():
        section, _, sub = key.partition("__")
        if sub:
            raw.setdefault(section, {})[sub] = value
        else:
            raw[section] = value
    out = tmp_path / f"{base.stem}-variant.yaml"
    out.write_text(yaml.safe_dump(raw))
    return out


@pytest.fixture(scope="module")
def llava_plan() -> dict[str, Any]:
    return dry_run(load_recipe(LLAVA_RECIPE), str(LLAVA))


@pytest.fixture(scope="module")
def mllama_plan() -> dict[str, Any]:
    return dry_run(load_recipe(MLLAMA_RECIPE), str(MLLAMA))


def test_fixture_configs_load() -> None:
    llava = AutoConfig.from_pretrained(LLAVA)
    assert llava.model_type == "llava" and llava.text_config.num_hidden_layers == 32
    mllama = AutoConfig.from_pretrained(MLLAMA)
    assert mllama.model_type == "mllama"
    assert mllama.text_config.cross_attention_layers == [3, 8, 13, 18, 23, 28, 33, 38]


def test_recipes_validate() -> None:
    for path, model, site in (
        (LLAVA_RECIPE, "llava-hf/llava-1.5-7b-hf", "layers.15"),
        (MLLAMA_RECIPE, "meta-llama/Llama-3.2-11B-Vision-Instruct", "layers.19"),
    ):
        recipe = load_recipe(path)
        assert (recipe.model, recipe.site, recipe.sae.kind) == (model, site, "topk")
        assert not recipe.data.build_world


def test_llava_plan(llava_plan: dict[str, Any]) -> None:
    plan = llava_plan
    assert plan["class"] == "LlavaForConditionalGeneration"
    assert abs(plan["parameters"] / 7.06e9 - 1) < 0.01
    assert plan["site"]["module"] == "model.language_model.layers.15"
    assert plan["site"]["disk_key"] == "language_model.model.layers.15"  # llava-hf key layout
    writers = [w["module"] for w in plan["fold"]["writers"]]
    assert writers == [
        "model.language_model.layers.15.self_attn.o_proj",
        "model.language_model.layers.15.mlp.down_proj",
    ]
    assert plan["fold"]["writers"][1]["disk_key"] == "language_model.model.layers.15.mlp.down_proj.weight"
    assert plan["fold"]["writers"][1]["shape"] == [4096, 11008]
    col = plan["collect"]
    assert (col["image_tokens_per_row"], col["vision_tokens_per_image"]) == (576, 577)  # (336/14)^2
    assert col["dtype"] == "float16" and col["bytes"] == col["tokens"] * (2 * 4096 + 18)  # model's dtype
    assert 5e9 < col["bytes"] < 1e11
    assert plan["sae"]["d_sae"] == 8 * 4096 and plan["sae"]["bytes"] == 4 * plan["sae"]["params"]
    assert plan["memory"]["model_bytes"] == 2 * plan["parameters"]  # runtime.dtype auto: float16
    # 14 GB of float16 weights + the SAE's 4.3 GB in training fit one 24 GB GPU; torchrun spreads the data
    assert plan["memory"]["gpus"] == {"24 GB": 1, "40 GB": 1, "80 GB": 1}
    assert plan["memory"]["torchrun"].startswith("torchrun --nproc-per-node N -m sauce_export run ")
    assert gpus_needed(140 * 10**9) == {"24 GB": 7, "40 GB": 4, "80 GB": 2}  # a 70B model in bf16
    assert plan["export"]["bytes"] == 2 * plan["parameters"] and not plan["export"]["measured"]  # fp16
    conv = plan["conventions"]  # the fixture is config.json alone: no tokenizer to tell the padding
    assert conv["padding"] is None and any("no tokenizer files" in n for n in plan["notes"])
    assert (conv["tied_embeddings"], conv["rope_scaling"], conv["eos_token_id"]) == (False, None, 2)
    rank = plan["fold"]["rank"]  # 2 calibrated concepts, each up to max(calibrate.top_n) = 8 latents
    assert rank == 16 and plan["fold"]["patch_params"] == rank * (4096 + 4096) + rank * (4096 + 11008)


def test_mllama_plan(mllama_plan: dict[str, Any]) -> None:
    plan = mllama_plan
    assert plan["class"] == "MllamaForConditionalGeneration"
    assert abs(plan["parameters"] / 10.6e9 - 1) < 0.01
    assert plan["site"]["module"] == "model.language_model.layers.19"
    assert [w["module"].rsplit(".", 2)[-2:] for w in plan["fold"]["writers"]] == [
        ["self_attn", "o_proj"],
        ["mlp", "down_proj"],
    ]
    col = plan["collect"]
    # images are cross-attended: one placeholder token in the sequence, 4 tiles x (40^2 + 1) read
    assert (col["image_tokens_per_row"], col["vision_tokens_per_image"]) == (1, 4 * 1601)
    assert plan["export"]["bytes"] == 2 * plan["parameters"]  # bfloat16


def test_mllama_cross_attention_layer_writers(tmp_path: Path) -> None:
    recipe = load_recipe(_variant(MLLAMA_RECIPE, tmp_path, site="layers.18"))
    plan = dry_run(recipe, str(MLLAMA))
    assert [w["module"] for w in plan["fold"]["writers"]] == [
        "model.language_model.layers.18.cross_attn.o_proj",
        "model.language_model.layers.18.mlp.down_proj",
    ]
    assert plan["fold"]["writers"][0]["disk_key"] == "language_model.model.layers.18.cross_attn.o_proj.weight"
    assert any("cross-attention layer" in n for n in plan["notes"])


def test_projection_and_gated_plans(tmp_path: Path) -> None:
    proj = dry_run(
        load_recipe(_variant(MLLAMA_RECIPE, tmp_path, site="layers.8", fold__method="projection")),
        str(MLLAMA),
    )
    names = [w["module"] for w in proj["fold"]["writers"]]
    assert names[0] == "model.language_model.embed_tokens"
    assert "model.language_model.layers.3.cross_attn.o_proj" in names
    assert "model.language_model.layers.3.self_attn.o_proj" not in names
    assert len(names) == 1 + 2 * 9  # embeddings + (attention or cross-attention, MLP) of layers 0..8
    gated = dry_run(load_recipe(_variant(LLAVA_RECIPE, tmp_path, fold__method="gated")), str(LLAVA))
    assert gated["fold"]["intermediate_size"] == [11008, 11040]  # 11008 + 16 neurons, padded to 32
    growth = 3 * 32 * 32 * 4096
    assert gated["fold"]["growth_params"] == growth
    assert gated["export"]["bytes"] == 2 * (gated["parameters"] + growth)


def test_per_concept_top_n_sizes_the_patch(llava_plan: dict[str, Any], tmp_path: Path) -> None:
    concepts = [{"kind": "object", "name": "dog", "top_n": 3}, {"kind": "colour", "name": "red"}]
    plan = dry_run(load_recipe(_variant(LLAVA_RECIPE, tmp_path, concepts=concepts)), str(LLAVA))
    assert llava_plan["fold"]["rank"] == 8 + 8  # calibrated: up to max(calibrate.top_n) each
    assert plan["fold"]["rank"] == 3 + 8
    fixed = dry_run(load_recipe(_variant(LLAVA_RECIPE, tmp_path, calibrate__search=False)), str(LLAVA))
    assert fixed["fold"]["rank"] == 8 + 8  # select.top_n for each concept


def test_projection_refuses_tied_embeddings(tmp_path: Path) -> None:
    """On the meta device (no storage to compare) the tie flag alone must decide, both ways."""
    config = json.loads((LLAVA / "config.json").read_text())
    config["text_config"]["tie_word_embeddings"] = True
    tied = tmp_path / "tied"
    tied.mkdir()
    (tied / "config.json").write_text(json.dumps(config))
    recipe = load_recipe(_variant(LLAVA_RECIPE, tmp_path, fold__method="projection"))
    assert dry_run(recipe, str(LLAVA))["fold"]["writers"][0]["module"].endswith("embed_tokens")
    with pytest.raises(InputError, match="tied to lm_head"):
        dry_run(recipe, str(tied))


def test_cli_dry_run_json_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = ["run", str(MLLAMA_RECIPE), "--out", str(out), "--dry-run", "--model", str(MLLAMA), "--json"]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["site"]["module"] == "model.language_model.layers.19"
    assert not out.exists()
    assert main([*argv[:-1]]) == 0
    table = capsys.readouterr().out
    assert "activation cache" in table and "language_model.model.layers.19.mlp.down_proj.weight" in table


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"site": "layers.32"}, "out of range"),
        ({"site": "blocks.3.hook_nothing"}, "unknown site"),
        ({"fold__modules": ["mlp.nope"]}, "no module"),
        ({"model": "nobody/not-cached-model"}, "local Hugging Face cache"),
    ],
)
def test_bad_input_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], changes: dict[str, Any], message: str
) -> None:
    recipe = _variant(LLAVA_RECIPE, tmp_path, **changes)
    argv = ["run", str(recipe), "--out", str(tmp_path / "o"), "--dry-run"]
    if "model" not in changes:
        argv += ["--model", str(LLAVA)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_model_flag_needs_dry_run(tmp_path: Path) -> None:
    assert main(["run", str(LLAVA_RECIPE), "--out", str(tmp_path / "o"), "--model", str(LLAVA)]) == 2


def test_hub_id_resolves_in_local_cache_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    snapshot = tmp_path / "models--llava-hf--llava-1.5-7b-hf" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text((LLAVA / "config.json").read_text())
    refs = tmp_path / "models--llava-hf--llava-1.5-7b-hf" / "refs"
    refs.mkdir()
    (refs / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    plan = dry_run(load_recipe(LLAVA_RECIPE))  # the recipe's Hub id, found in the cache
    assert plan["model"] == "llava-hf/llava-1.5-7b-hf" and plan["site"]["d_model"] == 4096
    with pytest.raises(InputError, match="local Hugging Face cache"):
        dry_run(load_recipe(LLAVA_RECIPE), "llava-hf/some-other-model")
