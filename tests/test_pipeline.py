"""End to end on a tiny world and a tiny (untrained) VLM: every stage, the report, resumption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sauce_export.cli import main
from sauce_export.sae.formats import save_sae
from sauce_export.sae.model import SAE, SaeConfig


def _write_recipe(tmp_path: Path, world: Path, model: Path, **sae: object) -> Path:
    persons = json.loads((world / "world.json").read_text())["persons"]
    recipe = {
        "model": str(model),
        "site": "layers.1",
        "concepts": [{"kind": "person", "name": persons[0]["name"]}, {"kind": "event", "name": "concert"}],
        "data": {"train": str(world / "train.jsonl"), "eval": str(world / "eval.jsonl")},
        "collect": {"max_rows": 60, "batch_size": 16},
        "sae": {"expansion": 2, "k": 8, "epochs": 2, **sae},
        "select": {"top_n": 3},
        "eval": {"batch_size": 64, "fidelity_rows": 16},
        "fold": {"calib_rows": 48, "refine_steps": 5},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_run_writes_report_and_resumes(
    tmp_path: Path, tiny_world: Path, tiny_llava_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _write_recipe(tmp_path, tiny_world, tiny_llava_dir)
    out = tmp_path / "run"
    code = main(["--quiet", "run", str(recipe), "--out", str(out)])
    assert code in (0, 1)  # an untrained model may fail the gates; the run itself must work
    report = json.loads((out / "report.json").read_text())
    assert {"concepts", "gates", "sae", "recipe", "fold", "export"} <= set(report)
    assert {"fvu", "l0", "dead_frac"} <= set(report["sae"])
    assert len(report["concepts"]) == 2
    cal = report["calibration"]
    for concept in report["concepts"]:
        assert {"name", "kind", "chance_acc", "features", "metrics"} <= set(concept)
        choice = cal["choices"][f"{concept['kind']}:{concept['name']}"]
        assert concept["calibrated"] and concept["features"] == choice["features"]
        assert len(concept["features"]) == choice["top_n"] and concept["clamp"] == choice["clamp"]
        for variant in ("original", "hooked", "folded", "exported"):
            for metric in ("forget_acc", "generality_acc", "retain_acc", "interference_acc"):
                value = concept["metrics"][variant][metric]
                assert value is None or 0.0 <= value <= 1.0
        hooked, exported = concept["metrics"]["hooked"], concept["metrics"]["exported"]
        assert hooked["kl_vs_hooked_retain"] == 0.0 and hooked["top1_agree_vs_hooked"] == 1.0
        for key in (
            "kl_vs_hooked_forget",
            "kl_vs_hooked_retain",
            "top1_agree_vs_hooked",
            "cos_site_vs_hooked",
        ):
            assert exported[key] >= 0.0
        # the exported checkpoint reloaded from disk behaves like the in-memory fold
        assert exported["kl_vs_hooked_retain"] == pytest.approx(
            concept["metrics"]["folded"]["kl_vs_hooked_retain"], abs=1e-5
        )
    assert report["gates"]["passed"] == (code == 0)
    assert all({"name", "value", "threshold", "passed"} <= set(c) for c in report["gates"]["checks"])
    assert "| concept | model |" in (out / "report.md").read_text()
    assert (out / "select" / "scores.json").exists()
    assert (out / "fold" / "patch.safetensors").exists()
    assert (out / "metrics.png").stat().st_size > 1000 and (out / "features.png").stat().st_size > 1000
    exported_dir = Path(report["export"]["path"])
    assert (exported_dir / "config.json").read_bytes() == (tiny_llava_dir / "config.json").read_bytes()

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/stage.json")}
    assert len(stamps) == 7
    assert main(["--quiet", "run", str(recipe), "--out", str(out)]) == code
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("*/stage.json")}  # nothing recomputed
    capsys.readouterr()


@pytest.mark.parametrize(
    ("sae_cfg", "needles"),
    [
        (SaeConfig(d_in=64, d_sae=128, site="layers.1"), ["d_in", "64"]),
        (SaeConfig(d_in=128, d_sae=256, site="layers.3"), ["site", "layers.3"]),
    ],
)
def test_loaded_sae_mismatch_exits_2(
    tmp_path: Path,
    tiny_world: Path,
    tiny_llava_dir: Path,
    capsys: pytest.CaptureFixture[str],
    sae_cfg: SaeConfig,
    needles: list[str],
) -> None:
    sae_dir = save_sae(SAE(sae_cfg), tmp_path / "foreign-sae")
    recipe = _write_recipe(tmp_path, tiny_world, tiny_llava_dir, path=str(sae_dir))
    assert main(["--quiet", "train-sae", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert str(recipe) in err and len(err.splitlines()) == 1
    assert all(n in err for n in needles), err
