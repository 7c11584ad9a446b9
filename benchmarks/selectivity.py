"""What separates one person's facts from the others' on a text model: each technique, alone and combined.

Issue 12: on text fact models no clamp point forgets a person (every attribute) while keeping the
other persons' facts. This table measures, on **validation rows only**, which techniques close the
gap. Each technique is a grid of hooked clamp edits (score x top_n x clamp); a row reports its best
point (the smallest edit that passes, else the best summary score), how many points passed and
the seconds it took (SAEs trained, latents scored, points evaluated):

- ``base``: one 8x TopK SAE (k=32) at layers.1, SAeUron / contrast scores, every token edited where
  a latent fires (the recipe's defaults);
- ``sibling penalty``: the ``specific`` score (share on the target minus the largest share on any
  sibling of the same kind);
- ``wide SAE``: 32x, k=8 (more, narrower latents);
- ``entity tokens``: the edit applies only on the tokens of an entity's name (found by string
  match: a lookup no fold can express, an upper bound on what token scope buys);
- ``multi-site``: the same edit at layers.0, .1 and .2 at once, one SAE each;
- ``gated``: a detector (the concept's best latent above the largest value it takes on the other
  persons' train tokens) switches the clamp of all selected latents on at that token only;
- ``combined``: wide SAE + sibling penalty + multi-site + gated;
- ``subspace``: ``edit.method: subspace`` with its defaults (a patch fitted to the objective on the
  same latents' directions; docs/subspace.md).

Passing is the verify gates on validation rows: forget <= chance + 5 pts, retain and interference
>= 95% of the original's. Writes OUT/selectivity.json and OUT/selectivity.md.

    python benchmarks/selectivity.py --recipe recipes/demo-text.yaml --out runs/selectivity-text
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from sauce_export.architectures import resolve_site
from sauce_export.data import Concept, Row
from sauce_export.edit import Edit
from sauce_export.evaluate.metrics import (
    chance_accuracy,
    concept_metrics,
    metric_rows,
    row_correctness,
    summary_score,
)
from sauce_export.hooks import register_output_hook
from sauce_export.pipeline import Run
from sauce_export.recipe import load_recipe
from sauce_export.sites import parse_site

TOP_N = (2, 4, 8, 16)
CLAMPS = (0.0, -30.0, -100.0)
PARTS = ("forget_acc", "retain_acc", "interference_acc")


@dataclass(frozen=True)
class Technique:
    name: str
    sites: tuple[str, ...] = ("layers.1",)
    expansion: int = 8
    k: int = 32
    methods: tuple[str, ...] = ("saeuron", "contrast")
    entity_tokens: bool = False
    gated: bool = False


TECHNIQUES = (
    Technique("base"),
    Technique("sibling penalty", methods=("specific",)),
    Technique("wide SAE", expansion=32, k=8),
    Technique("entity tokens", entity_tokens=True),
    Technique("multi-site", sites=("layers.0", "layers.1", "layers.2")),
    Technique("gated", methods=("specific",), gated=True),
    Technique(
        "combined",
        sites=("layers.0", "layers.1", "layers.2"),
        expansion=32,
        k=8,
        methods=("specific",),
        gated=True,
    ),
)


def site_run(recipe_path: Path, out: Path, site: str, expansion: int, k: int) -> Run:
    """A run of the recipe at ``site`` with a TopK SAE of this width (one directory per SAE)."""
    raw = yaml.safe_load(recipe_path.read_text())
    raw.update(site=site, sae={"kind": "topk", "expansion": expansion, "k": k})
    raw.setdefault("calibrate", {})["top_n"] = list(TOP_N)
    path = out / f"{site}-{expansion}x" / "recipe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return Run(load_recipe(path), path.parent / "run", progress=False)


def name_mask(lm: Any, names: Sequence[str]) -> Callable[[torch.Tensor], torch.Tensor]:
    """input_ids [B, T] -> bool mask of the tokens overlapping a spelled-out name (a token may also
    carry the punctuation after it, so spans are matched on the decoded text, not on token ids)."""
    tokenizer = lm.tokenizer

    def mask(ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(ids, dtype=torch.bool)
        for b, row in enumerate(ids.tolist()):
            pieces = [t.replace("▁", " ") for t in tokenizer.convert_ids_to_tokens(row)]
            ends = list(itertools.accumulate(len(t) for t in pieces))
            text = "".join(pieces)
            for name in names:
                start = text.find(name)
                while start >= 0:
                    stop = start + len(name)
                    for t, end in enumerate(ends):
                        if end > start and end - len(pieces[t]) < stop:
                            out[b, t] = True
                    start = text.find(name, stop)
        return out

    return mask


@contextmanager
def hooked(
    model: torch.nn.Module,
    edits: Sequence[Edit],
    mask_of: Callable[[torch.Tensor], torch.Tensor] | None,
    gates: Sequence[tuple[int, float] | None],
) -> Iterator[None]:
    """Every edit at its site; optionally only on the masked tokens, or where its gate latent fires."""
    ids: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        pre = model.register_forward_pre_hook(
            lambda _m, _a, kw: ids.__setitem__("ids", kw["input_ids"]), with_kwargs=True
        )
        stack.callback(pre.remove)
        for edit, gate in zip(edits, gates, strict=True):

            def fn(h: torch.Tensor, edit: Edit = edit, gate: tuple[int, float] | None = gate) -> torch.Tensor:
                mask = mask_of(ids["ids"]) if mask_of is not None else None
                if gate is not None:
                    fired = edit.sae.encode(h.to(edit.sae.W_dec.dtype))[..., gate[0]] > gate[1]
                    mask = fired if mask is None else mask & fired
                return edit.edit_hidden(h, mask)

            handle = register_output_hook(resolve_site(model, edit.site, where="selectivity"), fn)
            stack.callback(handle.remove)
        yield


@torch.no_grad()
def gate_of(run: Run, concept: Concept, latent: int) -> float:
    """The detector's threshold: the largest value the latent takes on other persons' prompt tokens."""
    rows, sae = run.sample_rows(), run.sae()
    other = torch.tensor([r.labels.get(concept.kind) not in (None, concept.name) for r in rows])
    top = 0.0
    for shard in run.collect().shards():
        keep = other[shard.row.long()] & ~shard.answer
        if keep.any():
            top = max(top, float(sae.encode(shard.acts[keep].float())[:, latent].max()))
    return top


def evaluate(
    lm: Any, rows: dict[str, list[Row]], batch: int, context: Callable[[], Any] | None
) -> dict[str, float | None]:
    scored = list({r.id: r for group in rows.values() for r in group}.values())
    with context() if context is not None else ExitStack():
        ok = row_correctness(lm, scored, batch, progress=False)
    return concept_metrics(ok, rows)


def passes(m: dict[str, float | None], orig: dict[str, float | None], chance: float) -> bool:
    keep = all(orig[k] is None or (m[k] or 0.0) >= 0.95 * orig[k] for k in ("retain_acc", "interference_acc"))
    return m["forget_acc"] is not None and m["forget_acc"] <= chance + 0.05 + 1e-9 and keep


def technique_row(tech: Technique, recipe: Path, out: Path) -> dict[str, Any]:
    start = time.time()
    runs = [site_run(recipe, out, s, tech.expansion, tech.k) for s in tech.sites]
    first = runs[0]
    lm, concept = first.lm, first.concepts[0]
    rows = first.validation_rows
    sel = metric_rows(rows, concept, None, None)
    sel = {k: sel[k] for k in PARTS}
    chance = chance_accuracy(rows, concept.kind)
    orig = evaluate(lm, sel, 64, None)
    names = sorted({v for r in first.train_rows for v in r.labels.values()})
    mask_of = name_mask(lm, names) if tech.entity_tokens else None
    ranked = [run.select()[str(concept)] for run in runs]
    points = []
    for method, n, clamp in itertools.product(tech.methods, TOP_N, CLAMPS):
        edits, gates = [], []
        for run in runs:
            latents = ranked[runs.index(run)][method][:n]
            site = str(parse_site(run.recipe.site, run.recipe.path))
            edits.append(Edit(sae=run.sae(), features=tuple(latents), site=site, clamp=clamp))
            gates.append((latents[0], gate_of(run, concept, latents[0])) if tech.gated else None)
        m = evaluate(lm, sel, 64, lambda e=edits, g=gates: hooked(lm.model, e, mask_of, g))
        points.append({"method": method, "top_n": n, "clamp": clamp, **m, "passes": passes(m, orig, chance)})
    ok = [p for p in points if p["passes"]]
    best = (
        min(ok, key=lambda p: p["top_n"] * (1 + abs(p["clamp"])))
        if ok
        else max(points, key=lambda p: summary_score(p | {"generality_acc": None}, orig))
    )
    return {
        "technique": tech.name,
        "concept": str(concept),
        "chance": chance,
        "original": orig,
        "best": best,
        "passing": len(ok),
        "points": len(points),
        "seconds": round(time.time() - start, 1),
        "table": points,
    }


def subspace_row(recipe: Path, out: Path) -> dict[str, Any]:
    start = time.time()
    run = site_run(recipe, out, "layers.1", 8, 32)
    raw = yaml.safe_load(Path(run.recipe.path).read_text())
    raw["edit"] = {"method": "subspace"}
    path = out / "subspace" / "recipe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    sub = Run(load_recipe(path), path.parent / "run", progress=False)
    concept, rows = sub.concepts[0], sub.validation_rows
    sel = {k: v for k, v in metric_rows(rows, concept, None, None).items() if k in PARTS}
    orig = evaluate(sub.lm, sel, 64, None)
    patch = sub.patch()
    m = evaluate(sub.lm, sel, 64, lambda: patch.apply(sub.lm.model))
    chance = chance_accuracy(rows, concept.kind)
    latents = sub.calibrate().get("subspace", {}).get("latents", sub.recipe.subspace.latents)
    best = {"method": "subspace", "top_n": latents, "clamp": None, **m}
    best["passes"] = passes(m, orig, chance)
    return {
        "technique": "subspace",
        "concept": str(concept),
        "chance": chance,
        "original": orig,
        "best": best,
        "passing": int(best["passes"]),
        "points": 1,
        "seconds": round(time.time() - start, 1),
        "table": [best],
    }


def markdown(model: str, rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        f"| {model} | best point | forget | retain | interference | passing points | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b, o = r["best"], r["original"]
        cell = {k: "-" if b[k] is None else f"{b[k]:.3f} ({o[k]:.2f})" for k in PARTS}
        point = (
            f"{b['top_n']} latents" if b["clamp"] is None else f"{b['method']} {b['top_n']} @ {b['clamp']:g}"
        )
        lines.append(
            f"| {r['technique']} | {point} | {cell['forget_acc']} | {cell['retain_acc']} | "
            f"{cell['interference_acc']} | {r['passing']}/{r['points']} | {r['seconds']} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=Path("recipes/demo-text.yaml"))
    parser.add_argument("--out", type=Path, default=Path("runs/selectivity"))
    parser.add_argument("--only", default="", help="comma list of technique names (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    chosen = set(filter(None, args.only.split(",")))
    rows = []
    for tech in TECHNIQUES:
        if not chosen or tech.name in chosen:
            rows.append(technique_row(tech, args.recipe, args.out))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "table"}), flush=True)
    if not chosen or "subspace" in chosen:
        rows.append(subspace_row(args.recipe, args.out))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "table"}), flush=True)
    model = yaml.safe_load(args.recipe.read_text())["model"]
    lines = markdown(Path(model).name, rows)
    concept = rows[0]["concept"]
    lines += [
        "",
        f"{concept} on validation rows (chance {rows[0]['chance']:.3f}); in brackets the original model.",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "selectivity.json").write_text(json.dumps(rows, indent=1))
    (args.out / "selectivity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
