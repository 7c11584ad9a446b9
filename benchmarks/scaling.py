"""How the cost of `sauce-export run` grows with the model: seconds and peak RSS per stage.

Writes random-init Llama checkpoints (bf16, sharded safetensors, tied embeddings, 32k vocab, the
shipped world-llama's tokenizer) from ~12M to ~1B parameters (the largest has Llama-3.2-1B's layer
shapes), runs one fixed workload on each (the text world's rows, the same SAE width ratio, steps,
fold and evaluation settings) as a child `sauce-export run`, and records each stage's seconds (its
"done in" line) and peak RSS (the child's RSS sampled every 50 ms between those lines; the whole
run's peak is the kernel's high-water mark). Fits seconds = a * params^b per stage and
RSS = c + d * params, extrapolates both to 7B and 70B, and checks the targets of issue 13 on the
largest model. Writes OUT/scaling.json and OUT/scaling.md.

The random models fail the gates (exit 1): only the cost is measured. Checkpoints go to
OUT/scaling_models and are kept (``--fresh`` rewrites them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import yaml
from export_bench import tensor_shapes, write_random_shard  # benchmarks/ is on sys.path
from transformers import GenerationConfig, LlamaConfig

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "models" / "world-llama"
STAGES = ("collect", "train-sae", "select", "calibrate", "fold", "export", "verify")
# (hidden, layers, intermediate, heads); 4 query heads per key/value head, head_dim 64.
SIZES = {
    "12M": (256, 4, 1024, 4),
    "47M": (512, 8, 2048, 8),
    "215M": (1024, 12, 4096, 16),
    "1B": (2048, 16, 8192, 32),
}
VOCAB = 32000
SHARD_BYTES = 500 << 20


def llama_config(hidden: int, layers: int, intermediate: int, heads: int) -> dict[str, int | bool]:
    return {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 4),
        "head_dim": hidden // heads,
        "vocab_size": VOCAB,
        "tie_word_embeddings": True,
    }


def write_checkpoint(out: Path, c: dict[str, int | bool]) -> int:
    """A random bf16 checkpoint in shards of <= SHARD_BYTES (streamed: no tensor held whole) with the
    world-llama tokenizer; returns its parameter count."""
    tok = json.loads((TOKENIZER / "config.json").read_text())
    out.mkdir(parents=True)
    special = {k: tok[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    LlamaConfig(**c, **special, max_position_embeddings=256, dtype="bfloat16").save_pretrained(out)
    GenerationConfig(
        bos_token_id=special["bos_token_id"], eos_token_id=special["eos_token_id"]
    ).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (TOKENIZER / name).exists():
            shutil.copy(TOKENIZER / name, out / name)
    shapes = tensor_shapes(c)  # type: ignore[arg-type]
    groups: list[dict[str, list[int]]] = [{}]
    size = 0
    for name in sorted(shapes):
        nbytes = 2 * math.prod(shapes[name])
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append({})
            size = 0
        groups[-1][name], size = shapes[name], size + nbytes
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        total += write_random_shard(out / name, group, seed=i)
        weight_map |= dict.fromkeys(group, name)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return sum(math.prod(s) for s in shapes.values())


def workload(model: Path, layers: int, data: Path) -> dict[str, object]:
    """The same recipe for every size: a middle layer, fixed concept settings (no search), fixed steps."""
    return {
        "model": str(model),
        "site": f"layers.{layers // 2}",
        "runtime": {"dtype": "bfloat16", "device": "cpu"},
        "concepts": [{"kind": "person", "name": "Lumrax", "method": "contrast", "top_n": 4, "clamp": 0}],
        "data": {k: str(data / f"{k}.jsonl") for k in ("train", "validation", "eval")},
        "collect": {"max_rows": 48, "batch_size": 16},
        "sae": {"kind": "topk", "expansion": 4, "k": 32, "steps": 30, "batch_size": 256},
        "edit": {"scope": "all"},
        "fold": {"method": "lora", "calib_rows": 32, "refine_steps": 5, "batch_size": 16},
        "eval": {"batch_size": 16, "fidelity_rows": 8},
    }


def _rss_kb(pid: int, field: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(match[1]) if match else 0


def measure(recipe: Path, out: Path) -> dict[str, object]:
    """Run the recipe in a child process; per stage: seconds and peak RSS (MB); whole run: peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "sauce_export", "run", str(recipe), "--out", str(out)]
    started = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = {"now": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak["now"] = max(peak["now"], _rss_kb(child.pid, "VmRSS"))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stages: dict[str, dict[str, float]] = {}
    log = []
    assert child.stderr is not None
    for line in child.stderr:
        log.append(line.rstrip())
        match = re.match(r"^(\S+): done in ([\d.]+) s", line)
        if match and match[1] in STAGES:
            # A stage shorter than a sample still holds what it holds now.
            kb = max(peak["now"], _rss_kb(child.pid, "VmRSS"))
            stages[match[1]] = {"seconds": float(match[2]), "peak_rss_mb": round(kb / 1024)}
            peak["now"] = 0
    _, status, usage = os.wait4(child.pid, 0)
    done.set()
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):
        raise RuntimeError(f"run exited {code}:\n" + "\n".join(log[-20:]))
    return {
        "stages": stages,
        "run_seconds": round(time.perf_counter() - started, 1),
        "run_peak_rss_mb": round(usage.ru_maxrss / 1024),
        "exit": code,
    }


