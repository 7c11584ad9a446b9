"""No remote code, ever: a model folder's own Python is never imported, whatever stdin says."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sauce_export.card import code_note
from sauce_export.errors import InputError
from sauce_export.export import export_checkpoint
from sauce_export.hf_config import read_config
from sauce_export.lm import load_model
from sauce_export.patch import Patch, WeightDelta

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "world-llama"
CODE = """
from pathlib import Path
Path(__file__).with_name("EXECUTED").write_text("remote code ran")
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    model_type = "{model_type}"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
"""


def _with_code(tmp_path: Path, model_type: str) -> Path:
    """The shipped text model with ``auto_map`` pointing at a ``.py`` file that marks its execution."""
    folder = tmp_path / f"code-{model_type}"
    shutil.copytree(SHIPPED, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {
        "AutoConfig": "modeling_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilModel",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    (folder / "modeling_evil.py").write_text(CODE.format(model_type=model_type))
    return folder


def _cli(args: list[str], stdin: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from sauce_export.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, "--quiet", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _patch(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    delta = WeightDelta(
        "model.layers.1.mlp.down_proj",
        B=torch.randn(128, 2, generator=g) * 0.01,
        A=torch.randn(2, 384, generator=g) * 0.01,
    )
    path = tmp_path / "patch.safetensors"
    Patch((delta,)).save(path)
    return path


def test_unknown_model_type_with_auto_map_never_runs_its_code(tmp_path: Path) -> None:
    folder = _with_code(tmp_path, "sauce_evil")
    result = _cli(
        ["export", "--model", str(folder), "--patch", str(_patch(tmp_path)), "--out", str(tmp_path / "out")],
        stdin="y\ny\n",
    )
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "config.json" in result.stderr and "auto_map" in result.stderr
    assert not (folder / "EXECUTED").exists()
    assert not (tmp_path / "out").exists()


def test_every_loader_refuses_without_reading_stdin(tmp_path: Path) -> None:
    folder = _with_code(tmp_path, "sauce_evil")
    for load in (read_config, load_model):
        with pytest.raises(InputError, match="auto_map"):
            load(str(folder))
    assert not (folder / "EXECUTED").exists()


def test_known_architecture_with_code_files_loads_stock_classes_and_the_card_says_so(tmp_path: Path) -> None:
    """auto_map beside a model_type transformers knows: the stock class loads, the file never runs,
    the export copies it byte for byte and its card warns about it."""
    folder = _with_code(tmp_path, "llama")
    lm = load_model(str(folder))
    assert type(lm.model).__module__.startswith("transformers.models.llama")
    assert not (folder / "EXECUTED").exists()
    out = tmp_path / "out"
    export_checkpoint(folder, Patch.load(_patch(tmp_path)), out, progress=False)
    assert (out / "modeling_evil.py").read_bytes() == (folder / "modeling_evil.py").read_bytes()
    assert not (folder / "EXECUTED").exists() and not (out / "EXECUTED").exists()
    assert "`modeling_evil.py`" in code_note(out, "finetune")
    assert code_note(SHIPPED, "finetune") == ""


def test_unknown_model_type_without_code_is_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "odd"
    shutil.copytree(SHIPPED, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "banana_lm"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError) as err:
        read_config(folder)
    assert "model_type" in str(err.value) and "banana_lm" in str(err.value)
    assert "\n" not in str(err.value)
