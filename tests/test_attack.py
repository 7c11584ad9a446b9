"""The attacks do what they claim on real tensors and a tiny model, and `attack` reports them consistently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sauce_export.cli import main
from sauce_export.compare import README_BEGIN, README_END
from sauce_export.data import Concept, read_rows
from sauce_export.evaluate.attacks import (
    AttackConfig,
    Probes,
    attack_data,
    fake_quantize,
    halves,
    quantized,
    relearn,
    relearn_batches,
)
from sauce_export.evaluate.baselines import answer_nll, forget_retain_rows
from sauce_export.evaluate.metrics import summary_score
from sauce_export.lm import load_model


def test_fake_quantize_rounds_each_block_to_its_grid() -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 70)  # 70 inputs: two full blocks of 32 and a padded one of 6
    w[1] = 0.0
    for bits in (8, 4):
        q = fake_quantize(w, bits)
        top = 2 ** (bits - 1) - 1
        assert q.shape == w.shape and torch.equal(q[1], torch.zeros(70))
        for start in (0, 32, 64):
            block, qb = w[:, start : start + 32], q[:, start : start + 32]
            scale = block.abs().amax(1, keepdim=True) / top
            levels = qb / scale.clamp(min=1e-12)
            assert torch.allclose(levels, levels.round(), atol=1e-4)  # on the block's integer grid
            assert levels.abs().max() <= top + 1e-4
            assert ((qb - block).abs() <= scale / 2 + 1e-6).all()  # round to nearest
    err8, err4 = ((fake_quantize(w, b) - w).abs().mean() for b in (8, 4))
    assert err4 > 8 * err8 > 0


def test_halves_split_whole_images(tiny_world: Path) -> None:
    person = json.loads((tiny_world / "world.json").read_text())["persons"][0]["name"]
    forget, _ = forget_retain_rows(read_rows(tiny_world / "train.jsonl"), [Concept("person", person)])
    first, second = halves(forget)
    assert first and second and sorted(r.id for r in first + second) == sorted(r.id for r in forget)
    assert not {r.image for r in first} & {r.image for r in second}
    assert abs(len({r.image for r in first}) - len({r.image for r in second})) <= 1
    assert halves(list(reversed(forget))) == (list(reversed(first)), list(reversed(second)))


def test_attack_data_scores_a_seeded_sample_of_the_other_half(tiny_world: Path, tiny_llava_dir: Path) -> None:
    """Relearning is measured on at most ``held_back_rows`` of the half it never trains on, the same
    rows for a given seed, and the unrelated pool does not depend on that sample's size."""
    lm = load_model(str(tiny_llava_dir))
    person = json.loads((tiny_world / "world.json").read_text())["persons"][0]["name"]
    forget, retain = forget_retain_rows(read_rows(tiny_world / "train.jsonl"), [Concept("person", person)])
    second = {r.id for r in halves(forget)[1]}
    assert len(second) > 2

    def built(held: int) -> tuple[list[str], list[str]]:
        data = attack_data(lm, forget, retain, [], {}, AttackConfig(steps=(1,), held_back_rows=held), 4)
        ids = [r.id for b in data.concept_held_back for r in b.rows]
        return ids, [r.id for b in data.unrelated_train for r in b.rows]

    (few, pool), (again, _), (every, same_pool) = built(2), built(2), built(10**6)
    assert len(few) == 2 and set(few) < second and few == again
    assert sorted(every) == sorted(second) and pool == same_pool


def test_probes_read_labels_from_separable_states() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = ["a", "b", "c"] * 20
    axis = {"a": 0, "b": 1, "c": 2}
    # layer 0: noise only; layer 1: each label shifts its own coordinate by 3
    states = torch.randn(2, 60, 8, generator=gen)
    states[1, torch.arange(60), [axis[x] for x in labels]] += 3.0
    probes = Probes.fit(states, labels)
    noise, signal = probes.predict(states)
    assert signal == labels
    assert sum(p == x for p, x in zip(noise, labels, strict=True)) < 55  # noise is not separable
    unseen = torch.randn(2, 3, 8, generator=gen)
    unseen[1, [0, 1, 2], [1, 2, 0]] += 3.0
    assert probes.predict(unseen)[1] == ["b", "c", "a"]