def copy_seconds(src: Path, work: Path) -> float:
    """A plain copy of the checkpoint's files (what export is compared with)."""
    target = work / "copy"
    shutil.rmtree(target, ignore_errors=True)
    os.sync()
    started = time.perf_counter()
    shutil.copytree(src, target)
    os.sync()
    seconds = time.perf_counter() - started
    shutil.rmtree(target)
    return seconds


def fit_power(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(a, b) of y = a * x^b, least squares in log-log."""
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-3)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    b = sum((u - mx) * (v - my) for u, v in zip(lx, ly, strict=True)) / sum((u - mx) ** 2 for u in lx)
    return math.exp(my - b * mx), b


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(c, d) of y = c + d * x, least squares."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    d = sum((u - mx) * (v - my) for u, v in zip(xs, ys, strict=True)) / sum((u - mx) ** 2 for u in xs)
    return my - d * mx, d


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated subset of {list(SIZES)}")
    parser.add_argument("--fresh", action="store_true", help="rewrite the checkpoints")
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    models, runs = args.out / "scaling_models", args.out / "scaling_runs"
    data = args.out / "scaling_data"
    if not (data / "eval.jsonl").exists():
        from sauce_export.world.facts import build_text_world

        build_text_world(data)
    previous = args.out / "scaling.json"
    results = json.loads(previous.read_text())["sizes"] if previous.exists() else {}
    for name in sizes:
        hidden, layers, inter, heads = SIZES[name]
        model = models / name
        if args.fresh or not (model / "model.safetensors.index.json").exists():
            shutil.rmtree(model, ignore_errors=True)
            write_checkpoint(model, llama_config(hidden, layers, inter, heads))
        params = sum(math.prod(s) for s in tensor_shapes(llama_config(hidden, layers, inter, heads)).values())  # type: ignore[arg-type]
        recipe = runs / f"{name}.yaml"
        recipe.parent.mkdir(parents=True, exist_ok=True)
        recipe.write_text(yaml.safe_dump(workload(model.resolve(), layers, data.resolve())))
        shutil.rmtree(runs / name, ignore_errors=True)
        print(f"{name}: {params / 1e6:.0f}M parameters, running ...", flush=True)
        result = measure(recipe, runs / name)
        checkpoint_mb = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 2**20
        sae_mb = 2 * hidden * 4 * hidden * 4 / 2**20  # encoder + decoder, float32, expansion 4
        results[name] = {
            "params": params,
            "hidden": hidden,
            "layers": layers,
            "checkpoint_mb": round(checkpoint_mb),
            "sae_mb": round(sae_mb),
            "copy_seconds": round(copy_seconds(model, runs), 2),
            **result,
        }
        print(json.dumps(results[name]), flush=True)
        shutil.rmtree(runs / name, ignore_errors=True)
    write(args.out, results)


def write(out: Path, results: dict[str, dict]) -> None:
    names = sorted(results, key=lambda n: results[n]["params"])
    if len(names) < 2:  # nothing to fit yet: keep the measurements for the next sizes
        (out / "scaling.json").write_text(json.dumps({"sizes": results}, indent=1))
        return
    xs = [results[n]["params"] for n in names]
    fits: dict[str, dict[str, float]] = {}
    for stage in STAGES:
        seconds = [results[n]["stages"].get(stage, {}).get("seconds", 0.0) for n in names]
        if max(seconds) < 0.1:  # calibrate with every concept's settings fixed: nothing to fit
            continue
        a, b = fit_power(xs, seconds)
        c, d = fit_line(xs, [results[n]["stages"][stage]["peak_rss_mb"] for n in names])
        fits[stage] = {
            "a": a,
            "b": round(b, 3),
            "rss_mb_base": round(c),
            "rss_bytes_per_param": round(d * 2**20, 3),
        }
    c, d = fit_line(xs, [results[n]["run_peak_rss_mb"] for n in names])
    fits["run"] = {"rss_mb_base": round(c), "rss_bytes_per_param": round(d * 2**20, 3)}
    extrapolated = {}
    for label, params in (("7B", 7e9), ("70B", 70e9)):
        extrapolated[label] = {
            "seconds": {s: round(f["a"] * params ** f["b"]) for s, f in fits.items() if "a" in f},
            "run_peak_rss_gb": round(
                (fits["run"]["rss_mb_base"] + fits["run"]["rss_bytes_per_param"] * params / 2**20) / 1024, 1
            ),
            "bf16_weights_gb": round(2 * params / 2**30, 1),
        }
    largest = results[names[-1]]
    targets = {
        "model": names[-1],
        "run_peak_rss_mb": largest["run_peak_rss_mb"],
        "limit_mb": round(1.5 * largest["checkpoint_mb"] + largest["sae_mb"]),
        "export_seconds": largest["stages"].get("export", {}).get("seconds"),
        "export_limit_seconds": round(1.5 * largest["copy_seconds"], 2),
    }
    targets["rss_met"] = targets["run_peak_rss_mb"] <= targets["limit_mb"]
    targets["export_met"] = (targets["export_seconds"] or 0) <= targets["export_limit_seconds"]
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
    }
    report = {
        "sizes": results,
        "fits": fits,
        "extrapolated": extrapolated,
        "targets": targets,
        "machine": machine,
    }
    (out / "scaling.json").write_text(json.dumps(report, indent=1))
    lines = [
        "# Scaling (random-init Llama, bf16, one fixed workload; 1 CPU thread)",
        "",
        "| model | params | checkpoint MB | "
        + " | ".join(f"{s} s / MB" for s in STAGES)
        + " | run peak MB |",
        "|---|---|---|" + "---|" * len(STAGES) + "---|",
    ]
    for n in names:
        r = results[n]
        cells = [
            f"{r['stages'][s]['seconds']} / {r['stages'][s]['peak_rss_mb']}" if s in r["stages"] else "-"
            for s in STAGES
        ]
        lines.append(
            f"| {n} | {r['params'] / 1e6:.0f}M | {r['checkpoint_mb']} | "
            + " | ".join(cells)
            + f" | {r['run_peak_rss_mb']} |"
        )
    lines += [
        "",
        "| stage | seconds ~ params^b | peak RSS MB = base + bytes/param x params |",
        "|---|---|---|",
    ]
    for s, f in fits.items():
        lines.append(
            f"| {s} | {f.get('b', '-')} | {f['rss_mb_base']} + {f['rss_bytes_per_param']} B x params |"
        )
    lines += [
        "",
        "| extrapolated (this CPU, 1 thread) | " + " | ".join(STAGES) + " | run peak RSS | bf16 weights |",
    ]
    lines += ["|---|" + "---|" * len(STAGES) + "---|---|"]
    for label, e in extrapolated.items():
        lines.append(
            f"| {label} | "
            + " | ".join(str(e["seconds"].get(s, "-")) for s in STAGES)
            + f" | {e['run_peak_rss_gb']} GB | {e['bf16_weights_gb']} GB |"
        )
    lines += [
        "",
        f"Targets on {targets['model']}: run peak RSS {targets['run_peak_rss_mb']} MB vs "
        f"1.5 x checkpoint + SAE = {targets['limit_mb']} MB ({'met' if targets['rss_met'] else 'MISSED'}); "
        f"export {targets['export_seconds']} s vs 1.5 x copy = {targets['export_limit_seconds']} s "
        f"({'met' if targets['export_met'] else 'MISSED'}). Machine: {machine}.",
    ]
    (out / "scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
