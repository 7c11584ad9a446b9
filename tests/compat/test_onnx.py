"""ONNX Runtime parity: the exported checkpoint through torch.onnx.export vs transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from sauce_export.convert import check_onnx, export_onnx

pytestmark = pytest.mark.compat


def _show(name: str, report: dict) -> None:
    print(f"\n{name}: " + json.dumps({k: v for k, v in report.items() if k != "greedy"}))
    for g in report["greedy"]:
        print(f"  greedy equal={g['equal']} {g['transformers']}")


def test_onnx_text_parity(text_export: Path, prompts: list[str], tmp_path: Path) -> None:
    result = export_onnx(text_export, tmp_path / "onnx")
    assert result["inputs"] == ["input_ids", "attention_mask"]
    assert (tmp_path / "onnx" / "tokenizer.json").is_file()
    report = check_onnx(text_export, Path(result["path"]), prompts)
    _show(f"onnx text ({result['seconds']} s export)", report)
    assert report["max_abs_diff"] <= report["atol"] == 1e-4
    assert all(g["equal"] for g in report["greedy"])
    assert report["passed"]


def test_onnx_vlm_parity(demo_vlm: Path, prompts: list[str], tmp_path: Path) -> None:
    result = export_onnx(demo_vlm, tmp_path / "onnx")
    assert result["inputs"] == ["input_ids", "attention_mask", "pixel_values"]
    report = check_onnx(demo_vlm, Path(result["path"]), prompts)
    _show(f"onnx vlm ({result['seconds']} s export)", report)
    assert report["passed"]
