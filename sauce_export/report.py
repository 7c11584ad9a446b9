"""report.json (stable keys that CI reads) and report.md (the table a person reads)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from sauce_export.evaluate.metrics import METRICS


def machine() -> dict[str, Any]:
    """Where the figures were measured: floating point differs between CPUs (and torch versions)."""
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def result_table(report: dict[str, Any]) -> str:
    """Markdown: one row per (concept, model variant), the PEBench columns (and multi-hop where the
    data has it)."""
    variants = ("original", "hooked", "folded", "exported")
    hops = any("multihop_acc" in m for c in report["concepts"] for m in c["metrics"].values())
    columns = (*METRICS, "multihop_acc") if hops else METRICS
    lines = ["| concept | model | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for c in report["concepts"]:
        for variant in variants:
            metrics = c["metrics"].get(variant)
            if metrics is None:
                continue
            cells = " | ".join(_fmt(metrics.get(m)) for m in columns)
            lines.append(f"| {c['kind']}:{c['name']} (chance {c['chance_acc']:.3f}) | {variant} | {cells} |")
    return "\n".join(lines)


FIDELITY = (
    "kl_vs_hooked_forget",
    "kl_vs_hooked_retain",
    "kl_vs_hooked_forget_ctx",
    "kl_vs_hooked_retain_ctx",
    "top1_agree_vs_hooked",
    "cos_site_vs_hooked",
    "feature_act_forget",
)


def fidelity_table(report: dict[str, Any]) -> str:
    """Markdown: how close each variant is to the reference (KL in nats, answer positions)."""
    ref = report.get("reference", "hooked")
    keys = [k.replace("_vs_hooked", f"_vs_{ref}") for k in FIDELITY]
    lines = ["| concept | model | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for c in report["concepts"]:
        for variant, metrics in c["metrics"].items():
            if f"top1_agree_vs_{ref}" in metrics:
                cells = " | ".join(_fmt(metrics.get(k), 4) for k in keys)
                lines.append(f"| {c['kind']}:{c['name']} | {variant} | {cells} |")
    return "\n".join(lines)


def write_plots(report: dict[str, Any], out: Path) -> list[str]:
    """metrics.png (PEBench metrics of the four models) and features.png (selected-latent activation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concepts = report["concepts"]
    variants = list(concepts[0]["metrics"])
    fig, axes = plt.subplots(1, len(concepts), figsize=(4.5 * len(concepts), 3.6), squeeze=False)
    for ax, c in zip(axes[0], concepts, strict=True):
        for i, variant in enumerate(variants):
            values = [c["metrics"][variant].get(m) or 0.0 for m in METRICS]
            ax.bar([j + i * 0.2 for j in range(len(METRICS))], values, width=0.2, label=variant)
        ax.set_xticks([j + 0.3 for j in range(len(METRICS))], [m.replace("_acc", "") for m in METRICS])
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{c['kind']}:{c['name']}")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=90)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for i, variant in enumerate(variants):
        values = [c["metrics"][variant].get("feature_act_forget", 0.0) for c in concepts]
        ax.bar([j + i * 0.2 for j in range(len(concepts))], values, width=0.2, label=variant)
    ax.set_xticks([j + 0.3 for j in range(len(concepts))], [c["name"] for c in concepts])
    ax.set_ylabel("mean selected-latent activation\n(forget prompts, per token)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "features.png", dpi=90)
    plt.close(fig)
    return ["metrics.png", "features.png"]


CALIBRATION = ("method", "top_n", "clamp", "size", "forget_acc", "retain_acc", "interference_acc", "score")


def calibration_table(table: list[dict[str, Any]]) -> str:
    """Markdown: every point the calibration scored on validation rows, the chosen ones in bold."""
    lines = [
        "| concept | phase | " + " | ".join(CALIBRATION) + " | why |",
        "|---|---|" + "---|" * (len(CALIBRATION) + 1),
    ]
    for e in table:
        cells = [e["concept"], e["phase"]] + [
            _fmt(e[k]) if isinstance(e[k], float) else ("-" if e[k] is None else e[k]) for k in CALIBRATION
        ]
        mark = "**" if e["chosen"] else ""
        lines.append("| " + " | ".join(f"{mark}{c}{mark}" for c in cells) + f" | {e['why']} |")
    return "\n".join(lines)


def calibration_summary(report: dict[str, Any]) -> str:
    """One paragraph: where the choices came from and what the search cost."""
    cal, m = report["calibration"], report["machine"]
    picked = "; ".join(
        f"{c}: {p['method']} top {p['top_n']} clamp {p['clamp']:g}"
        + ("" if p["calibrated"] else " (set by the recipe)")
        for c, p in cal["choices"].items()
    )
    source = cal.get("validation")
    where = (
        f"validation rows from {source['source']} ({source['rows']} rows)"
        if source
        else "no search (every concept set by the recipe)"
    )
    sub = cal.get("subspace")
    if sub:
        picked += (
            f"; subspace patch: lr {sub['lr']:g}, {sub['steps']} steps, kl_weight {sub.get('kl_weight', '-')}"
        )
    return (
        f"Chosen: {picked}. Searched on {where}; the evaluation rows were not read before verify. "
        f"Cost: {cal['evaluations']} {'subspace fits' if sub else 'hooked evaluations'}, {cal['rows_scored']} rows, {cal['seconds']} s. "
        f"Machine: {m['cpu']} ({m['cpus']} CPUs), torch {m['torch']}, {m['threads']} threads."
    )


def calibration_text(report: dict[str, Any]) -> str:
    """The calibration summary and its table (report.md, the model card); older reports have none."""
    if "calibration" not in report:
        return "Not recorded: this report predates calibration."
    return calibration_summary(report) + "\n\n" + calibration_table(report["calibration"]["table"])


def gates_table(report: dict[str, Any]) -> str:
    lines = ["| check | value | threshold | passed |", "|---|---|---|---|"]
    for check in report["gates"]["checks"]:
        lines.append(
            f"| {check['name']} | {check['value']} | {check['threshold']} | {'yes' if check['passed'] else 'NO'} |"
        )
    return "\n".join(lines)


def latents_section(report: dict[str, Any]) -> list[str]:
    """The subspace patch's latents (none for a clamp fold)."""
    if report["fold"]["description"].get("method") != "subspace":
        return []
    from sauce_export.subspace import latents_markdown

    return ["## Latents of the subspace patch\n\n" + latents_markdown(report["fold"])]


def cost_table(report: dict[str, Any]) -> str:
    """Seconds and throughput per stage: tokens through the model (collect, calibrate, fold, verify)
    or activations read (train-sae: every step's batch; select: a pass per concept kind)."""
    lines = ["| stage | seconds | tokens | tokens/s |", "|---|---|---|---|"]
    for name, c in report.get("cost", {}).items():
        lines.append(f"| {name} | {c['seconds']} | {c['tokens'] or '-'} | {c['tokens_per_s'] or '-'} |")
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: Path) -> None:
    """Both files are written to temp names and renamed, so a reader never sees half a report."""
    sae, pad = report["sae"], report["padding"]
    md = (
        "\n\n".join(
            [
                f"# sauce-export report\n\nModel `{report['model']}`, site `{report['site']}`. Batches "
                f"padded with id {pad['id']} (`{pad['token']}`, the tokenizer's {pad['source']}), "
                "always under a zero attention mask.",
                f"SAE: {sae['kind']} d_sae={sae['d_sae']} FVU={sae['fvu']:.4f} L0={sae['l0']:.1f} "
                f"dead={sae['dead_frac']:.3f} ({sae['source']}).",
                "## Accuracy (exact greedy answers; forget: lower is better)",
                result_table(report),
                f"## Fidelity to the {report.get('reference', 'hooked')} reference (KL at answer "
                "positions, nats; *_ctx: unrelated context before the question)",
                fidelity_table(report),
                "## Calibration (validation rows only)",
                calibration_text(report),
                f"## Fold\n\n`{json.dumps(report['fold']['description'])}`\n\nExported checkpoint: "
                f"`{report['export']['path']}`\n\n![metrics](metrics.png) ![features](features.png)",
                *latents_section(report),
                f"## Gates: {'PASSED' if report['gates']['passed'] else 'FAILED'}",
                gates_table(report),
                "## Cost (this machine; a stage skipped on rerun keeps its first time)",
                cost_table(report),
            ]
        )
        + "\n"
    )
    write_plots(report, out)
    for name, text in (("report.json", json.dumps(report, indent=1)), ("report.md", md)):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
