"""The diffusion stages: collect -> train-sae -> select -> calibrate -> fold -> verify (+ export).

Same bookkeeping as the language pipeline: each stage writes under the run directory with the hash
of its inputs in ``stage.json``, so a rerun skips finished stages. Choices (top_n, multiplier) are
made on validation rows; evaluation rows are generated once, in verify.
"""

from __future__ import annotations

import json
import platform
import random
import sys
import time
import types
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sauce_export.diffusion import fold as F
from sauce_export.diffusion import metrics
from sauce_export.diffusion import world as W
from sauce_export.diffusion.model import Sampling, load_classifier, load_pipeline, sample
from sauce_export.diffusion.recipe import DiffusionRecipe
from sauce_export.diffusion.unet import FeatureEdit, ProjectEdit, SiteEdit, recording, site_width
from sauce_export.errors import CalibrationFailed, InputError
from sauce_export.fsutil import check_writable
from sauce_export.progress import stage_done, track
from sauce_export.sae.formats import load_sae, save_sae
from sauce_export.sae.model import SAE
from sauce_export.sae.train import train_sae
from sauce_export.select import concept_stats, saeuron_scores, select_features


class DiffusionRun:
    def __init__(self, recipe: DiffusionRecipe, out: Path, progress: bool = True) -> None:
        self.recipe, self.out, self.progress = recipe, Path(out), progress
        check_writable(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self._pipe: Any = None
        self._clf: Any = None
        self._reported: set[str] = set()
        self.seconds: dict[str, float] = {}
        torch.manual_seed(0)

    # ------------------------------------------------------------------ inputs
    @property
    def pipe(self) -> Any:
        if self._pipe is None:
            self._pipe = load_pipeline(self.recipe.model)
            site_width(
                self._pipe.unet, self.recipe.site, self.recipe.path
            )  # a bad site fails here, naming the sites
        return self._pipe

    @property
    def clf(self) -> Any:
        if self._clf is None:
            self._clf = load_classifier(Path(self.recipe.classifier))
        return self._clf

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.recipe.sampling.steps, self.recipe.sampling.guidance)

    def rows(self, split: str) -> list[W.DiffusionRow]:
        d = self.recipe.data
        directory = Path(d.dir)
        if d.build_world and not (directory / f"{split}.jsonl").exists():
            W.build_world(directory, d.world_seed)
        return W.read_rows(directory / f"{split}.jsonl")

    def concepts(self) -> list[tuple[str, str]]:
        """(kind, name) of each concept; one that no training row carries is an InputError."""
        if not hasattr(self, "_concepts"):
            seen = {(k, r.label(k)) for r in self.rows("train") for k in metrics.KINDS}
            for i, c in enumerate(self.recipe.concepts):
                if (c.kind, c.name) not in seen:
                    known = sorted(n for k, n in seen if k == c.kind)
                    raise InputError(
                        self.recipe.path,
                        f"concepts[{i}].name",
                        f"no {c.kind} {c.name!r} in the data ({', '.join(known)})",
                    )
            self._concepts = [(c.kind, c.name) for c in self.recipe.concepts]
        return self._concepts

    def _stage(
        self, name: str, key: dict[str, Any], body: Callable[[Path], dict[str, Any]]
    ) -> dict[str, Any]:
        directory = self.out / name
        digest = json.dumps(key, sort_keys=True, default=str)
        marker = directory / "stage.json"
        if marker.exists():
            done = json.loads(marker.read_text())
            if done.get("key") == digest:
                self._announce(name, None, done.get("seconds"))
                return done["result"]
        directory.mkdir(parents=True, exist_ok=True)
        start = time.time()
        result = body(directory)
        seconds = time.time() - start
        marker.write_text(
            json.dumps({"key": digest, "seconds": round(seconds, 2), "result": result}, indent=1)
        )
        self._announce(name, seconds, seconds)
        return result

    def _announce(self, name: str, seconds: float | None, recorded: float | None) -> None:
        if name not in self._reported:
            self._reported.add(name)
            self.seconds[name] = round(recorded or 0.0, 1)
            stage_done(name, seconds, self.progress)

    def generate(
        self, rows: list[W.DiffusionRow], desc: str, edit: SiteEdit | None = None, pipe: Any = None
    ) -> metrics.Judged:
        pipe = pipe or self.pipe
        if edit is None:
            return metrics.generate(
                pipe, rows, self.clf, self.sampling, self.recipe.sampling.batch_size, desc, self.progress
            )
        with edit.applied(pipe.unet, self.recipe.site):
            return metrics.generate(
                pipe, rows, self.clf, self.sampling, self.recipe.sampling.batch_size, desc, self.progress
            )

    # ------------------------------------------------------------------ stages
    def _sample_rows(self) -> list[W.DiffusionRow]:
        rows = self.rows("train")
        n = self.recipe.collect.max_rows
        if len(rows) <= n:
            return rows
        return [rows[i] for i in sorted(random.Random(self.recipe.collect.seed).sample(range(len(rows)), n))]

    def collect(self) -> tuple[torch.Tensor, list[W.DiffusionRow]]:
        """Site activations of the conditional half, (rows, timesteps, positions, C)."""
        r = self.recipe
        key = {
            "model": r.model,
            "site": r.site,
            "collect": asdict(r.collect),
            "sampling": asdict(r.sampling),
            "data": asdict(r.data),
        }

        def body(directory: Path) -> dict[str, Any]:
            rows = self._sample_rows()
            chunks = []
            bs = r.sampling.batch_size
            for i in track(range(0, len(rows), bs), "collect", self.progress):
                chunk = rows[i : i + bs]
                with recording(self.pipe.unet, r.site) as seen:
                    sample(self.pipe, [x.prompt for x in chunk], [x.seed for x in chunk], self.sampling)
                chunks.append(torch.stack([s[len(chunk) :] for s in seen], 1))  # conditional half
            acts = torch.cat(chunks)
            save_file({"acts": acts.contiguous()}, str(directory / "acts.safetensors"))
            (directory / "rows.jsonl").write_text("".join(json.dumps(asdict(x)) + "\n" for x in rows))
            return {"shape": list(acts.shape)}

        self._stage("collect", key, body)
        acts = load_file(str(self.out / "collect" / "acts.safetensors"))["acts"]
        return acts, W.read_rows(self.out / "collect" / "rows.jsonl")

    def sae(self) -> SAE:
        r = self.recipe
        acts, _ = self.collect()
        key = {"collect": list(acts.shape), "sae": asdict(r.sae), "model": r.model, "site": r.site}

        def body(directory: Path) -> dict[str, Any]:
            flat = acts.reshape(-1, acts.shape[-1]).float()
            sae, stats = train_sae(flat, flat.shape[-1], r.sae, progress=self.progress)
            sae.cfg.site, sae.cfg.model = r.site, r.model
            save_sae(sae, directory / "sae")
            return {
                "fvu": stats.fvu,
                "l0": stats.l0,
                "dead_frac": stats.dead_frac,
                "d_sae": sae.cfg.d_sae,
                "k": sae.cfg.k,
            }

        self.sae_info = self._stage("train-sae", key, body)
        return load_sae(self.out / "train-sae" / "sae")

    def select(self) -> dict[str, dict[str, Any]]:
        """Per concept: latents ranked by SAeUron's score (mean over timesteps of the per-timestep
        score against every other row), the best ``max(calibrate.top_n)``, and each one's gate."""
        r = self.recipe
        sae = self.sae()
        acts, rows = self.collect()
        n_keep = max(r.calibrate.top_n)
        key = {"sae": self.sae_info, "concepts": self.concepts(), "n": n_keep}

        def body(directory: Path) -> dict[str, Any]:
            out: dict[str, Any] = {}
            per_t: dict[str, torch.Tensor] = {}
            for kind, name in self.concepts():
                pos = torch.tensor([x.label(kind) == name for x in rows])
                scores, mus = [], []
                for t in range(acts.shape[1]):
                    stats = concept_stats(
                        sae,
                        [acts[pos, t].reshape(-1, acts.shape[-1]).float()],
                        [acts[~pos, t].reshape(-1, acts.shape[-1]).float()],
                    )
                    scores.append(saeuron_scores(stats))
                    mus.append(stats.mu_pos)
                score = torch.stack(scores).mean(0)
                mu = torch.stack(mus).mean(0)
                feats = select_features(score, top_n=n_keep)
                per_t[f"{kind}:{name}"] = torch.stack(scores).float()
                out[f"{kind}:{name}"] = {
                    "features": feats,
                    "scores": [float(score[i]) for i in feats],
                    "thresholds": [float(mu[i]) for i in feats],
                }
            save_file(
                {k: v.contiguous() for k, v in per_t.items()},
                str(directory / "scores_per_timestep.safetensors"),
            )
            return out

        return self._stage("select", key, body)

    def edit(self, choice: dict[str, dict[str, Any]]) -> SiteEdit:
        """The union edit of every concept's chosen point (all of one kind, see calibrate)."""
        ranked = self.select()
        if all(c.get("edit") == "project" for c in choice.values()):
            feats = sorted({i for k, c in choice.items() for i in ranked[k]["features"][: c["top_n"]]})
            scale = min(c["scale"] for c in choice.values())  # several concepts: the stronger scale
            return ProjectEdit.of(self.sae().W_dec[feats], scale, self.rest_mean(list(choice)))
        gated: dict[int, tuple[float, float]] = {}
        for concept, c in choice.items():
            sel = ranked[concept]
            for i, thr in list(zip(sel["features"], sel["thresholds"], strict=True))[: c["top_n"]]:
                gamma = min(c["multiplier"], gated.get(i, (0.0, 0.0))[0])  # shared latent: the stronger
                gated[i] = (gamma, min(thr, gated.get(i, (0.0, thr))[1]))
        order = sorted(gated)
        return FeatureEdit(self.sae(), order, [gated[i][0] for i in order], [gated[i][1] for i in order])

    def rest_mean(self, concepts: list[str]) -> torch.Tensor:
        """Mean site activation over the training rows that carry none of ``concepts`` (every
        position and step): the point the project edit scales from, so kept prompts move little."""
        acts, rows = self.collect()
        names = [tuple(c.split(":", 1)) for c in concepts]
        keep = torch.tensor([all(x.label(k) != n for k, n in names) for x in rows])
        return acts[keep].reshape(-1, acts.shape[-1]).double().mean(0).float()

    def original(self, split: str) -> dict[str, Any]:
        """The original pipeline's images of a split, judged (cached in memory)."""
        cache = self.__dict__.setdefault("_original", {})
        if split not in cache:
            cache[split] = self.generate(self.rows(split), f"original {split}")
        return cache[split]

    def calibrate(self) -> dict[str, Any]:
        r = self.recipe
        cal, gates = r.calibrate, r.verify
        key = {
            "select": self.select(),
            "calibrate": asdict(cal),
            "gates": asdict(gates),
            "sampling": asdict(r.sampling),
        }

        def body(directory: Path) -> dict[str, Any]:
            rows = self.rows("validation")
            base = self.original("validation")
            table: list[dict[str, Any]] = []
            for kind in cal.edits:
                choice = self._calibrate_kind(kind, rows, base, table)
                if choice is not None:
                    return {
                        "choice": choice,
                        "table": table,
                        "original_validation": metrics.accuracy(rows, base),
                    }
            raise CalibrationFailed("no edit passes every concept on validation rows", table)

        return self._stage("calibrate", key, body)

    def _points(self, kind: str) -> list[dict[str, Any]]:
        """The points of one edit kind, gentlest first (ties on the margin go to the gentler)."""
        cal = self.recipe.calibrate
        if kind == "project":
            pts = [{"edit": kind, "top_n": n, "scale": s} for n in cal.top_n for s in cal.scales]
            return sorted(pts, key=lambda p: (p["top_n"] * (1 - p["scale"]), p["top_n"]))
        pts = [{"edit": kind, "top_n": n, "multiplier": m} for n in cal.top_n for m in cal.multipliers]
        return sorted(pts, key=lambda p: (p["top_n"] * abs(p["multiplier"]), p["top_n"]))

    def _calibrate_kind(
        self, kind: str, rows: list[W.DiffusionRow], base: metrics.Judged, table: list[dict[str, Any]]
    ) -> dict[str, dict[str, Any]] | None:
        """Every point of ``kind`` on validation rows, per concept; the passing point with the
        largest smallest margin over its bars (not the first to pass: that one sits on the edge).
        Several concepts: their union must pass too. None when a concept has no passing point."""
        choice: dict[str, dict[str, Any]] = {}
        for k, name in self.concepts():
            concept = f"{k}:{name}"
            ref = metrics.removal_scores(rows, base, [(k, name)])
            best: tuple[float, dict[str, Any]] | None = None
            for point in self._points(kind):
                label = " ".join(f"{a}={b}" for a, b in point.items() if a != "edit")
                judged = self.generate(
                    rows, f"calibrate {kind} {concept} {label}", self.edit({concept: point})
                )
                s = metrics.removal_scores(rows, judged, [(k, name)])
                slack = self._slack(s, ref)
                table.append({"concept": concept, **point, **s, "slack": slack, "passed": slack >= 0})
                if slack >= 0 and (best is None or slack > best[0]):
                    best = (slack, point)
            if best is None:
                return None
            choice[concept] = best[1]
        if len(choice) > 1:
            judged = self.generate(rows, f"calibrate {kind} union", self.edit(choice))
            for k, name in self.concepts():
                s = metrics.removal_scores(rows, judged, [(k, name)])
                slack = self._slack(s, metrics.removal_scores(rows, base, [(k, name)]))
                table.append(
                    {"concept": f"union/{k}:{name}", "edit": kind, **s, "slack": slack, "passed": slack >= 0}
                )
                if slack < 0:
                    return None
        return choice

    def _slack(self, s: dict[str, float], ref: dict[str, float]) -> float:
        """The smallest margin of validation scores ``s`` over calibration's bars (>= 0: passes):
        UA over verify.ua + ua_margin, IRA/CRA over (retain_ratio + retain_margin) x original."""
        g, cal = self.recipe.verify, self.recipe.calibrate
        ratio = g.retain_ratio + cal.retain_margin
        margins = [s["ua"] - min(1.0, g.ua + cal.ua_margin)]
        margins += [s[k] - ratio * ref[k] for k in ("ira", "cra") if ref[k] == ref[k]]
        return round(min(margins), 6)

    def fold(self) -> F.Patch:
        r = self.recipe
        cal = self.calibrate()
        key = {"calibrate": cal["choice"], "fold": asdict(r.fold), "model": r.model, "site": r.site}

        def body(directory: Path) -> dict[str, Any]:
            edit = self.edit(cal["choice"])
            if isinstance(edit, ProjectEdit):
                patch = F.exact_patch(self.pipe.unet, r.site, edit, r.path)
                stats: dict[str, Any] = {"exact": True, "rank": edit.basis.shape[1]}
            else:
                patch, stats = self._fit(edit)
            F.save_patch(patch, directory / "patch.safetensors", {"choice": cal["choice"], **stats})
            val = self.rows("validation")
            hooked = self.generate(val, "hooked validation", edit)
            folded = self.generate(
                val, "folded validation", pipe=self.with_unet(F.merged(self.pipe.unet, patch))
            )
            return {
                "fit": stats,
                "validation_vs_hooked": metrics.fidelity(hooked, folded),
                "modules": sorted(patch),
            }

        self.fold_info = self._stage("fold", key, body)
        return F.load_patch(self.out / "fold" / "patch.safetensors")

    def _fit(self, edit: SiteEdit) -> tuple[F.Patch, dict[str, Any]]:
        """The gated edit's LoRA patch, fitted on hooked trajectories (plus ``fold.refits``)."""
        r = self.recipe
        rows = self.rows("train")
        rows = [
            rows[i] for i in sorted(random.Random(1).sample(range(len(rows)), min(r.fold.rows, len(rows))))
        ]
        bs = r.sampling.batch_size
        with edit.applied(self.pipe.unet, r.site), F.unet_io(self.pipe.unet) as seen:
            for i in track(range(0, len(rows), bs), "fold calibration", self.progress):
                chunk = rows[i : i + bs]
                sample(self.pipe, [x.prompt for x in chunk], [x.seed for x in chunk], self.sampling)
        fit = dict(modules=r.fold.modules, rank=r.fold.rank, steps=r.fold.steps, lr=r.fold.lr, where=r.path)
        patch, stats = F.fit_patch(self.pipe.unet, r.site, seen, progress=self.progress, **fit)
        for _ in range(r.fold.refits):
            labeller = F.Labeller(F.merged(self.pipe.unet, patch), self.pipe.unet)
            with edit.applied(self.pipe.unet, r.site):
                for i in track(range(0, len(rows), bs), "fold refit states", self.progress):
                    chunk = rows[i : i + bs]
                    sample(
                        self.with_unet(labeller),
                        [x.prompt for x in chunk],
                        [x.seed for x in chunk],
                        self.sampling,
                    )
            seen = seen + labeller.samples
            patch, stats = F.fit_patch(self.pipe.unet, r.site, seen, progress=self.progress, **fit)
        return patch, stats

    def with_unet(self, unet: torch.nn.Module) -> Any:
        p = self.pipe
        return types.SimpleNamespace(
            unet=unet, tokenizer=p.tokenizer, text_encoder=p.text_encoder, scheduler=p.scheduler
        )

    def verify(self) -> dict[str, Any]:
        """Export the pipeline and the LoRA file, reload both with stock diffusers, score original,
        hooked, exported and LoRA images of the evaluation rows once, and check the gates."""
        r = self.recipe
        patch = self.fold()
        choice = self.calibrate()["choice"]
        start = time.time()
        export_dir = self.out / "export"
        exported = F.export_pipeline(Path(r.model), patch, export_dir / "pipeline")
        lora = F.export_lora(patch, export_dir / "lora")
        self.seconds["export"] = round(time.time() - start, 1)
        start = time.time()
        rows = self.rows("eval")
        edit = self.edit(choice)
        judged = {
            "original": self.original("eval"),
            "hooked": self.generate(rows, "hooked eval", edit),
            "exported": self.generate(rows, "exported eval", pipe=load_pipeline(exported["path"])),
        }
        with_lora = load_pipeline(r.model)
        with_lora.load_lora_weights(str(lora["path"]))
        judged["lora"] = self.generate(rows, "lora eval", pipe=with_lora)
        report = self._report(rows, judged, choice, exported, lora)
        self.seconds["verify"] = round(time.time() - start, 1)
        report["seconds"] = dict(self.seconds)
        self._grid(rows, judged)
        (self.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        (self.out / "report.md").write_text(report_markdown(report))
        return report

    def _report(
        self,
        rows: list[W.DiffusionRow],
        judged: dict[str, metrics.Judged],
        choice: dict[str, Any],
        exported: dict[str, Any],
        lora: dict[str, Any],
    ) -> dict[str, Any]:
        g = self.recipe.verify
        concepts, checks = [], []
        for kind, name in self.concepts():
            m = {v: metrics.removal_scores(rows, j, [(kind, name)]) for v, j in judged.items()}
            concept = f"{kind}:{name}"
            concepts.append(
                {
                    "name": name,
                    "kind": kind,
                    **choice[concept],
                    "features": self.select()[concept]["features"][: choice[concept]["top_n"]],
                    "metrics": m,
                }
            )
            checks.append({"name": f"{concept} hooked UA", "value": m["hooked"]["ua"], "threshold": g.ua})
            for k in ("ira", "cra"):
                if m["original"][k] == m["original"][k]:
                    checks.append(
                        {
                            "name": f"{concept} hooked {k.upper()} / original",
                            "value": m["hooked"][k] / max(m["original"][k], 1e-9),
                            "threshold": g.retain_ratio,
                        }
                    )
            for v in ("exported", "lora"):
                for k in ("ua", "ira", "cra"):
                    if m["hooked"][k] == m["hooked"][k]:
                        checks.append(
                            {
                                "name": f"{concept} {v} {k.upper()} within {g.exported_gap} of hooked",
                                "value": -abs(m[v][k] - m["hooked"][k]),
                                "threshold": -g.exported_gap,
                            }
                        )
        fid = {v: metrics.fidelity(judged["hooked"], judged[v]) for v in ("exported", "lora")}
        fid["exported_vs_lora"] = metrics.fidelity(judged["exported"], judged["lora"])
        for v in ("exported", "lora"):
            checks.append(
                {
                    "name": f"{v} vs hooked classifier agreement",
                    "value": fid[v]["agreement"],
                    "threshold": g.agreement,
                }
            )
        for c in checks:
            c["passed"] = bool(c["value"] >= c["threshold"] - 1e-12)
        return {
            "family": "diffusion",
            "recipe": asdict(self.recipe),
            "rows": {"eval": len(rows), "validation": len(self.rows("validation"))},
            "original_accuracy": metrics.accuracy(rows, judged["original"]),
            "concepts": concepts,
            "fidelity": fid,
            "gates": {"passed": all(c["passed"] for c in checks), "checks": checks},
            "sae": self.sae_info,
            "fold": self.fold_info,
            "calibration": self.calibrate()["table"],
            "export": {
                "path": exported["path"],
                "changed_tensors": exported["changed_tensors"],
                "lora": lora,
            },
            "machine": {
                "cpu": platform.processor() or platform.machine(),
                "torch_threads": torch.get_num_threads(),
            },
        }

    def _grid(self, rows: list[W.DiffusionRow], judged: dict[str, metrics.Judged], per: int = 4) -> None:
        """grid.png: for the first removed concept and one kept prompt, ``per`` seeds (rows) x
        original / hooked / exported (columns)."""
        import numpy as np
        from PIL import Image

        kind, name = self.concepts()[0]
        gone = [i for i, x in enumerate(rows) if x.label(kind) == name][:per]
        kept = [i for i, x in enumerate(rows) if all(x.label(k) != n for k, n in self.concepts())][:per]
        blocks = []
        for idx in (gone, kept):
            cols = [judged[v].images[idx] for v in ("original", "hooked", "exported")]
            blocks.append(torch.cat([torch.cat(list(c), 1) for c in cols], 2))  # (3, per*H, 3*W)
        img = torch.cat(blocks, 1).permute(1, 2, 0).numpy()
        pil = Image.fromarray((img * 255).round().astype(np.uint8))
        pil.resize((pil.width * 8, pil.height * 8), Image.NEAREST).save(self.out / "grid.png")


def report_markdown(report: dict[str, Any]) -> str:
    lines = ["| concept | variant | UA | IRA | CRA | scope |", "|---|---|---|---|---|---|"]
    for c in report["concepts"]:
        for v, m in c["metrics"].items():
            lines.append(
                f"| {c['kind']}:{c['name']} | {v} | {m['ua']:.3f} | {m['ira']:.3f} | {m['cra']:.3f} | {m['scope']:.3f} |"
            )
    lines += ["", "| fidelity | agreement | MSE | PSNR dB |", "|---|---|---|---|"]
    for v, f in report["fidelity"].items():
        lines.append(f"| {v} | {f['agreement']:.3f} | {f['mse']:.2e} | {f['psnr']:.1f} |")
    lines += ["", "| gate | value | threshold | passed |", "|---|---|---|---|"]
    for c in report["gates"]["checks"]:
        lines.append(
            f"| {c['name']} | {c['value']:.3f} | {c['threshold']:.3f} | {'yes' if c['passed'] else 'NO'} |"
        )
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report.get("seconds", {}).items()]
    return "\n".join(lines) + "\n"


