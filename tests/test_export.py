"""Export: a patch baked into a streamed copy of a checkpoint, or written as a PEFT LoRA adapter.

Every check reloads what was written with stock transformers / peft and compares logits with the
in-memory ``patch.apply(model)``; bad inputs must leave the source untouched and no output behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, LlamaConfig, LlamaForCausalLM

from sauce_export import export as export_module
from sauce_export.cli import main
from sauce_export.errors import InputError
from sauce_export.export import (
    ExportCheckError,
    check_export,
    export_checkpoint,
    read_layout,
    read_safetensors_header,
)
from sauce_export.fsutil import clear_stale
from sauce_export.patch import Growth, Patch, WeightDelta
from sauce_export.peft_adapter import write_peft_adapter

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
INDEX = "model.safetensors.index.json"


def _delta(shape: tuple[int, int], module: str, rank: int, seed: int, bias: bool = False) -> WeightDelta:
    g = torch.Generator().manual_seed(seed)
    out_dim, in_dim = shape
    return WeightDelta(
        module,
        B=torch.randn(out_dim, rank, generator=g) * 0.3,
        A=torch.randn(rank, in_dim, generator=g) * 0.3,
        bias=torch.randn(out_dim, generator=g) * 0.3 if bias else None,
    )


def _snapshot(directory: Path) -> dict[str, str]:
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _leftovers(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}.")]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny tied-embedding Llama saved by transformers, plus the non-weight files a Hub repo has."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        tie_word_embeddings=True,
    )
    out = tmp_path_factory.mktemp("src") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(out)
    (out / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}\n')
    (out / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}\n")
    (out / "extra").mkdir()
    (out / "extra" / "notes.bin").write_bytes(bytes(range(256)) * 3)
    return out


def _shard_bf16(source: Path, out: Path) -> Path:
    """``source`` with its weights in bf16, split by hand into two shards (sorted keys, halves) with an
    index; every other file copied as is (config.json still says float32)."""
    state = {k: v.to(torch.bfloat16) for k, v in load_file(source / "model.safetensors").items()}
    keys = sorted(state)
    shutil.copytree(source, out)
    (out / "model.safetensors").unlink()
    weight_map = {}
    for name, part in zip(SHARDS, (keys[: len(keys) // 2], keys[len(keys) // 2 :]), strict=True):
        save_file({k: state[k] for k in part}, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return out


@pytest.fixture(scope="module")
def sharded_dir(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama in bf16, split by hand into two shards with an index."""
    return _shard_bf16(llama_dir, tmp_path_factory.mktemp("src") / "sharded")


