"""torchrun with two CPU ranks (gloo) runs the whole pipeline and agrees with one rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _run(recipe: Path, out: Path, ranks: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cli = ["-m", "sauce_export", "--quiet", "run", str(recipe), "--out", str(out)]
    if ranks > 1:  # torchrun as a module of this interpreter; --standalone picks a free local port
        cli = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *cli]
    return subprocess.run([sys.executable, *cli], env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, small_recipe: dict) -> dict[int, Path]:
    tmp = tmp_path_factory.mktemp("distributed")
    # More rows than small_recipe and small SAE batches, so the SAE takes ~300 steps and its FVU is
    # a measurement, not the noise of a few steps. One shard per rank: batches are drawn from a shard,
    # so shards of consecutive rows would make the FVU depend on how the rows were cut.
    # Every other evaluation row: verify dominates the run's time, the split is what is under test.
    rows = Path(small_recipe["data"]["eval"]).read_text().splitlines()
    (tmp / "eval.jsonl").write_text("\n".join(rows[::2]) + "\n")
    (tmp / "images").symlink_to(Path(small_recipe["data"]["eval"]).parent / "images")  # paths are relative
    recipe = {
        **small_recipe,
        "data": {**small_recipe["data"], "eval": str(tmp / "eval.jsonl")},
        "collect": {"max_rows": 96, "batch_size": 16},
        "sae": {"expansion": 2, "k": 8, "epochs": 8, "batch_size": 128},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = {}
    for ranks in (1, 2):
        out[ranks] = tmp / f"ranks-{ranks}"
        done = _run(path, out[ranks], ranks)
        # 1: a gate of the untrained model; torchrun also exits 1 when a rank dies, hence the report.
        # In one of three fresh-clone CI runs (3 Dec 2026) a 2-rank run died without a report (not
        # reproduced in 9 runs alone nor in a full run; cause unknown, suspect: the rendezvous port race
        # of --standalone): one retry, with the failure and torchrun's stderr as a warning.
        if ranks > 1 and not (out[ranks] / "report.json").is_file():
            warnings.warn(
                f"2-rank run retried after exit {done.returncode}: {done.stderr[-2000:]}", stacklevel=1
            )
            done = _run(path, out[ranks], ranks)
        finished = done.returncode in (0, 1) and (out[ranks] / "report.json").is_file()
        assert finished, f"exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        out[ranks].joinpath("exit").write_text(str(done.returncode))
    return out


def test_two_ranks_agree_with_one(runs: dict[int, Path]) -> None:
    one, two = (json.loads((runs[n] / "report.json").read_text()) for n in (1, 2))
    assert runs[1].joinpath("exit").read_text() == runs[2].joinpath("exit").read_text()
    assert abs(two["sae"]["fvu"] - one["sae"]["fvu"]) <= 0.1 * one["sae"]["fvu"], (one["sae"], two["sae"])
    assert [c["passed"] for c in two["gates"]["checks"]] == [c["passed"] for c in one["gates"]["checks"]]
    # Evaluation rows were split between the ranks and gathered: every row scored once.
    assert two["concepts"][0]["counts"] == one["concepts"][0]["counts"]


def test_each_rank_collected_its_share(runs: dict[int, Path]) -> None:
    whole = json.loads((runs[1] / "collect" / "acts" / "manifest.json").read_text())
    merged = json.loads((runs[2] / "collect" / "acts" / "manifest.json").read_text())
    parts = [
        json.loads((runs[2] / "collect" / "acts" / f"rank-{r}" / "manifest.json").read_text()) for r in (0, 1)
    ]
    assert len(merged["parts"]) == 2 and all(merged["parts"])
    assert sum(p["tokens"] for p in parts) == merged["tokens"] == whole["tokens"]
    assert sum(p["done_rows"] for p in parts) == whole["done_rows"] == whole["rows"]
    cost = json.loads((runs[2] / "report.json").read_text())["cost"]
    assert cost["collect"]["tokens"] >= whole["tokens"] > 0  # model tokens of both ranks (BOS too)


def test_torchrun_refuses_device_map_and_single_stages(
    tmp_path: Path, small_recipe: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sauce_export.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets them; the group is never joined here
    monkeypatch.setenv("RANK", "0")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**small_recipe, "runtime": {"device_map": "auto"}}))
    assert main(["--quiet", "run", str(path), "--out", str(tmp_path / "run")]) == 2
    assert "runtime.device_map" in capsys.readouterr().err
    assert main(["--quiet", "collect", str(path), "--out", str(tmp_path / "run")]) == 2
    assert "only `run` runs under torchrun" in capsys.readouterr().err


def _rank_body(rank: int, port: int, out: str) -> None:
    """One of two gloo ranks: what each sees when rank 0's body fails, and a result handed over."""
    import torch.distributed as dist

    from sauce_export import distributed
    from sauce_export.errors import CalibrationFailed, InputError, RankExit

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

    def fails(err: Exception):  # type: ignore[no-untyped-def]
        def body() -> None:
            raise err

        return body

    seen = {"part": distributed.part(list(range(5))), "value": distributed.on_main(lambda: f"from {rank}")}
    try:
        distributed.on_main(fails(CalibrationFailed("nothing passed", [{"clamp": -5}])))
    except CalibrationFailed as err:  # every rank alike: a caller may catch it and go on
        seen["calibration"] = [str(err), err.table]
    try:
        distributed.on_main(fails(InputError("recipe.yaml", "site", "no such layer")))
    except InputError as err:
        seen["input"] = str(err)
    except RankExit as err:
        seen["input"] = f"exit {err.code}"
    distributed.close()
    Path(out, f"{rank}.json").write_text(json.dumps(seen))


def test_rank_zero_results_and_failures_reach_every_rank(tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_body, args=(port, str(tmp_path)), nprocs=2)
    zero, one = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert zero["part"] == [0, 2, 4] and one["part"] == [1, 3]
    assert zero["value"] == one["value"] == "from 0"
    assert zero["calibration"] == one["calibration"] == ["nothing passed", [{"clamp": -5}]]
    assert zero["input"] == "recipe.yaml: site: no such layer" and one["input"] == "exit 2"
