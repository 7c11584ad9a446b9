"""``runtime``: the model runs in the dtype the recipe asks for, from collection to verification.

A bfloat16 run of the tiny model must keep every parameter bf16 (nothing upcasts the model), store
its activations in bf16 (``collect.dtype`` defaults to the model's) and still export the source's
own on-disk dtype (export streams the source files and adds the float32 patch, cast back).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoConfig

from sauce_export.activations import ActivationStore
from sauce_export.cli import main
from sauce_export.dry_run import dry_run
from sauce_export.errors import InputError
from sauce_export.pipeline import Run
from sauce_export.recipe import load_recipe
from sauce_export.runtime import resolve_device, resolve_dtype

ROOT = Path(__file__).resolve().parent.parent


def _tensor_dtypes(directory: Path) -> dict[str, str]:
    dtypes = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
                dtypes[key] = f.get_slice(key).get_dtype()
    return dtypes


@pytest.fixture(scope="module")
def bf16_recipe(tmp_path_factory: pytest.TempPathFactory, tiny_world: Path, tiny_llava_dir: Path) -> Path:
    person = json.loads((tiny_world / "world.json").read_text())["persons"][0]["name"]
    tmp = tmp_path_factory.mktemp("bf16")
    # bf16 matmuls are slow on CPUs: evaluate on the person questions and the other questions
    # about images showing that person (forget, generality, retain and interference all non-empty).
    eval_rows = []
    for line in (tiny_world / "eval.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["question_kind"] == "person" or row["labels"].get("person") == person:
            eval_rows.append({**row, "image": str(tiny_world / row["image"])})
    (tmp / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
    recipe = {
        "model": str(tiny_llava_dir),
        "site": "layers.1",
        "runtime": {"device": "cpu", "dtype": "bfloat16"},
        "concepts": [{"kind": "person", "name": person}],
        "data": {"train": str(tiny_world / "train.jsonl"), "eval": str(tmp / "eval.jsonl")},
        "collect": {"max_rows": 40, "batch_size": 16},
        "sae": {"expansion": 2, "k": 8, "epochs": 1},
        "select": {"top_n": 3},
        "eval": {"batch_size": 64, "fidelity_rows": 8},
        "fold": {"calib_rows": 24, "refine_steps": 3},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_bfloat16_run_keeps_dtypes(bf16_recipe: Path, tiny_llava_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run = Run(load_recipe(bf16_recipe), out, progress=False)
    run.verify()  # every stage: collect, train-sae, select, fold, export, verify
    assert run.lm.dtype == torch.bfloat16
    assert {p.dtype for p in run.lm.model.parameters()} == {torch.bfloat16}  # nothing upcast it
    assert {s.acts.dtype for s in ActivationStore(out / "collect" / "acts").shards()} == {torch.bfloat16}
    assert {p.dtype for p in run.sae().parameters()} == {torch.float32}  # the SAE stays float32
    source, exported = _tensor_dtypes(tiny_llava_dir), _tensor_dtypes(out / "export" / "model")
    assert set(source.values()) == {"F32"} and exported == source  # the source's dtype, not the run's

    # `run` on the same directory reuses every stage (same dtype, same hash) and writes the report.
    verified = (out / "verify" / "stage.json").stat().st_mtime_ns
    assert main(["--quiet", "run", str(bf16_recipe), "--out", str(out)]) in (0, 1)
    assert (out / "verify" / "stage.json").stat().st_mtime_ns == verified
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["runtime"]["dtype"] == "bfloat16"
    metrics = report["concepts"][0]["metrics"]["exported"]
    assert all(math.isfinite(v) for v in metrics.values() if v is not None)
    assert "torch.bfloat16" in json.loads((out / "collect" / "stage.json").read_text())["key"]


def test_cli_flags_override_the_recipe(bf16_recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["run", str(bf16_recipe), "--out", "unused", "--dry-run", "--json"]
    assert main([*argv, "--dtype", "float32", "--device", "cuda:3"]) == 0
    memory = json.loads(capsys.readouterr().out)["memory"]
    assert (memory["load_dtype"], memory["device"]) == ("float32", "cuda:3")
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["memory"]["load_dtype"] == "bfloat16"


def test_collect_dtype_overrides_the_model_dtype(bf16_recipe: Path, tmp_path: Path) -> None:
    recipe = load_recipe(bf16_recipe)
    recipe.collect.dtype = "float32"
    recipe.collect.max_rows = 8
    store = Run(recipe, tmp_path / "run", progress=False).collect()
    assert {s.acts.dtype for s in store.shards()} == {torch.float32}


def test_auto_dtype_is_the_checkpoints() -> None:
    llava = AutoConfig.from_pretrained(ROOT / "tests/fixtures/llava-1.5-7b")  # float16 on the Hub
    mllama = AutoConfig.from_pretrained(ROOT / "tests/fixtures/llama-3.2-11b-vision")  # bfloat16
    assert resolve_dtype("auto", llava) == torch.float16
    assert resolve_dtype("auto", mllama) == torch.bfloat16
    assert resolve_dtype("float32", llava) == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_missing_cuda_device_is_bad_input() -> None:
    assert resolve_device("auto", "r.yaml") == torch.device("cpu")
    with pytest.raises(InputError, match=r"runtime\.device: cuda:1 requested but this machine has 0"):
        resolve_device("cuda:1", "r.yaml")


def test_dry_run_memory_follows_the_dtype() -> None:
    recipe = load_recipe(ROOT / "recipes/llava-1.5-7b.yaml")
    model = str(ROOT / "tests/fixtures/llava-1.5-7b")
    native = dry_run(recipe, model)
    recipe.runtime.dtype, recipe.runtime.device = "float32", "cuda:0"
    recipe.collect.dtype = "bfloat16"
    wide = dry_run(recipe, model)
    assert native["memory"]["load_dtype"] == "float16" and wide["memory"]["load_dtype"] == "float32"
    assert wide["memory"]["model_bytes"] == 2 * native["memory"]["model_bytes"]
    assert 13.5e9 < native["memory"]["model_bytes"] < 14.5e9  # LLaVA-1.5-7B in float16: ~14 GB
    assert wide["memory"]["device"] == "cuda:0"
    assert wide["collect"]["dtype"] == "bfloat16" and wide["collect"]["bytes"] == native["collect"]["bytes"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: `make gpu-check` runs it")
def test_gpu_check_skips_without_cuda() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's package, as `make` runs it
    script = str(ROOT / "benchmarks/gpu_check.py")
    done = subprocess.run([sys.executable, script], capture_output=True, text=True, check=False, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("gpu-check: skipped")
