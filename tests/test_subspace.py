"""edit.method: subspace on the shipped text model: it forgets, keeps the rest, exports exactly,
and its patch writes nothing outside the selected latents' decoder directions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from sauce_export.cli import main
from sauce_export.compare import README_BEGIN, README_END
from sauce_export.data import read_rows
from sauce_export.evaluate.metrics import summary_score
from sauce_export.patch import Patch
from sauce_export.sae.formats import load_sae
from sauce_export.subspace import outside_span, suppress_loss

ROOT = Path(__file__).resolve().parents[1]
WORLD_LLAMA = ROOT / "models" / "world-llama"


def text_recipe(tmp: Path, **subspace: object) -> tuple[Path, list[str]]:
    """``recipes/demo-text.yaml`` (the shipped text model and its fact world, ``world build --kind
    text``) with the subspace patch, its latents, lr and steps searched on a small grid."""
    assert main(["--quiet", "world", "build", "--kind", "text", "--out", str(tmp / "world")]) == 0
    demo = yaml.safe_load((ROOT / "recipes" / "demo-text.yaml").read_text())
    persons = [c["name"] for c in demo["concepts"]]
    recipe = {
        "model": str(WORLD_LLAMA),
        "concepts": [{"kind": "person", "name": p} for p in persons],
        "data": {f: str(tmp / "world" / f"{f}.jsonl") for f in ("train", "validation", "eval")},
        "sae": {"epochs": 2},
        "edit": {"method": "subspace"},
        "eval": {"fidelity_rows": 16},
        "subspace": {"latents_grid": [4, 8], "lrs": [0.1], "step_grid": [50, 100], **subspace},
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
    # exported vs its reference (the in-memory patch) passes on any CPU: they are the same weights;
    # the reference's own gates (vs the original) are checked above with margins
    exported = [ch for ch in report["gates"]["checks"] if " exported " in ch["name"]]
    assert len(exported) == 3 * len(persons) and all(ch["passed"] for ch in exported)
    # latents, lr and steps were chosen on validation rows: the chosen point passed there
    cal = report["calibration"]
    assert cal["validation"]["source"].endswith("validation.jsonl") and cal["evaluations"] >= 1
    chosen = [e for e in cal["table"] if e["chosen"]]
    assert {e["concept"] for e in chosen} == {f"person:{p}" for p in persons}
    assert all(e["passed"] and e["top_n"] == cal["subspace"]["latents"] for e in chosen)
    assert report["fold"]["description"]["steps"] == cal["subspace"]["steps"]
    assert all(len(c["features"]) == cal["subspace"]["latents"] for c in report["concepts"])
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


def test_report_and_card_list_each_latent_with_its_top_train_tokens(
    subspace_run: tuple[Path, dict, list[str]],
) -> None:
    run, report, _ = subspace_run
    tokens = report["fold"]["top_tokens"]
    features = report["fold"]["description"]["features"]
    assert set(tokens) == {str(f) for f in features}
    train_ids = {r.id for r in read_rows(report["recipe"]["data"]["train"])}
    for found in tokens.values():
        acts = [t["act"] for t in found]
        assert acts == sorted(acts, reverse=True) and all(a > 0 for a in acts)
        assert all(t["row"] in train_ids and t["token"] and "person" in t["labels"] for t in found)
    assert any(tokens.values())
    card = (run / "export" / "model" / "README.md").read_text()
    assert "carries the subspace patch, not the clamp" in card
    for text in ((run / "report.md").read_text(), card):
        assert "## Latents of the subspace patch" in text
        for f in features:
            assert f"| {f} | person:" in text
        assert ", person " in text  # each top token names the person of its row


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


def test_compare_has_a_subspace_row_on_the_baselines_budget(
    subspace_run: tuple[Path, dict, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`compare` fits the subspace patch with the baselines' steps and batch, at the latents and lr the
    run chose on validation rows, and scores it like every method; compare-readme shows its column."""
    run, report, persons = subspace_run
    recipe, out = run.parent / "recipe.yaml", tmp_path / "cmp"
    argv = ["--quiet", "compare", str(recipe), "--run", str(run), "--out", str(out), "--settings", "single"]
    argv += ["--methods", "PO,subspace", "--steps", "30", "--lrs-full", "1e-3", "--lrs-lora", "3e-3"]
    assert main(argv) == 0
    result = json.loads((out / "compare.json").read_text())
    (entry,) = result["settings"].values()
    assert set(entry["methods"]) == {"SAUCE (exported)", "SAUCE subspace", "PO (full)", "PO (LoRA)"}
    best = entry["methods"]["SAUCE subspace"]["best"]
    cal = report["calibration"]["subspace"]
    assert best["hparams"] == {"latents": cal["latents"], "lr": cal["lr"], "steps": 30, "batch_size": 16}
    name = f"person:{persons[0]}"
    metrics, original = best["concepts"][name], entry["original"]["concepts"][name]
    assert best["score"] == pytest.approx(summary_score(metrics, original))
    assert original["forget_acc"] == 1.0 and metrics["forget_acc"] <= 0.5 and best["score"] >= 0.5
    readme = tmp_path / "README.md"
    readme.write_text(f"{README_BEGIN}\n{README_END}\n")
    assert main(["compare-readme", str(out / "compare.json"), "--readme", str(readme)]) == 0
    head, _, row = readme.read_text().splitlines()[1:4]
    assert head.split(" | ")[2] == "SAUCE subspace" and row.split(" | ")[2] == f"{best['score']:.3f}"
    capsys.readouterr()


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning")  # PEFT asks transformers 5
def test_peft_adapter_of_the_patch_matches_the_patched_model(
    subspace_run: tuple[Path, dict, list[str]], tmp_path: Path
) -> None:
    """`export --format peft` of the subspace patch: stock PEFT on the source model gives the patched
    model's logits (lora_B = the orthonormal basis, lora_A = the fitted A)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, _, _ = subspace_run
    patch_file, out = run / "fold" / "patch.safetensors", tmp_path / "adapter"
    argv = ["--quiet", "export", "--patch", str(patch_file), "--model", str(WORLD_LLAMA), "--out", str(out)]
    assert main([*argv, "--format", "peft"]) == 0
    inputs = AutoTokenizer.from_pretrained(WORLD_LLAMA)(["What is the hobby of Lumrax?"], return_tensors="pt")
    model = AutoModelForCausalLM.from_pretrained(WORLD_LLAMA)
    with torch.no_grad():
        before = model(**inputs).logits
        with Patch.load(patch_file).apply(model):
            want = model(**inputs).logits
        got = PeftModel.from_pretrained(model, out)(**inputs).logits
    assert (got - want).abs().max() <= 1e-4 < (before - want).abs().max()


def test_dry_run_sizes_the_subspace_patch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One writer (down_proj of the site layer), rank = concepts x the largest latent count searched."""
    recipe, persons = text_recipe(tmp_path)
    capsys.readouterr()  # world build's output
    assert main(["run", str(recipe), "--out", str(tmp_path / "run"), "--dry-run", "--json"]) == 0
    fold = json.loads(capsys.readouterr().out)["fold"]
    assert fold["method"] == "subspace" and fold["rank"] == 8 * len(persons)
    (writer,) = fold["writers"]
    assert writer["module"] == "model.layers.1.mlp.down_proj" and writer["shape"] == [128, 384]
    assert fold["patch_params"] == fold["rank"] * (128 + 384)
