"""edit.method: subspace on the shipped text model: it forgets, keeps the others, exports exactly,
and its patch writes nothing outside the selected latents' decoder directions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from sauce_export.cli import main
from sauce_export.data import write_jsonl
from sauce_export.patch import Patch
from sauce_export.sae.formats import load_sae
from sauce_export.subspace import outside_span, suppress_loss
from sauce_export.world.generate import World, WorldConfig

WORLD_LLAMA = Path(__file__).resolve().parents[1] / "models" / "world-llama"


def text_recipe(tmp: Path, **subspace: object) -> tuple[Path, list[str]]:
    """The world-llama's fact questions relabelled as questions about their person (docs/compare-text.md),
    and a recipe removing two persons with the subspace patch."""
    world = World.make(WorldConfig(seed=0))
    rows = [{**r, "question_kind": "person"} for r in world.fact_rows()]
    write_jsonl(tmp / "train.jsonl", [r for r in rows if r["split"] == "train"])
    write_jsonl(tmp / "eval.jsonl", [r for r in rows if r["split"] != "train"])
    persons = [p.name for p in world.persons[:2]]
    recipe = {
        "model": str(WORLD_LLAMA),
        "site": "layers.1",
        "concepts": [{"kind": "person", "name": p} for p in persons],
        "data": {"train": str(tmp / "train.jsonl"), "eval": str(tmp / "eval.jsonl")},
        "sae": {"epochs": 2},
        "edit": {"method": "subspace"},
        "eval": {"fidelity_rows": 16, "forget_split": "facts", "generality_split": "facts_paraphrase"},
        "subspace": {"latents": 8, **subspace},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, persons


@pytest.fixture(scope="module")
def subspace_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[str]]:
    tmp = tmp_path_factory.mktemp("subspace")
    recipe, persons = text_recipe(tmp)
    code = main(["--quiet", "run", str(recipe), "--out", str(tmp / "run")])
    report = json.loads((tmp / "run" / "report.json").read_text())
    assert code == (0 if report["gates"]["passed"] else 1)
    return tmp / "run", report, persons


def test_subspace_forgets_keeps_and_exports_exactly(subspace_run: tuple[Path, dict, list[str]]) -> None:
    """The patch is the reference: it forgets both persons' facts and keeps the other persons'; the
    reloaded export matches the in-memory patch; the hooked clamp is reported beside it."""
    run, report, persons = subspace_run
    assert report["reference"] == "folded" and report["fold"]["description"]["method"] == "subspace"
    assert [c["name"] for c in report["concepts"]] == persons
    for c in report["concepts"]:
        m = c["metrics"]
        assert m["original"]["forget_acc"] == 1.0 and m["original"]["retain_acc"] >= 0.95
        for variant in ("folded", "exported"):
            assert m[variant]["forget_acc"] <= c["chance_acc"], variant
            assert m[variant]["retain_acc"] >= 0.9 * m["original"]["retain_acc"], variant
        assert m["exported"]["kl_vs_folded_retain"] < 1e-6 and m["exported"]["top1_agree_vs_folded"] == 1.0
        assert m["hooked"]["forget_acc"] is not None  # the clamp, for contrast
    assert report["gates"]["passed"]
    assert any(ch["name"].endswith("KL(folded||exported) retain <= 0.05") for ch in report["gates"]["checks"])
    assert "Fidelity to the folded reference" in (run / "report.md").read_text()


def test_patch_lies_in_the_span_of_the_selected_decoder_directions(
    subspace_run: tuple[Path, dict, list[str]],
) -> None:
    """Every column of the saved delta is a combination of W_dec[S] rows (least squares against the
    SAE's own decoder, not the patch's basis), and the per-latent write norms are reported."""
    run, report, _ = subspace_run
    patch = Patch.load(run / "fold" / "patch.safetensors")
    sae = load_sae(run / "train-sae" / "sae")
    features = report["fold"]["description"]["features"]
    assert sorted(features) == sorted({f for c in report["concepts"] for f in c["features"]})
    (delta,) = patch.deltas
    dense = delta.dense().double()
    directions = sae.W_dec[features].detach().double().T  # [d, k]
    coeff = torch.linalg.lstsq(directions, dense).solution
    assert float((directions @ coeff - dense).norm() / dense.norm()) < 1e-6
    assert outside_span(patch, sae, features) < 1e-5
    # Another latent set does not span it: the check can fail.
    others = [i for i in range(sae.cfg.d_sae) if i not in features][: len(features)]
    assert outside_span(patch, sae, others) > 0.5
    writes = report["fold"]["description"]["writes"]
    assert set(writes) == {str(f) for f in features} and all(v >= 0 for v in writes.values())
    assert max(writes.values()) > 0


def test_suppress_loss_is_a_hinge_on_the_answer_logit() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 5.0, 1.0]])
    targets = torch.tensor([0, 2])
    # row 0: 3 - 1 + 1 = 3; row 1: 1 - 5 + 1 < 0 -> 0
    assert float(suppress_loss(logits, targets, 1.0)) == pytest.approx(1.5)


def test_a_bad_subspace_key_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe, _ = text_recipe(tmp_path, objective="forget-everything")
    assert main(["--quiet", "run", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(recipe) in err and "subspace.objective" in err