@pytest.fixture(scope="module")
def llava_sharded_dir(tiny_llava_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LLaVA in bf16, split by hand into two shards with an index."""
    return _shard_bf16(tiny_llava_dir, tmp_path_factory.mktemp("src") / "llava-sharded")


def _llama_patch() -> Patch:
    return Patch(
        (
            _delta((32, 64), "model.layers.1.mlp.down_proj", rank=2, seed=1),
            _delta((32, 32), "model.layers.0.self_attn.o_proj", rank=3, seed=2),
        )
    )


def _check_round_trip(
    source: Path, out: Path, patch: Patch, load: Callable[[Path], torch.nn.Module], inputs: dict
) -> None:
    """Reloaded logits equal the in-memory patched logits; everything else on disk is unchanged."""
    model = load(source)
    before = _logits(model, inputs)
    with patch.apply(model):
        want = _logits(model, inputs)
    got = _logits(load(out), inputs)
    assert (want - before).abs().max() > 1e-3, "the patch should change the logits"
    assert (got - want).abs().max() <= 1e-5
    check_export(source, out)
    src, dst = _snapshot(source), _snapshot(out)
    assert src.keys() == dst.keys()
    changed = {name for name in src if src[name] != dst[name]}
    assert changed == {"model.safetensors"}


def test_llama_round_trip(llama_dir: Path, tmp_path: Path) -> None:
    # Tied embeddings: on disk only the embedding, which loading ties to lm_head again.
    embed = _delta((96, 32), "model.embed_tokens", rank=1, seed=3)
    patch = Patch((*_llama_patch().deltas, embed))
    before = _snapshot(llama_dir)
    out = tmp_path / "out"
    result = export_checkpoint(llama_dir, patch, out, metadata={"provenance": "test"}, progress=False)
    assert result["path"] == str(out)
    assert sorted(result["touched"]) == [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    ]
    assert {f["name"]: f["sha256"] for f in result["files"]} == _snapshot(out)
    inputs = {"input_ids": torch.tensor([[1, 5, 9, 33, 70, 2, 95]])}
    _check_round_trip(llama_dir, out, patch, AutoModelForCausalLM.from_pretrained, inputs)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "provenance": "test"}
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118
    assert _snapshot(llama_dir) == before


def test_llava_round_trip(tiny_llava_dir: Path, tmp_path: Path) -> None:
    patch = Patch(
        (
            _delta((128, 384), "model.language_model.layers.1.mlp.down_proj", rank=4, seed=4),
            _delta((128, 128), "model.multi_modal_projector.linear_2", rank=2, seed=5, bias=True),
        )
    )
    result = export_checkpoint(tiny_llava_dir, patch, tmp_path / "out", progress=False)
    assert result["touched"] == [
        "language_model.model.layers.1.mlp.down_proj.weight",
        "multi_modal_projector.linear_2.bias",
        "multi_modal_projector.linear_2.weight",
    ]
    config = json.loads((tiny_llava_dir / "config.json").read_text())
    ids = [1, *[config["image_token_index"]] * config["image_seq_length"], 40, 41, 42]
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.tensor([ids]), "pixel_values": torch.rand(1, 3, 48, 48, generator=g)}
    _check_round_trip(
        tiny_llava_dir, tmp_path / "out", patch, AutoModelForImageTextToText.from_pretrained, inputs
    )


def test_sharded_bf16_round_trip(sharded_dir: Path, tmp_path: Path) -> None:
    delta = _delta((32, 64), "model.layers.1.mlp.down_proj", rank=2, seed=6)
    key = "model.layers.1.mlp.down_proj.weight"
    out = tmp_path / "out"
    export_checkpoint(sharded_dir, Patch((delta,)), out, metadata={"by": "test"}, progress=False)
    src, dst = _snapshot(sharded_dir), _snapshot(out)
    assert {n for n in src if src[n] != dst[n]} == {SHARDS[1]}  # index and shard 1 byte-identical
    old, new = load_file(sharded_dir / SHARDS[1]), load_file(out / SHARDS[1])
    assert list(old) == list(new)
    for name in old:
        assert new[name].dtype == torch.bfloat16
        if name != key:
            assert torch.equal(old[name], new[name]), name
    assert torch.equal(new[key], delta.apply_to(old[key]))
    assert not torch.equal(new[key], old[key])
    check_export(sharded_dir, out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.get_submodule("model.layers.1.mlp.down_proj").weight, new[key])


def _corrupt_rename(t: dict[str, torch.Tensor]) -> None:
    t["model.norm.weight_renamed"] = t.pop("model.norm.weight")


def _corrupt_drop(t: dict[str, torch.Tensor]) -> None:
    del t["model.norm.weight"]


def _corrupt_retype(t: dict[str, torch.Tensor]) -> None:
    t["model.norm.weight"] = t["model.norm.weight"].half()


@pytest.mark.parametrize(
    ("corrupt", "needle"),
    [
        (_corrupt_rename, "added model.norm.weight_renamed"),
        (_corrupt_drop, "dropped model.norm.weight"),
        (_corrupt_retype, "F16"),
    ],
)
def test_check_export_catches_corruption(
    llama_dir: Path, tmp_path: Path, corrupt: Callable[[dict[str, torch.Tensor]], None], needle: str
) -> None:
    out = tmp_path / "out"
    export_checkpoint(llama_dir, _llama_patch(), out, progress=False)
    tensors = load_file(out / "model.safetensors")
    corrupt(tensors)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportCheckError, match=needle):
        check_export(llama_dir, out)


def _bin_only(llama_dir: Path, tmp_path: Path) -> Path:
    source = tmp_path / "bin-only"
    source.mkdir()
    shutil.copy(llama_dir / "config.json", source)
    torch.save(load_file(llama_dir / "model.safetensors"), source / "pytorch_model.bin")
    return source


def test_pickle_source_with_allow_pickle(llama_dir: Path, tmp_path: Path) -> None:
    source = _bin_only(llama_dir, tmp_path)
    patch = _llama_patch()
    out = tmp_path / "out"
    result = export_checkpoint(source, patch, out, allow_pickle=True, progress=False)
    assert sorted(f["name"] for f in result["files"]) == ["config.json", "pytorch_model.bin"]
    old = torch.load(source / "pytorch_model.bin", weights_only=True)
    new = torch.load(out / "pytorch_model.bin", weights_only=True)
    key = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(new[key], patch.deltas[0].apply_to(old[key]))
    assert all(torch.equal(old[k], new[k]) for k in old if k not in result["touched"])


def test_stale_pickle_weights_are_not_shipped(llama_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "both"
    shutil.copytree(llama_dir, source)
    torch.save(load_file(llama_dir / "model.safetensors"), source / "pytorch_model.bin")
    result = export_checkpoint(source, _llama_patch(), tmp_path / "out", progress=False)
    assert result["skipped"] == ["pytorch_model.bin"]
    assert not (tmp_path / "out" / "pytorch_model.bin").exists()


def _setup_bad(kind: str, llama_dir: Path, sharded_dir: Path, tmp_path: Path) -> tuple[Path, Patch, Path]:
    """(source, patch, out) for one kind of bad input."""
    patch, out = _llama_patch(), tmp_path / "out"
    if kind == "no such module":
        return llama_dir, Patch((_delta((32, 64), "model.layers.7.mlp.down_proj", 2, 0),)), out
    if kind == "shape mismatch":
        return llama_dir, Patch((_delta((32, 48), "model.layers.1.mlp.down_proj", 2, 0),)), out
    if kind == "nan":
        bad = _delta((32, 64), "model.layers.1.mlp.down_proj", 2, 0)
        bad.A[0, 0] = float("nan")
        return llama_dir, Patch((bad,)), out
    if kind == "pickle only":
        return _bin_only(llama_dir, tmp_path), patch, out
    if kind == "existing out":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        return llama_dir, patch, out
    source = tmp_path / "broken"
    shutil.copytree(sharded_dir, source)
    (source / (SHARDS[0] if kind == "missing shard" else INDEX)).unlink()
    return source, patch, out


BAD = {
    "no such module": "model.layers.7.mlp.down_proj",
    "shape mismatch": "shape",
    "nan": "NaN",
    "pickle only": "allow-pickle",
    "existing out": "already exists",
    "missing shard": "missing",
    "missing index": "missing",
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_input(kind: str, llama_dir: Path, sharded_dir: Path, tmp_path: Path) -> None:
    source, patch, out = _setup_bad(kind, llama_dir, sharded_dir, tmp_path)
    before, out_before = _snapshot(source), _snapshot(out) if out.exists() else None
    with pytest.raises(InputError, match=BAD[kind]):
        export_checkpoint(source, patch, out, progress=False)
    assert _snapshot(source) == before
    if out_before is None:
        assert _leftovers(out) == []
    else:
        assert _snapshot(out) == out_before and _leftovers(out) == [out.name]


def test_peft_adapter_matches_patched_llama(llama_dir: Path, tmp_path: Path) -> None:
    patch = _llama_patch()  # ranks 2 and 3: rank_pattern / alpha_pattern
    out = tmp_path / "adapter"
    result = write_peft_adapter(patch, str(llama_dir), out)
    assert sorted(f["name"] for f in result["files"]) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["modules_to_save"]) == (3, 3, None)
    assert config["rank_pattern"] == config["alpha_pattern"] == {"model.layers.1.mlp.down_proj": 2}
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight" in f.keys()  # noqa: SIM118
    inputs = {"input_ids": torch.tensor([[1, 5, 9, 33, 70, 2, 95]])}
    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    with patch.apply(base):
        want = _logits(base, inputs)
    got = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), out), inputs)
    assert (got - want).abs().max() <= 1e-5


def test_peft_adapter_matches_patched_llava(tiny_llava_dir: Path, tmp_path: Path) -> None:
    patch = Patch(
        (
            _delta((128, 384), "model.language_model.layers.2.mlp.down_proj", rank=4, seed=7),
            _delta((128, 128), "model.multi_modal_projector.linear_2", rank=4, seed=8),
        )
    )
    out = tmp_path / "adapter"
    write_peft_adapter(patch, str(tiny_llava_dir), out)
    inputs = {"input_ids": torch.tensor([[1, 40, 41, 42, 43]])}
    base = AutoModelForImageTextToText.from_pretrained(tiny_llava_dir)
    with patch.apply(base):
        want = _logits(base, inputs)
    peft = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_llava_dir), out)
    assert (_logits(peft, inputs) - want).abs().max() <= 1e-5


@pytest.mark.parametrize(
    ("delta", "needle"),
    [
        (_delta((96, 32), "model.embed_tokens", 2, 0), "model.embed_tokens: is Embedding, not Linear"),
        (_delta((32, 64), "model.layers.1.mlp.down_proj", 2, 0, bias=True), "down_proj.bias"),
        (_delta((32, 64), "model.layers.1.mlp.down_proj", 17, 0), "rank 17"),
    ],
    ids=["embedding", "bias", "rank"],
)
def test_peft_rejects_what_vllm_cannot_serve(
    llama_dir: Path, tmp_path: Path, delta: WeightDelta, needle: str
) -> None:
    with pytest.raises(InputError, match=needle):
        write_peft_adapter(Patch((delta,)), str(llama_dir), tmp_path / "adapter")
    assert _leftovers(tmp_path / "adapter") == []


def test_cli_export(llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    patch_file = tmp_path / "patch.safetensors"
    _llama_patch().save(patch_file)
    out = tmp_path / "out"
    assert (
        main(["--quiet", "export", "--patch", str(patch_file), "--model", str(llama_dir), "--out", str(out)])
        == 0
    )
    assert capsys.readouterr().out.strip() == str(out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    provenance = json.loads(meta["sauce_export"])
    assert provenance["patch_sha256"] == hashlib.sha256(patch_file.read_bytes()).hexdigest()
    assert provenance["modules"] == _llama_patch().modules and "recipe" not in provenance

    adapter = tmp_path / "adapter"
    argv = ["export", "--patch", str(patch_file), "--model", str(llama_dir), "--format", "peft"]
    assert main([*argv, "--out", str(adapter)]) == 0
    assert (adapter / "adapter_model.safetensors").is_file()
    assert main([*argv, "--out", str(out)]) == 2  # out exists
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err


# --------------------------------------------------------------------------- grown patches (gated fold)

NEW = 5  # neurons appended to every layer's MLP
LLAMA_INPUTS = {"input_ids": torch.tensor([[1, 5, 9, 33, 70, 2, 95]])}


def _llava_inputs(source: Path) -> dict[str, torch.Tensor]:
    config = json.loads((source / "config.json").read_text())
    ids = [1, *[config["image_token_index"]] * config["image_seq_length"], 40, 41, 42]
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.tensor([ids]), "pixel_values": torch.rand(1, 3, 48, 48, generator=g)}


# case -> (source fixture, loader, in-memory decoder layers, dotted intermediate_size key)
GROWN_CASES = {
    "llama": ("llama_dir", AutoModelForCausalLM, "model.layers", "intermediate_size"),
    "llama-sharded-bf16": ("sharded_dir", AutoModelForCausalLM, "model.layers", "intermediate_size"),
    "llava": (
        "tiny_llava_dir",
        AutoModelForImageTextToText,
        "model.language_model.layers",
        "text_config.intermediate_size",
    ),
    "llava-sharded-bf16": (
        "llava_sharded_dir",
        AutoModelForImageTextToText,
        "model.language_model.layers",
        "text_config.intermediate_size",
    ),
}


def _gated_patch(
    model: torch.nn.Module, layers: str, size_key: str, site: int = 1, new: int = NEW, seed: int = 11
) -> Patch:
    """What ``gated_fold`` makes: ``new`` neurons appended to every layer's gate/up (rows) and down
    (columns), random at layer ``site`` and zero elsewhere, and the config's intermediate_size raised.

    The random values are bf16-exact, so a bf16 checkpoint stores exactly what ``apply`` adds to the
    (upcast) float32 model.
    """
    g = torch.Generator().manual_seed(seed)

    def block(rows: int, cols: int, here: bool) -> torch.Tensor:
        if not here:
            return torch.zeros(rows, cols)
        return (torch.randn(rows, cols, generator=g) * 0.5).to(torch.bfloat16).float()

    grows = []
    for i, layer in enumerate(model.get_submodule(layers)):
        hidden, prefix = layer.mlp.gate_proj.in_features, f"{layers}.{i}.mlp"
        grows += [
            Growth(f"{prefix}.gate_proj", 0, block(new, hidden, i == site)),
            Growth(f"{prefix}.up_proj", 0, block(new, hidden, i == site)),
            Growth(f"{prefix}.down_proj", 1, block(hidden, new, i == site)),
        ]
    width = model.get_submodule(f"{layers}.0.mlp.gate_proj").out_features
    return Patch((), {"method": "gated"}, tuple(grows), {size_key: width + NEW})


def _mlp_site(name: str) -> tuple[int, str]:
    """(layer, projection) of an MLP weight, in memory or on disk."""
    found = re.search(r"layers\.(\d+)\.mlp\.(\w+_proj)(\.weight)?$", name)
    assert found, name
    return int(found[1]), found[2]


def _dotted(data: object, dotted: str) -> object:
    for part in dotted.split("."):
        data = data[part] if isinstance(data, dict) else getattr(data, part)
    return data


def _headers(directory: Path) -> dict[str, dict[str, dict]]:
    """File -> {tensor: header entry} (in header order) of every safetensors weight file."""
    return {
        name: {k: v for k, v in read_safetensors_header(directory / name)[1].items() if k != "__metadata__"}
        for name in read_layout(directory).files
    }


@pytest.mark.parametrize("case", list(GROWN_CASES))
def test_grown_round_trip(case: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    fixture, auto, layers, size_key = GROWN_CASES[case]
    source: Path = request.getfixturevalue(fixture)
    inputs = _llava_inputs(source) if "llava" in case else LLAMA_INPUTS
    model = auto.from_pretrained(source)
    patch = _gated_patch(model, layers, size_key)
    width = _dotted(model.config, size_key)
    before_src = _snapshot(source)
    out = tmp_path / "out"
    result = export_checkpoint(source, patch, out, metadata={"by": "test"}, progress=False)
    assert _snapshot(source) == before_src
    assert {f["name"]: f["sha256"] for f in result["files"]} == _snapshot(out)
    assert {f["name"]: f["bytes"] for f in result["files"]} == {
        p.relative_to(out).as_posix(): p.stat().st_size for p in out.rglob("*") if p.is_file()
    }

    # Plain Auto classes load it, with the new width, and it computes what apply() computes.
    exported = auto.from_pretrained(out)
    assert _dotted(exported.config, size_key) == width + NEW
    with torch.no_grad():
        before = _logits(model, inputs)
        with patch.apply(model):
            want = _logits(model, inputs)
        got = _logits(exported, inputs)
    assert (want - before).abs().max() > 1e-3, "the patch should change the logits"
    assert (got - want).abs().max() <= 1e-5

    # config.json: only the width changed. Every other non-weight file: byte-identical.
    src_config, out_config = (json.loads((d / "config.json").read_text()) for d in (source, out))
    assert _dotted(src_config, size_key) == width and _dotted(out_config, size_key) == width + NEW
    *parents, key = size_key.split(".")
    node = src_config
    for part in parents:
        node = node[part]
    node[key] = width + NEW
    assert out_config == src_config
    sharded = (source / INDEX).is_file()
    weight_files = set(read_layout(source).files)
    src, dst = _snapshot(source), _snapshot(out)
    assert src.keys() == dst.keys()
    changed = {n for n in src if src[n] != dst[n]}
    assert changed - weight_files == {"config.json", *([INDEX] if sharded else [])}

    # Headers: same files, names (in order) and dtypes; shapes equal except the grown ones.
    by_site = {_mlp_site(g.module): g for g in patch.grows}
    grown = {key: by_site[_mlp_site(key)] for key in result["touched"]}  # disk key -> growth
    assert len(grown) == len(patch.grows) == len(by_site)
    src_headers, out_headers = _headers(source), _headers(out)
    assert src_headers.keys() == out_headers.keys()
    want_shapes = {}
    for name, entries in src_headers.items():
        assert list(out_headers[name]) == list(entries)
        for k, info in entries.items():
            new = out_headers[name][k]
            assert new["dtype"] == info["dtype"], k
            if k in grown:
                rows, cols = info["shape"]
                want_shapes[k] = (rows + NEW, cols) if grown[k].dim == 0 else (rows, cols + NEW)
                assert tuple(new["shape"]) == want_shapes[k], k
            else:
                assert new["shape"] == info["shape"], k
    assert len(want_shapes) == len(grown)
    for name in weight_files:  # the grown tensors hold the source's values plus the new block
        old, new = load_file(source / name), load_file(out / name)
        for k, t in old.items():
            if k in grown:
                g = grown[k]
                assert torch.equal(new[k].narrow(g.dim, 0, t.shape[g.dim]), t), k
                assert torch.equal(new[k].narrow(g.dim, t.shape[g.dim], NEW), g.extra.to(t.dtype)), k
            else:
                assert torch.equal(new[k], t), k

    if sharded:
        src_index, out_index = (json.loads((d / INDEX).read_text()) for d in (source, out))
        assert out_index["weight_map"] == src_index["weight_map"]
        total = sum(t.numel() * t.element_size() for n in weight_files for t in load_file(out / n).values())
        assert out_index["metadata"]["total_size"] == total > src_index["metadata"]["total_size"]

    # check_export: the grown tensors are flagged unless declared as changed.
    with pytest.raises(ExportCheckError, match=f"{len(grown)} problem") as err:
        check_export(source, out)
    assert "mlp.gate_proj.weight" in str(err.value)
    check_export(source, out, changed=want_shapes)
    with pytest.raises(ExportCheckError, match="not in the source"):
        check_export(source, out, changed={**want_shapes, "no.such.weight": (1, 1)})


def _bad_grow(kind: str, model: torch.nn.Module) -> Patch:
    patch = _gated_patch(model, "model.layers", "intermediate_size")
    grows = list(patch.grows)
    if kind == "inner width":  # gate rows one column wider than hidden_size
        g = grows[0]
        grows[0] = Growth(g.module, 0, torch.ones(NEW, g.extra.shape[1] + 1))
    elif kind == "layer short":  # layer 0 gets one neuron fewer than config.json says
        short = _gated_patch(model, "model.layers", "intermediate_size", new=NEW - 1)
        grows[:3] = short.grows[:3]
    elif kind == "down not grown":
        grows = [g for g in grows if not g.module.endswith("down_proj")]
    elif kind == "bad dim":
        grows[0] = Growth(grows[0].module, 2, grows[0].extra)
    elif kind == "nan":
        extra = grows[0].extra.clone()
        extra[0, 0] = float("nan")
        grows[0] = Growth(grows[0].module, 0, extra)
    updates = {
        "no config update": {},
        "config key typo": {"intermediate_sizes": 69},
        "config not a number": {"intermediate_size": "69"},
    }.get(kind, patch.config_updates)
    return Patch((), patch.description, tuple(grows), updates)


BAD_GROW = {
    "inner width": "cannot append",
    "layer short": r"model.layers.0.mlp.gate_proj: grows to \[68, 32\], but config.json with intermediate_size=69",
    "down not grown": "down_proj.weight: intermediate_size=69 changes it",
    "no config update": "no config updates builds",
    "config key typo": "intermediate_sizes: no such key",
    "config not a number": "'69' is not an integer",
    "bad dim": "along dim 2",
    "nan": "NaN",
}


@pytest.mark.parametrize("kind", list(BAD_GROW))
def test_grown_misfit_writes_nothing(kind: str, llama_dir: Path, tmp_path: Path) -> None:
    patch = _bad_grow(kind, AutoModelForCausalLM.from_pretrained(llama_dir))
    before, out = _snapshot(llama_dir), tmp_path / "out"
    with pytest.raises(InputError, match=BAD_GROW[kind]):
        export_checkpoint(llama_dir, patch, out, progress=False)
    assert _snapshot(llama_dir) == before
    assert _leftovers(out) == []


def test_peft_refuses_grown_patch(llama_dir: Path, tmp_path: Path) -> None:
    gated = _gated_patch(AutoModelForCausalLM.from_pretrained(llama_dir), "model.layers", "intermediate_size")
    mixed = Patch(_llama_patch().deltas, {}, gated.grows[:3], gated.config_updates)
    for patch in (gated, mixed):
        with pytest.raises(InputError, match="adds neurons"):
            write_peft_adapter(patch, str(llama_dir), tmp_path / "adapter")
        assert _leftovers(tmp_path / "adapter") == []


# --------------------------------------------------------------------------- the copy path


def _no_copy_file_range(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object, **_kwargs: object) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)


def _no_kernel_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object, **_kwargs: object) -> int:
        raise OSError(errno.ENOSYS, "not here")

    monkeypatch.delattr(os, "copy_file_range", raising=False)
    monkeypatch.setattr(os, "sendfile", refuse, raising=False)


def _copies_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "copy_file_range", lambda *_a, **_k: 0, raising=False)


COPY_MODES: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "kernel": lambda _mp: None,
    "no copy_file_range": _no_copy_file_range,
    "no kernel copy": _no_kernel_copy,
    "copy_file_range copies nothing": _copies_nothing,
}


@pytest.mark.parametrize("mode", list(COPY_MODES))
def test_copy_paths_write_and_hash_the_same_bytes(
    mode: str, sharded_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every copy path (kernel, its fallbacks, many small chunks) writes the same bytes, and the sha256
    computed from the source on the hash thread is that of the file written."""
    model = AutoModelForCausalLM.from_pretrained(sharded_dir)
    patch = _gated_patch(model, "model.layers", "intermediate_size")
    patch = Patch(_llama_patch().deltas[1:], {}, patch.grows, patch.config_updates)  # + a same-size edit
    reference = export_checkpoint(sharded_dir, patch, tmp_path / "reference", progress=False)
    COPY_MODES[mode](monkeypatch)
    monkeypatch.setattr(export_module, "_COPY_CHUNK", 4096)
    monkeypatch.setattr(export_module, "_HASH_CHUNK", 1000)
    monkeypatch.setattr(export_module, "_READ_CHUNK", 3000)
    out = tmp_path / "out"
    result = export_checkpoint(sharded_dir, patch, out, progress=False)
    assert result["files"] == reference["files"]
    assert (
        {f["name"]: f["sha256"] for f in result["files"]}
        == _snapshot(out)
        == _snapshot(tmp_path / "reference")
    )


def test_truncated_source_is_an_input_error(
    llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "src"
    shutil.copytree(llama_dir, source)
    notes = source / "extra" / "notes.bin"
    size = notes.stat().st_size
    real_stat = Path.stat

    def lying_stat(self: Path, *args: object, **kwargs: object) -> os.stat_result:
        st = real_stat(self, *args, **kwargs)
        if self == notes:
            return os.stat_result((st.st_mode, *tuple(st)[1:6], size + 100, *tuple(st)[7:]))
        return st

    monkeypatch.setattr(Path, "stat", lying_stat)
    with pytest.raises(InputError, match="truncated"):
        export_checkpoint(source, _llama_patch(), tmp_path / "out", progress=False)
    assert _leftovers(tmp_path / "out") == []


# --------------------------------------------------------------------------- reruns and killed runs


def _six_module_patch() -> Patch:
    shapes = {"mlp.down_proj": (32, 64), "mlp.up_proj": (64, 32), "self_attn.o_proj": (32, 32)}
    return Patch(
        tuple(
            _delta(shape, f"model.layers.{layer}.{name}", rank=2, seed=10 * layer + i)
            for layer in (0, 1)
            for i, (name, shape) in enumerate(shapes.items())
        )
    )


def test_peft_adapter_is_byte_identical_between_runs(llama_dir: Path, tmp_path: Path) -> None:
    """Separate processes with different hash seeds (peft keeps target_modules in a set)."""
    patch_file = tmp_path / "patch.safetensors"
    _six_module_patch().save(patch_file)
    root = Path(__file__).resolve().parent.parent
    snapshots = []
    for seed in ("1", "2", "3"):
        out = tmp_path / f"adapter-{seed}"
        argv = ["export", "--patch", str(patch_file), "--model", str(llama_dir), "--format", "peft"]
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(root)}
        cmd = [sys.executable, "-m", "sauce_export.cli", "--quiet", *argv, "--out", str(out)]
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        snapshots.append(_snapshot(out))
    assert snapshots[0] == snapshots[1] == snapshots[2]
    config = json.loads((tmp_path / "adapter-1" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(_six_module_patch().modules)


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    return int(done.stdout)


def test_stale_temp_dirs_of_killed_runs_are_removed(llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    export_checkpoint(llama_dir, _llama_patch(), out, progress=False)
    stale = [f".out.{_dead_pid()}.k3j_x9aa.tmp", ".out.ab12cd34.tmp", ".out.old"]  # dead, legacy, swap
    kept = [f".out.{os.getpid()}.zzzzzzzz.tmp", ".out.x.12.abcdefgh.tmp", ".outer.1.abcdefgh.tmp"]
    for name in stale + kept:  # kept: a live writer's, and those of other targets
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")
    export_checkpoint(llama_dir, _llama_patch(), out, overwrite=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == sorted(kept)
    check_export(llama_dir, out)


def test_swap_killed_between_renames_is_rolled_back(llama_dir: Path, tmp_path: Path) -> None:
    """Where no atomic exchange exists, a kill between the two renames strands the old output in
    ``.NAME.old``; the next write to NAME puts it back before anything else."""
    out = tmp_path / "out"
    export_checkpoint(llama_dir, _llama_patch(), out, progress=False)
    before = _snapshot(out)
    out.rename(tmp_path / ".out.old")
    clear_stale(out)
    assert _snapshot(out) == before and _leftovers(out) == ["out"]


@pytest.mark.slow
def test_sigkill_leaves_old_or_complete_new_output(tmp_path: Path) -> None:
    """24 exports of a 3-shard ~50 MB model killed with SIGKILL: half timed from the temp directory's
    appearance (the write phase, its swap and after), half spread over start-up and writing
    (children forked from a forkserver that has imported the exporter)."""
    import multiprocessing
    import random
    import time

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=16000,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    source = tmp_path / "src"
    LlamaForCausalLM(config).save_pretrained(source, max_shard_size="20MB")
    assert len(list(source.glob("*.safetensors"))) == 3
    patches = [Patch((_delta((256, 1024), "model.layers.3.mlp.down_proj", rank=4, seed=s),)) for s in (1, 2)]
    want = []
    for i, patch in enumerate(patches):  # the two complete outputs a trial may leave
        export_checkpoint(source, patch, tmp_path / f"ref-{i}", progress=False)
        want.append(_snapshot(tmp_path / f"ref-{i}"))
    assert want[0] != want[1]

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["sauce_export.export"])
    out = tmp_path / "out"

    def export(patch: Patch) -> multiprocessing.process.BaseProcess:
        kwargs = {"overwrite": True, "progress": False}
        child = ctx.Process(target=export_checkpoint, args=(source, patch, out), kwargs=kwargs)
        child.start()
        return child

    def writing(child: multiprocessing.process.BaseProcess) -> bool:
        return any(p.name.startswith(f".out.{child.pid}.") for p in tmp_path.iterdir())

    def started_writing(child: multiprocessing.process.BaseProcess) -> float:
        """Seconds until the child's temp directory appears (or it ends)."""
        start = time.monotonic()
        while child.is_alive() and not writing(child):
            time.sleep(0.0005)
        return time.monotonic() - start

    export(patches[0]).join()  # starts the forkserver
    child = export(patches[0])
    startup = started_writing(child)
    start = time.monotonic()
    child.join()
    write_s = time.monotonic() - start
    rng, current, outcomes = random.Random(0), 0, {"old": 0, "new": 0, "killed mid-write": 0}
    trials = 24
    for trial in range(trials):
        target = 1 - current
        child = export(patches[target])
        if trial % 2:  # from the temp directory's appearance: 0.003x to 3x the write time, log-spaced
            started_writing(child)
            delay = 3 * write_s * 0.001 ** (1 - (trial // 2 + rng.random()) / (trials // 2))
        else:  # at a moment of the start-up or the write phase
            delay = (startup + write_s) * (trial // 2 + rng.random()) / (trials // 2)
        time.sleep(delay)
        child.kill()  # SIGKILL
        child.join()
        got = _snapshot(out)
        assert got in (want[current], want[target]), f"trial {trial}: partial or absent output"
        outcomes["new" if got == want[target] else "old"] += 1
        outcomes["killed mid-write"] += writing(child)
        current = want.index(got)
    print(f"\n{trials} kills (start-up {startup:.2f} s, writing {write_s:.2f} s): {outcomes}")
    export(patches[0]).join()
    assert _snapshot(out) == want[0] and _leftovers(out) == ["out"]
