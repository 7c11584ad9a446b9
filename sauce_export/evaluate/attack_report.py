"""Tables and the relearning plot of attack results (``attacks.attack_model``), for compare and attack."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def mean_forget(scored: dict[str, Any]) -> float:
    """Mean forget accuracy over a scored point's concepts."""
    values = [m["forget_acc"] for m in scored["concepts"].values()]
    return sum(values) / len(values)


def attack_table(methods: dict[str, dict[str, Any]]) -> list[str]:
    """One row per attacked method: the score without and after every attack on the attacks' rows
    (forget in brackets), the robust score and the worst attack; ``methods`` maps a method to
    {"best": ..., "attacks": attack_model's result}."""
    attacked = {m: v for m, v in methods.items() if "attacks" in v}
    if not attacked:
        return []
    names = list(next(iter(attacked.values()))["attacks"]["attacks"])
    head = ["method", "no attack", *names, "robust", "worst attack"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, v in attacked.items():
        found = v["attacks"]["attacks"]
        cells = [
            f"{p['score']:.3f} ({mean_forget(p):.2f})"
            for p in (v["attacks"]["plain"], *(found[n] for n in names))
        ]
        lines.append(
            "| "
            + " | ".join(
                [method, *cells, f"{v['attacks']['robust_score']:.3f}", v["attacks"]["worst_attack"]]
            )
            + " |"
        )
    return lines


def robust_within(attacked: dict[str, Any], steps: int) -> float:
    """The score after the worst attack with at most ``steps`` relearning steps (every attack that
    does not relearn counts): how robust a model is to a lighter attacker than the full budget."""
    found = attacked["attacks"]["attacks"]
    return min(
        p["score"]
        for n, p in found.items()
        if not n.startswith("relearn ") or int(n.rsplit(" ", 1)[1]) <= steps
    )


def fewest_steps(attacked: dict[str, Any]) -> int | None:
    """The smallest relearning step count among a result's attacks (None without relearning)."""
    counts = [int(n.rsplit(" ", 1)[1]) for n in attacked["attacks"]["attacks"] if n.startswith("relearn ")]
    return min(counts) if counts else None


def relearn_curves(attacked: dict[str, Any], data: str, mode: str) -> tuple[list[int], list[float]]:
    """(steps, mean forget) of one method's relearning on ``data`` (concept / unrelated) in ``mode``
    (full / LoRA), starting from its score without an attack at step 0."""
    prefix = f"relearn {data} {mode} "
    points = sorted(
        (int(n[len(prefix) :]), mean_forget(p))
        for n, p in attacked["attacks"]["attacks"].items()
        if n.startswith(prefix)
    )
    return [0, *(s for s, _ in points)], [mean_forget(attacked["attacks"]["plain"]), *(f for _, f in points)]


def relearn_plot(settings: dict[str, dict[str, dict[str, Any]]], path: Path) -> bool:
    """compare-relearn.png: forget accuracy vs relearning steps, one panel per setting and relearning
    data, a line per method (full solid, LoRA dashed). False (nothing written) without attacks."""
    panels = [
        (name, data, methods)
        for name, methods in settings.items()
        if any("attacks" in v for v in methods.values())
        for data in ("concept", "unrelated")
    ]
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4), squeeze=False)
    for ax, (name, data, methods) in zip(axes[0], panels, strict=True):
        for i, (method, v) in enumerate(m for m in methods.items() if "attacks" in m[1]):
            colour = "crimson" if method.startswith("SAUCE") else plt.get_cmap("tab10")(i % 10)
            for mode, style in (("full", "-"), ("LoRA", "--")):
                x, y = relearn_curves(v, data, mode)
                ax.plot(x, y, style, marker="o", ms=3, color=colour, label=f"{method} / relearn {mode}")
        ax.set(
            title=f"{name}: relearn on {data} rows",
            xlabel="relearning steps",
            ylabel="forget acc (held-out views)",
            ylim=(-0.05, 1.05),
        )
    axes[0][-1].legend(fontsize=5, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