def run_command(args: Any) -> int:
    """``sauce-export STAGE recipe --out DIR`` for a ``family: diffusion`` recipe."""
    from sauce_export.diffusion.recipe import load_diffusion_recipe

    dry = getattr(args, "dry_run", False)
    if args.device not in (None, "cpu", "auto") or args.dtype not in (None, "auto", "float32"):
        raise InputError(str(args.recipe), "runtime", "diffusion recipes run on the CPU in float32")
    recipe = load_diffusion_recipe(args.recipe, check_paths=not dry)
    if dry:
        from sauce_export.diffusion.dry_run import dry_run, format_plan

        plan = dry_run(recipe, getattr(args, "model", None))
        print(json.dumps(plan, indent=1) if getattr(args, "json", False) else format_plan(plan))
        return 0
    run = DiffusionRun(recipe, args.out, not args.quiet)
    run.concepts()  # an unknown concept fails before any model loads
    try:
        return _run_stages(run, args)
    except CalibrationFailed as err:  # its table is this module's, not the language calibrate's
        print("\n".join(json.dumps(row) for row in err.table))
        print(f"sauce-export: calibration failed: {err}", file=sys.stderr)
        return 1


def _run_stages(run: DiffusionRun, args: Any) -> int:
    stages: dict[str, Callable[[], Any]] = {
        "collect": run.collect,
        "train-sae": run.sae,
        "select": run.select,
        "calibrate": run.calibrate,
        "fold": run.fold,
    }
    if args.command in stages:
        stages[args.command]()
        print(json.dumps({"stage": args.command, "out": str(args.out / args.command)}))
        return 0
    report = run.verify()
    print(report_markdown(report))
    print(f"exported pipeline: {report['export']['path']}; LoRA: {report['export']['lora']['path']}")
    print(f"gates: {'PASSED' if report['gates']['passed'] else 'FAILED'}; report: {args.out / 'report.md'}")
    return 0 if report["gates"]["passed"] else 1