def test_relearning_and_quantization_on_a_tiny_model(tiny_world: Path, tiny_llava_dir: Path) -> None:
    """A few steps on one half of a person's questions teach the other half (new images); int8 weights
    change the model's logits far less than int4, and neither touches the input model."""
    lm = load_model(str(tiny_llava_dir))
    person = json.loads((tiny_world / "world.json").read_text())["persons"][0]["name"]
    forget, _ = forget_retain_rows(read_rows(tiny_world / "train.jsonl"), [Concept("person", person)])
    first, second = halves(forget)
    train = relearn_batches(lm, first, 4, 8, seed=0)
    (held,) = relearn_batches(lm, second, 1, 16, seed=0)

    @torch.no_grad()
    def nll(model: torch.nn.Module) -> float:
        return float(answer_nll(model, held))

    before = nll(lm.model)
    scored = relearn(
        lm.model, train, lora=False, lr=1e-2, steps=(1, 4), seed=0, score=lambda m: {"nll": nll(m)}
    )
    assert before > scored[1]["nll"] > scored[4]["nll"] + 0.5
    assert nll(lm.model) == pytest.approx(before)

    with torch.no_grad():
        ref = lm.model(**held.inputs).logits
        diff = {
            q: (quantized(lm.model, q)(**held.inputs).logits - ref).abs().max().item()
            for q in ("int8", "int4")
        }
        assert torch.equal(lm.model(**held.inputs).logits, ref)
    assert 0 < diff["int8"] < diff["int4"] / 4


