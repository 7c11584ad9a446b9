"""report.json (stable keys that CI reads) and report.md (the table a person reads)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sauce_export.evaluate.metrics import METRICS


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def result_table(report: dict[str, Any]) -> str:
    """Markdown: one row per (concept, model variant), the PEBench columns."""
    variants = ("original", "hooked", "folded", "exported")
    lines = ["| concept | model | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for c in report["concepts"]:
        for variant in variants:
            metrics = c["metrics"].get(variant)
            if metrics is None:
                continue
            cells = " | ".join(_fmt(metrics.get(m)) for m in METRICS)
            lines.append(f"| {c['kind']}:{c['name']} (chance {c['chance_acc']:.3f}) | {variant} | {cells} |")
    return "\n".join(lines)


def gates_table(report: dict[str, Any]) -> str:
    lines = ["| check | value | threshold | passed |", "|---|---|---|---|"]
    for check in report["gates"]["checks"]:
        lines.append(
            f"| {check['name']} | {check['value']} | {check['threshold']} | {'yes' if check['passed'] else 'NO'} |"
        )
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: Path) -> None:
    """Both files are written to temp names and renamed, so a reader never sees half a report."""
    sae = report["sae"]
    md = (
        "\n\n".join(
            [
                f"# sauce-export report\n\nModel `{report['model']}`, site `{report['site']}`.",
                f"SAE: {sae['kind']} d_sae={sae['d_sae']} FVU={sae['fvu']:.4f} L0={sae['l0']:.1f} "
                f"dead={sae['dead_frac']:.3f} ({sae['source']}).",
                "## Accuracy (exact greedy answers; forget: lower is better)",
                result_table(report),
                f"## Gates: {'PASSED' if report['gates']['passed'] else 'FAILED'}",
                gates_table(report),
            ]
        )
        + "\n"
    )
    for name, text in (("report.json", json.dumps(report, indent=1)), ("report.md", md)):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