def test_attack_command_reports_every_attack(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "attack"
    model = json.loads((tiny_run / "report.json").read_text())["export"]["path"]
    argv = ["--quiet", "attack", str(tiny_run.parent / "recipe.yaml"), "--model", model, "--out", str(out)]
    argv += ["--steps", "1,3", "--lrs-full", "1e-2", "--lrs-lora", "3e-2,1e-1", "--batch-size", "8"]
    assert main([*argv, "--quant", "int4", "--unrelated-rows", "8"]) == 0
    result = json.loads((out / "attack.json").read_text())
    names = ["context", "paraphrase", "int4"] + [
        f"relearn {d} {m} {s}" for d in ("concept", "unrelated") for m in ("full", "LoRA") for s in (1, 3)
    ]
    assert list(result["attacks"]) == names
    plain, context = result["original"]["plain"]["concepts"], result["original"]["context"]["concepts"]
    for name, p in result["attacks"].items():
        reference = context if name == "context" else plain
        if name == "paraphrase":
            reference = {c: {**m, "forget_acc": m["generality_acc"]} for c, m in plain.items()}
        want = [summary_score(p["concepts"][c], reference[c]) for c in reference]
        assert p["score"] == pytest.approx(sum(want) / len(want))
    scores = {n: p["score"] for n, p in result["attacks"].items()}
    assert result["robust_score"] == min(scores.values()) and scores[result["worst_attack"]] == min(
        scores.values()
    )
    assert result["attacks"]["relearn concept LoRA 3"]["lr"] in (3e-2, 1e-1)
    assert 0.0 <= result["attacks"]["relearn concept full 3"]["half_acc"] <= 1.0
    assert set(result["probes"]) == set(result["concepts"])
    for probe in result["probes"].values():
        assert len(probe["forget_read"]) == len(probe["validation_acc"]) == len(probe["original_read"]) >= 2
    md = (out / "attack.md").read_text()
    assert f"**{result['robust_score']:.3f}**" in md and "| relearn unrelated LoRA 1 |" in md
    capsys.readouterr()


def test_attack_bad_input_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"
    base = ["--quiet", "attack", str(recipe), "--model", "x", "--out", str(tmp_path)]
    for extra, needle in (
        (["--quant", "int3"], "--quant"),
        (["--steps", "0,5"], "--steps"),
        (["--lrs-lora", "fast"], "--lrs-lora"),
        (["--batch-size", "0"], "--batch-size"),
    ):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err


def test_compare_attacks_every_chosen_model(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`compare --attacks`: SAUCE and each baseline (chosen on validation rows) get the same attacks;
    the report, the README table's robust columns and the relearning plot come from them."""
    out = tmp_path / "cmp"
    argv = [
        "--quiet",
        "compare",
        str(tiny_run.parent / "recipe.yaml"),
        "--run",
        str(tiny_run),
        "--out",
        str(out),
    ]
    argv += ["--settings", "multi", "--methods", "PO", "--steps", "1,2", "--batch-size", "8"]
    argv += ["--lrs-full", "1e-3", "--lrs-lora", "1e-2", "--attacks", "--attack-steps", "1,2"]
    assert main([*argv, "--attack-lrs-full", "1e-2", "--attack-lrs-lora", "", "--attack-rows", "16"]) == 0
    result = json.loads((out / "compare.json").read_text())
    (entry,) = result["settings"].values()
    assert set(entry["methods"]) == {"SAUCE (exported)", "PO (full)", "PO (LoRA)"}
    names = None
    for method in entry["methods"].values():
        found = method["attacks"]
        assert names is None or list(found["attacks"]) == names
        names = list(found["attacks"])
        assert found["robust_score"] == min(p["score"] for p in found["attacks"].values())
    assert "relearn concept full 2" in names and "int4" in names
    assert not any("LoRA" in n for n in names)  # an empty learning-rate list skips the mode
    assert (out / "compare-relearn.png").stat().st_size > 0
    md = (out / "compare.md").read_text()
    sauce = entry["methods"]["SAUCE (exported)"]["attacks"]
    assert f"| SAUCE (exported) | {sauce['plain']['score']:.3f} (" in md
    assert f"| {sauce['robust_score']:.3f} | {sauce['worst_attack']} |" in md
    readme = tmp_path / "README.md"
    readme.write_text(f"{README_BEGIN}\n{README_END}\n")
    assert main(["compare-readme", str(out / "compare.json"), "--readme", str(readme)]) == 0
    header, _, row = readme.read_text().splitlines()[1:4]
    assert (
        "| SAUCE robust (1 relearning steps / all) | best baseline robust (1 relearning steps / all) |"
        in header
    )
    po = [entry["methods"][m]["attacks"] for m in ("PO (full)", "PO (LoRA)")]
    light = [min(p["score"] for n, p in a["attacks"].items() if not n.endswith(" 2")) for a in po]
    sauce_light = min(p["score"] for n, p in sauce["attacks"].items() if not n.endswith(" 2"))
    assert sauce_light >= sauce["robust_score"]
    baseline = max(a["robust_score"] for a in po)
    assert f"| {sauce_light:.3f} / {sauce['robust_score']:.3f} | {max(light):.3f} (" in row
    assert f") / {baseline:.3f} (" in row
    # a second file (another setting, a smaller attack budget) merges into the same table
    other = json.loads((out / "compare.json").read_text())
    other["settings"] = {"both": entry}
    other["attack_config"]["lrs_full"] = []
    (tmp_path / "other.json").write_text(json.dumps(other))
    both = [
        "compare-readme",
        str(out / "compare.json"),
        str(tmp_path / "other.json"),
        "--readme",
        str(readme),
    ]
    assert main(both) == 0
    lines = readme.read_text().splitlines()
    assert [line.split(" | ")[0] for line in lines[3:5]] == [
        f"| {n}: {', '.join(entry['concepts'])}" for n in ("multi", "both")
    ]
    assert (
        "relearning lr 0.01 / none (full / LoRA)" in lines[6]
        and "other.json`: relearning lr none / none" in lines[6]
    )
    other["budget"]["steps"] = [9]
    (tmp_path / "other.json").write_text(json.dumps(other))
    capsys.readouterr()
    assert main(both) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "other.json" in err and "budget" in err
