"""The stages of a run, each writing its artifact under the run directory keyed by an input hash.

A stage whose ``stage.json`` records the same input hash is skipped, so a rerun costs nothing
and an interrupted run resumes where it stopped (activation collection resumes mid-stage).
"""

from __future__ import annotations

import gc
import json
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from sauce_export import distributed
from sauce_export.activations import ActivationStore, CollectConfig, collect, merge_parts
from sauce_export.architectures import resolve_site
from sauce_export.calibrate import EditSettings, FoldCheck, Point, Search, Validation, calibrate
from sauce_export.data import Concept, Row, concept_split, hold_out, read_rows
from sauce_export.edit import Edit
from sauce_export.errors import CalibrationFailed, InputError
from sauce_export.evaluate.metrics import (
    METRICS,
    chance_accuracy,
    concept_metrics,
    metric_rows,
    row_correctness,
)
from sauce_export.fold import fold
from sauce_export.fsutil import check_writable
from sauce_export.hf_config import read_config
from sauce_export.lm import LoadedModel, load_model
from sauce_export.patch import Patch
from sauce_export.progress import stage_done
from sauce_export.recipe import Recipe, about_sae_path, check_sae_width, load_recipe_sae
from sauce_export.runtime import Placement, dtype_name, placement
from sauce_export.sae.formats import check_sae, load_sae, save_sae
from sauce_export.sae.model import SAE
from sauce_export.sae.train import sae_stats, train_sae
from sauce_export.select import (
    GroupSums,
    contrast_scores,
    group_sums,
    saeuron_scores,
    save_scores,
    select_features,
    specific_scores,
)
from sauce_export.sites import parse_site
from sauce_export.subspace import fit_subspace, top_tokens
from sauce_export.subspace import search as subspace_search
from sauce_export.verify import (
    Cached,
    Variant,
    fidelity_report,
    fidelity_sets,
    gate_checks,
    reference_outputs,
)

STAGES = ("collect", "train-sae", "select", "calibrate", "fold", "export", "verify")


class Run:
    """One recipe executed into one output directory."""

    def __init__(self, recipe: Recipe, out: Path, progress: bool = True) -> None:
        # Under torchrun only rank 0 draws progress bars and stage lines.
        self.recipe, self.out, self.progress = recipe, Path(out), progress and distributed.is_main()
        check_writable(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self._lm: LoadedModel | None = None
        self._rows_cache: dict[str, list[Row]] = {}
        # Later stages ask for earlier ones repeatedly; each is resolved (and loaded) once per Run.
        self._store: ActivationStore | None = None
        self._sae: SAE | None = None
        self._ranked: dict[str, dict[str, list[int]]] | None = None
        self._choices: dict[str, dict[str, Any]] | None = None
        self._method: str | None = None
        self._validation_set: Validation | None = None  # shared by the clamp and subspace searches
        self._placement: Placement | None = None
        self._split: tuple[list[Row], list[Row]] | None = None
        self._reported: set[str] = set()
        self._tokens = 0  # tokens through any model forward of this Run (the stages' throughput)

    # ------------------------------------------------------------------ inputs
    @property
    def placement(self) -> Placement:
        """``runtime`` resolved from config.json alone, so a skipped stage never loads the model."""
        if self._placement is None:
            r = self.recipe
            chosen = placement(r.runtime, read_config(r.model, r.path), r.path)
            # Under torchrun: join the ranks here, before any stage; each rank takes its own GPU.
            device = distributed.init(chosen.device, chosen.device_map, r.path)
            self._placement = replace(chosen, device=device)
        return self._placement

    @property
    def lm(self) -> LoadedModel:
        if self._lm is None:
            self._lm = load_model(self.recipe.model, where=self.recipe.path, **self.placement.load_options())
            self.count_tokens(self._lm.model)
            resolve_site(self._lm.model, self.recipe.site, self.recipe.path)  # fail before any work
        return self._lm

    def release_model(self) -> None:
        """Drop the source model (the next use loads it again): verify frees it before loading the
        export, so the two are never in memory at once."""
        self._lm = None
        gc.collect()

    def count_tokens(self, model: torch.nn.Module) -> None:
        """Add the real (unpadded) tokens of every forward of ``model`` to this Run's count."""

        def count(_m: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            mask = kwargs.get("attention_mask")
            ids = kwargs.get("input_ids", args[0] if args else None)
            self._tokens += int(mask.sum()) if mask is not None else ids.numel() if ids is not None else 0

        model.register_forward_pre_hook(count, with_kwargs=True)

    def _ensure_data(self) -> None:
        data = self.recipe.data
        paths = [Path(p) for p in (data.train, data.eval, data.validation) if p]
        if data.build_world and not all(p.exists() for p in paths):
            from sauce_export.world.generate import WorldConfig, build_world

            build_world(Path(data.train).parent, WorldConfig(seed=data.world_seed), progress=self.progress)

    def _rows(self, path: str) -> list[Row]:
        if path not in self._rows_cache:
            self._ensure_data()
            self._rows_cache[path] = read_rows(path)
        return self._rows_cache[path]

    def _split_train(self) -> tuple[list[Row], list[Row]]:
        """(train, validation): ``data.validation`` when given, else a carve-out of ``data.train``
        (computed once per Run: every stage that reads training rows asks for it)."""
        if self._split is None:
            data = self.recipe.data
            if data.validation:
                self._split = self._rows(data.train), self._rows(data.validation)
            else:
                self._split = hold_out(self._rows(data.train), data.validation_share)
        return self._split

    @property
    def train_rows(self) -> list[Row]:
        """Rows for SAE training, concept scores and fold calibration (never validation rows)."""
        return self._split_train()[0]

    @property
    def validation_rows(self) -> list[Row]:
        """Rows for every automatic choice (calibration); never scored by verify."""
        return self._split_train()[1]

    @property
    def validation_source(self) -> str:
        data = self.recipe.data
        if data.validation:
            return data.validation
        return f"carved out of {data.train}: {data.validation_share:.0%} of each answer's images, held back"

    @property
    def eval_rows(self) -> list[Row]:
        return self._rows(self.recipe.data.eval)

    @property
    def concepts(self) -> list[Concept]:
        return [c.concept() for c in self.recipe.concepts]

    # ------------------------------------------------------------------ stage bookkeeping
    def _stage(
        self,
        name: str,
        key: dict[str, Any],
        body: Callable[[Path], dict[str, Any]],
        every_rank: bool = False,
    ) -> dict[str, Any]:
        """Run ``body`` unless ``stage.json`` holds this key's result. Under torchrun rank 0 decides
        (so every rank takes the same path) and runs ``body`` alone, handing its result to the
        others, unless ``every_rank``: then every rank runs it (it splits the work itself)."""
        directory = self.out / name
        # A result computed in another dtype is another result (the device is not: same numbers).
        digest = json.dumps({**key, "dtype": str(self.placement.dtype)}, sort_keys=True, default=str)
        marker = directory / "stage.json"

        def finished() -> dict[str, Any] | None:
            done = json.loads(marker.read_text()) if marker.exists() else {}
            return done["result"] if done.get("key") == digest else None

        done = distributed.on_main(finished)
        if done is not None:
            self._announce(name, None)
            return done
        directory.mkdir(parents=True, exist_ok=True)
        start, before = time.time(), self._tokens
        result = body(directory) if every_rank else distributed.on_main(lambda: body(directory))
        seconds = time.time() - start
        # Tokens through the model (every rank's); the SAE stages report the activations they read.
        tokens = int(
            distributed.all_sum(torch.tensor(self._tokens - before)) if every_rank else self._tokens - before
        )
        tokens = int(result.get("tokens", tokens))
        if distributed.is_main():
            cost = {
                "seconds": round(seconds, 2),
                "tokens": tokens,
                "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
            }
            marker.write_text(json.dumps({"key": digest, **cost, "result": result}, indent=1))
        self._announce(name, seconds)
        return result

    def _announce(self, name: str, seconds: float | None) -> None:
        """The stage's one log line, once per Run (later stages ask for earlier ones again)."""
        if name not in self._reported:
            self._reported.add(name)
            stage_done(name, seconds, self.progress)

    def cost(self) -> dict[str, dict[str, Any]]:
        """Each finished stage's seconds, tokens and tokens/s as its stage.json recorded them."""
        out = {}
        for name in STAGES:
            marker = self.out / name / "stage.json"
            if marker.exists():
                done = json.loads(marker.read_text())
                out[name] = {k: done.get(k) for k in ("seconds", "tokens", "tokens_per_s")}
        return out

    def sample_rows(self) -> list[Row]:
        """The seeded sample of training rows whose activations the collect stage stores."""
        cfg = self.recipe.collect
        rows = self.train_rows
        if len(rows) <= cfg.max_rows:
            return rows
        idx = sorted(random.Random(cfg.seed).sample(range(len(rows)), cfg.max_rows))
        return [rows[i] for i in idx]

    # ------------------------------------------------------------------ stages
    def collect(self) -> ActivationStore:
        if self._store is None:
            self._store = self._collect()
        return self._store

    def _collect(self) -> ActivationStore:
        r = self.recipe
        cfg = CollectConfig(
            site=str(parse_site(r.site, r.path)),
            scope=r.collect.scope,
            batch_size=r.collect.batch_size,
            shard_tokens=r.collect.shard_tokens,
            dtype=r.collect.dtype or dtype_name(self.placement.dtype),
        )
        key: dict[str, Any] = {
            "model": r.model,
            "data": r.data.train,
            "collect": asdict(r.collect),
            "site": cfg.site,
        }
        if not r.data.validation:  # the carve-out changes which training rows are sampled
            key["holdout"] = r.data.validation_share

        def body(directory: Path) -> dict[str, Any]:
            rows = self.sample_rows()  # bad data fails before the model loads
            acts, world = directory / "acts", distributed.world()
            if world == 1:
                store = collect(self.lm, rows, cfg, acts, progress=self.progress)
            else:  # each rank its share of the rows, into its own part; rank 0 lists them all
                rank, parts = distributed.rank(), [acts / f"rank-{i}" for i in range(world)]
                distributed.together(
                    lambda: collect(self.lm, rows, cfg, parts[rank], self.progress, (rank, world))
                )
                store = distributed.on_main(lambda: merge_parts(acts, parts))
            return {"d_in": store.d_in, "shards": len(store.manifest["shards"])}

        self._stage("collect", key, body, every_rank=True)
        return ActivationStore(self.out / "collect" / "acts")

    def sae(self) -> SAE:
        if self._sae is None:
            self._sae = self._train_sae()
        return self._sae

    def _train_sae(self) -> SAE:
        r = self.recipe
        expected_site = str(parse_site(r.site, r.path))
        # sae.path: its site and model are checked before any activation is collected
        external = load_recipe_sae(r) if r.sae.path else None
        key = {"collect": self.collect().manifest["config"], "sae": asdict(r.sae), "model": r.model}

        def body(directory: Path) -> dict[str, Any]:
            self.release_model()  # the SAE trains on the stored activations alone (fold reloads it)
            store = self.collect()
            own = store.part(distributed.rank(), distributed.world())  # each rank reads its own shards
            if external is not None:
                with about_sae_path(r):
                    check_sae(external, d_in=store.d_in, where=str(r.sae.path))
                sae, stats = external, distributed.together(lambda: sae_stats(external, own))
            else:
                check_sae_width(r, store.d_in)

                def train() -> tuple[SAE, Any]:  # DistributedDataParallel under torchrun
                    cfg = r.sae.train_config()
                    return train_sae(own, store.d_in, cfg, self.progress, self.placement.device)

                sae, stats = distributed.together(train)
                sae.cfg.site, sae.cfg.model = expected_site, r.model
            distributed.on_main(lambda: save_sae(sae, directory / "sae"))
            trained = r.sae.train_config()
            return {
                # Activations read: each training step's batch, or one pass to measure a given SAE.
                "tokens": store.tokens_stored
                if external is not None
                else trained.total_steps(store.tokens_stored) * trained.batch_size,
                "fvu": stats.fvu,
                "l0": stats.l0,
                "dead_frac": stats.dead_frac,
                "d_sae": sae.cfg.d_sae,
                "kind": sae.cfg.kind,
                "k": sae.cfg.k,
                "source": r.sae.path or "trained",
            }

        self.sae_info = self._stage("train-sae", key, body, every_rank=True)
        # float32 (as trained) next to the model: the edit casts each hidden state to it and back.
        return load_sae(self.out / "train-sae" / "sae").to(self.placement.device)

    def selection_plans(self) -> dict[str, dict[str, Any]]:
        """Each concept's score and feature count: its own where the recipe sets them, else ``select.*``."""
        return {str(e.concept()): e.selection(self.recipe.select) for e in self.recipe.concepts}

    def select(self) -> dict[str, dict[str, list[int]]]:
        """Per concept and score method, the selected latents, best first: the recipe's plan for a
        concept it sets, the ``max(calibrate.top_n)`` best of each searched score otherwise."""
        if self._ranked is None:
            self._ranked = self._select()
        return self._ranked

    def _select(self) -> dict[str, dict[str, list[int]]]:
        r = self.recipe
        sae = self.sae()
        plans = self.selection_plans()
        searched = {str(e.concept()): e.searched(r.calibrate) for e in r.concepts}
        sub = r.subspace
        top = (
            max(r.calibrate.top_n)
            if r.edit.method == "clamp"
            else max(*r.calibrate.top_n, sub.latents, *sub.latents_grid)
        )
        cal = {"methods": r.calibrate.methods, "top_n": top}
        key = {"sae": self.sae_info, "tokens": r.select.tokens, "concepts": plans, "search": [searched, cal]}

        def body(directory: Path) -> dict[str, Any]:
            store = self.collect()
            rows = self.sample_rows()
            scores, selected, ranked = {}, {}, {}
            sums = {
                k: label_sums(sae, store, rows, k, r.select.tokens) for k in {c.kind for c in self.concepts}
            }
            for concept in self.concepts:
                plan, name = plans[str(concept)], str(concept)
                methods = r.calibrate.methods if searched[name] else [plan["method"]]
                ranked[name] = {}
                for method in methods:
                    score = concept_scores(
                        sae, store, rows, concept, method, r.select.tokens, r.path, sums[concept.kind]
                    )
                    if searched[name]:
                        chosen = select_features(score, top_n=cal["top_n"])
                        label = f"{name} {method}"
                    else:
                        chosen = select_features(score, top_n=plan["top_n"], percentile=plan["percentile"])
                        label = name
                    scores[label], selected[label], ranked[name][method] = score, chosen, chosen
                if not any(ranked[name].values()):
                    raise InputError(r.path, "select", f"no feature scores above 0 for {concept}")
            save_scores(directory / "scores.json", scores, selected)
            return {"ranked": ranked, "tokens": store.tokens_stored * len(sums)}  # a pass per kind

        return self._stage("select", key, body)["ranked"]

    @property
    def method(self) -> str:
        """``clamp`` or ``subspace``: the recipe's ``edit.method``, or what ``auto`` calibrated to."""
        if self.recipe.edit.method != "auto":
            return self.recipe.edit.method
        if self._method is None:
            self.calibrate()
        assert self._method is not None
        return self._method

    def calibrate(self) -> dict[str, Any]:
        """The calibrate stage: each concept's point (searched on validation rows, or the recipe's
        own), the search table and its cost. CalibrationFailed (exit 1) when nothing passes.

        ``edit.method: auto`` searches the clamp first and, when no clamp point passes on
        validation, the subspace patch (docs/selectivity.md: on text persons no clamp passes)."""
        try:
            return self._calibrate()
        finally:
            self._validation_set = None  # its encoded rows and replay states are not needed after

    def _calibrate(self) -> dict[str, Any]:
        r = self.recipe
        ranked = self.select()
        if r.edit.method == "subspace":
            self.calibration = self._subspace_calibration(ranked)
            return self.calibration
        if r.edit.method == "clamp":
            return self._clamp_calibration(ranked)
        if self._method is not None:
            return self.calibration
        try:
            self._clamp_calibration(ranked)
            self._method = "clamp"
        except CalibrationFailed as err:
            rows = self.validation_rows
            if not all(any(c.asked_by(row) for row in rows) for c in self.concepts):
                raise  # a concept without validation rows: no search can help
            if self.progress:
                print(f"calibrate: {err}; searching the subspace patch", file=sys.stderr)
            self.calibration = {**self._subspace_calibration(ranked), "clamp_failed": str(err)}
            self._method = "subspace"
        return self.calibration

    def _clamp_calibration(self, ranked: dict[str, dict[str, list[int]]]) -> dict[str, Any]:
        r = self.recipe
        fixed = {}
        for entry in r.concepts:
            name = str(entry.concept())
            if not entry.searched(r.calibrate):
                plan = entry.selection(r.select)
                clamp = r.edit.clamp if entry.clamp is None else entry.clamp
                features = tuple(ranked[name][plan["method"]])
                fixed[name] = Point(plan["method"], plan["top_n"], clamp, features, plan["percentile"])
        searched = [str(e.concept()) for e in r.concepts if e.searched(r.calibrate)]
        key = {
            "select": ranked,
            "fold": asdict(r.fold),
            "fixed": {c: p.to_dict() for c, p in fixed.items()},
            "calibrate": asdict(r.calibrate),
            "gates": asdict(r.verify),
            "edit": asdict(r.edit),
            "validation": self.validation_source,
            "model": r.model,
        }

        def body(directory: Path) -> dict[str, Any]:
            if not searched:
                return _unsearched({c: {**p.to_dict(), "calibrated": False} for c, p in fixed.items()})
            rows = self.validation_rows
            validation = self._validation()
            check = None
            if r.calibrate.fold_checks:
                check = FoldCheck(
                    lambda edit: fold(self.lm, edit, self.train_rows, self.concepts, r.fold, self.progress),
                    r.verify.forget_slack,
                    r.verify.keep_slack,
                )
            try:
                result = calibrate(validation, ranked, fixed, searched, check)
            except CalibrationFailed as err:
                (directory / "failed.json").write_text(
                    json.dumps({"error": str(err), "table": err.table}, indent=1)
                )
                raise
            result["validation"] = {"source": self.validation_source, "rows": len(rows)}
            patch = result.pop("patch")
            if patch is not None:  # the fold stage reuses the fold checked here
                patch.save(directory / "patch.safetensors")
                result["folded"] = _edit_key(self.edit_of(result["choices"]))
            if self.progress:
                print(
                    f"calibrate: {result['evaluations']} hooked evaluations ({result['rows_scored']} "
                    f"validation rows) in {result['seconds']} s",
                    file=sys.stderr,
                )
            return result

        self.calibration = self._stage("calibrate", key, body)
        return self.calibration

    def _validation(self) -> Validation:
        """The validation rows of every concept, encoded once, with the calibrate.* margins under the
        verify gates (the clamp search and the subspace search score on the same sets: under
        ``auto`` the subspace search reuses the clamp search's, built once per calibrate)."""
        if self._validation_set is None:
            self._validation_set = self._new_validation()
        return self._validation_set

    def _new_validation(self) -> Validation:
        r = self.recipe
        cal, gates = r.calibrate, r.verify
        search = Search(
            methods=cal.methods,
            top_n=cal.top_n,
            clamps=cal.clamps,
            clamp_step=cal.clamp_step,
            deeper=cal.deeper,
            runner_ups=cal.runner_ups,
            fold_checks=cal.fold_checks,
            forget_margin=cal.forget_margin,
            keep_margin=cal.keep_margin,
            hooked_forget_margin=gates.hooked_forget_margin,
            hooked_keep=gates.hooked_keep,
            sample_rows=cal.sample_rows,
            batch_size=cal.batch_size,
            seed=cal.seed,
        )
        return Validation(
            self.lm, self._edit_settings(), self.validation_rows, self.concepts, search, self.progress
        )

    def _subspace_calibration(self, ranked: dict[str, dict[str, list[int]]]) -> dict[str, Any]:
        """Each concept's latents for the subspace patch (its own ``top_n``, else ``subspace.latents``
        or the count the search picks) and, with ``subspace.search``, the lr and steps chosen on
        validation rows. The clamp is kept for the hooked edit reported beside the patch."""
        r = self.recipe
        methods, own, clamps = {}, {}, {}
        for entry in r.concepts:
            name = str(entry.concept())
            method = entry.selection(r.select)["method"]
            methods[name] = method if method in ranked[name] else next(iter(ranked[name]))
            own[name] = entry.top_n
            clamps[name] = r.edit.clamp if entry.clamp is None else entry.clamp
        lists = {c: ranked[c][m] for c, m in methods.items()}

        def choices(n: int, calibrated: bool) -> dict[str, dict[str, Any]]:
            out = {}
            for c, features in lists.items():
                chosen = tuple(features[: own[c] or n])
                point = Point(methods[c], len(chosen), clamps[c], chosen)
                out[c] = {**point.to_dict(), "calibrated": calibrated and own[c] is None}
            return out

        if not r.subspace.search:
            return _unsearched(choices(r.subspace.latents, False))
        key = {
            "select": lists,
            "own": own,
            "subspace": asdict(r.subspace),
            "calibrate": asdict(r.calibrate),
            "gates": asdict(r.verify),
            "validation": self.validation_source,
            "model": r.model,
        }

        def body(directory: Path) -> dict[str, Any]:
            site = str(parse_site(r.site, r.path))
            args = (self.lm, self.sae(), site, lists, own, self.train_rows, self.concepts, r.subspace)
            try:
                found = subspace_search(*args, self._validation(), self.progress)
            except CalibrationFailed as err:
                (directory / "failed.json").write_text(
                    json.dumps({"error": str(err), "table": err.table}, indent=1)
                )
                raise
            if self.progress:
                print(
                    f"calibrate: {found['fits']} subspace fits ({found['rows_scored']} validation rows "
                    f"scored) in {found['seconds']} s",
                    file=sys.stderr,
                )
            return {
                "choices": choices(found["latents"], True),
                "subspace": {k: found[k] for k in ("latents", "lr", "steps", "kl_weight", "score")},
                "table": found["table"],
                "evaluations": found["fits"],
                "rows_scored": found["rows_scored"],
                "seconds": found["seconds"],
                "validation": {"source": self.validation_source, "rows": len(self.validation_rows)},
            }

        return self._stage("calibrate", key, body)

    def choices(self) -> dict[str, dict[str, Any]]:
        """Each concept's method, top_n, clamp and features as calibrated (or set by the recipe)."""
        if self._choices is None:
            self._choices = self.calibrate()["choices"]
        return self._choices

    def selected(self) -> dict[str, list[int]]:
        """Each concept's latents in the edit."""
        return {c: list(p["features"]) for c, p in self.choices().items()}

    def concept_clamps(self) -> dict[str, float]:
        """Each concept's clamp target."""
        return {c: float(p["clamp"]) for c, p in self.choices().items()}

    def _edit_settings(self) -> EditSettings:
        r = self.recipe
        return EditSettings(
            sae=self.sae(),
            site=str(parse_site(r.site, r.path)),
            multiplier=r.edit.multiplier,
            only_where_active=r.edit.only_where_active,
            scope=r.edit.scope,
            image_token_id=self.lm.image_token_id,
        )

    def edit(self) -> Edit:
        """The reference edit: every concept's selected latents, clamped together at the site (a
        latent selected by several concepts gets the most negative of their targets)."""
        return self.edit_of(self.choices())

    def edit_of(self, choices: dict[str, dict[str, Any]]) -> Edit:
        points = {c: Point.from_dict(p) for c, p in choices.items()}
        return self._edit_settings().union(points)

    def patch(self) -> Patch:
        """The fold of ``edit()`` into weights, saved as ``fold/patch.safetensors``."""
        r = self.recipe
        key = {
            "select": self.selected(),
            "edit": asdict(r.edit),
            "clamps": self.concept_clamps(),
            "fold": asdict(r.fold)
            if self.method == "clamp"
            else [asdict(r.subspace), self.calibrate().get("subspace")],
            "model": r.model,
        }

        # Asked here, on every rank: under torchrun the body runs on rank 0 alone.
        reuse = self.method == "clamp" and self.calibrate().get("folded") == _edit_key(self.edit())

        def body(directory: Path) -> dict[str, Any]:
            rows = self.train_rows
            checked = self.out / "calibrate" / "patch.safetensors"
            if self.method == "subspace":
                site = str(parse_site(r.site, r.path))
                chosen = self.calibrate().get("subspace", {})
                keys = ("lr", "steps", "kl_weight")
                cfg = replace(r.subspace, **{k: chosen[k] for k in keys if k in chosen})
                patch = fit_subspace(
                    self.lm, self.sae(), site, self.selected(), rows, self.concepts, cfg, self.progress
                )
                features = patch.description["features"]
                extra = {
                    "top_tokens": top_tokens(
                        self.lm, self.sae(), self.collect(), self.sample_rows(), features
                    )
                }
            elif reuse and checked.exists():
                patch = Patch.load(checked)  # this very edit, folded and checked by calibrate
                extra = {}
            else:
                patch = fold(self.lm, self.edit(), rows, self.concepts, r.fold, self.progress)
                extra = {}
            patch.save(directory / "patch.safetensors")
            return {"description": patch.description, "modules": patch.stats(), **extra}

        self.fold_info = self._stage("fold", key, body)
        return Patch.load(self.out / "fold" / "patch.safetensors")

    def export(self) -> dict[str, Any]:
        """A standalone checkpoint at ``export/model``, streamed from the source with the patch."""
        from sauce_export.export import export_checkpoint
        from sauce_export.provenance import export_metadata

        patch = self.patch()
        key = {"fold": self.fold_info, "model": self.recipe.model}
        target = self.out / "export" / "model"

        def body(directory: Path) -> dict[str, Any]:
            provenance = export_metadata(patch, self.out / "fold" / "patch.safetensors", self.recipe.path)
            return export_checkpoint(
                self.lm.local_dir, patch, target, overwrite=True, metadata=provenance, progress=self.progress
            )

        return self._stage("export", key, body)

    def verify(self) -> dict[str, Any]:
        """Accuracy of original / hooked / folded / exported, and fidelity of the last two to hooked."""
        r = self.recipe
        edit, patch, exported = self.edit(), self.patch(), self.export()
        key = {
            "fold": self.fold_info,
            "export": exported["files"],
            "eval": asdict(r.eval),
            "data": r.data.eval,
            "choices": self.choices(),
        }

        # Fidelity prompts per concept; rank 0 measures fidelity, every rank scores its share of rows.
        sets = {
            str(c): fidelity_sets(
                self.eval_rows, c, self.concepts, r.eval.forget_split, r.eval.fidelity_rows, r.fold.seed
            )
            for c in self.concepts
        }

        def scored(lm: LoadedModel, variants: list[Variant], reference: dict[str, Cached]) -> tuple[Any, Any]:
            """Every row's correctness under each variant (rows split over the ranks, gathered) and,
            on rank 0, each concept's fidelity of each variant to the cached reference."""

            def score() -> dict[str, dict[str, bool]]:  # under torchrun: this rank's share of the rows
                out = {}
                for v in variants:
                    with v.context():
                        out[v.name] = row_correctness(
                            LoadedModel(v.model, lm.tokenizer, lm.processor, lm.path),
                            distributed.part(self.eval_rows),
                            r.eval.batch_size,
                            f"eval {v.name}",
                            self.progress,
                        )
                return out

            shares = distributed.gather(distributed.together(score))
            correct = {v.name: {k: ok for s in shares for k, ok in s[v.name].items()} for v in variants}

            def fidelities() -> dict[str, dict[str, dict[str, float]]]:
                bs, progress = r.eval.batch_size, self.progress
                return {
                    c: {
                        v.name: fidelity_report(lm, reference[c], v, sets[c], edit, bs, progress)
                        for v in variants
                    }
                    for c in sets
                }

            return correct, distributed.on_main(fidelities)

        def on_source() -> tuple[Any, Any, dict[str, Cached]]:
            lm, bs = self.lm, r.eval.batch_size
            model = lm.model
            source = [
                Variant("original", model),
                Variant("hooked", model, lambda: edit.apply(model)),
                Variant("folded", model, lambda: patch.apply(model)),
            ]
            ref = next(v for v in source if v.name == REFERENCE[self.method])

            def cache() -> dict[str, Cached]:  # rank 0 alone measures fidelity
                if not distributed.is_main():
                    return {}
                return {
                    c: Cached(
                        ref.name,
                        {n: reference_outputs(lm, ref, rows, edit.site, bs) for n, rows in s.items()},
                    )
                    for c, s in sets.items()
                }

            reference = distributed.together(cache)
            return *scored(lm, source, reference), reference

        def body(directory: Path) -> dict[str, Any]:
            # The source model and the exported one are never in memory together: the reference's
            # outputs are cached, then the source is released before the export is loaded.
            correct, fid, reference = on_source()
            self.release_model()
            reloaded = load_model(exported["path"], where="export", **self.placement.load_options())
            self.count_tokens(reloaded.model)
            more, more_fid = scored(reloaded, [Variant("exported", reloaded.model)], reference)
            correct |= more
            return distributed.on_main(lambda: measure(correct, {c: fid[c] | more_fid[c] for c in sets}))

        def measure(
            correctness: dict[str, dict[str, bool]], fidelity: dict[str, dict[str, dict[str, float]]]
        ) -> dict[str, Any]:
            """Rank 0: the metrics from every row's correctness, with each variant's fidelity."""
            rows = self.eval_rows
            concepts = []
            for concept in self.concepts:
                selection = metric_rows(
                    rows, concept, r.eval.forget_split, r.eval.generality_split, removed=self.concepts
                )
                if not selection["forget_acc"]:
                    raise InputError(
                        r.data.eval, "labels", f"no {r.eval.forget_split} questions about {concept}"
                    )
                metrics = {
                    name: concept_metrics(correct, selection) | fidelity[str(concept)][name]
                    for name, correct in correctness.items()
                }
                concepts.append(
                    {
                        "name": concept.name,
                        "kind": concept.kind,
                        "chance_acc": chance_accuracy(rows, concept.kind),
                        "features": self.selected()[str(concept)],
                        "select": {
                            k: self.choices()[str(concept)][k] for k in ("method", "top_n", "percentile")
                        },
                        "clamp": self.concept_clamps()[str(concept)],
                        "calibrated": self.choices()[str(concept)]["calibrated"],
                        "counts": {m: len(v) for m, v in selection.items()},
                        "metrics": metrics,
                    }
                )
            return {"concepts": concepts}

        return self._stage("verify", key, body, every_rank=True)


REFERENCE = {"clamp": "hooked", "subspace": "folded"}
"""The variant every other is measured against: the hooked clamp, or the subspace patch itself
(fitted to the objective, not to the clamp; the hooked clamp is then reported for contrast)."""


def _unsearched(choices: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A calibration result for choices the recipe fixed: no search table, no cost."""
    return {"choices": choices, "table": [], "evaluations": 0, "rows_scored": 0, "seconds": 0.0}


def _edit_key(edit: Edit) -> dict[str, Any]:
    """What identifies an edit's fold besides the recipe: its latents and their targets."""
    return {"features": list(edit.features), "clamps": list(edit.clamps)}


def label_sums(
    sae: SAE, store: ActivationStore, rows: list[Row], kind: str, tokens: str
) -> tuple[list[str], GroupSums]:
    """(values of ``kind`` in ``rows``, per-value sums; the last group: rows without that label)."""
    values = sorted({row.labels[kind] for row in rows if kind in row.labels})
    index = {v: i for i, v in enumerate(values)}
    row_group = torch.tensor([index.get(row.labels.get(kind, ""), len(values)) for row in rows])

    def chunks() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for shard in store.shards():
            keep = ~shard.answer if tokens == "prompt" else torch.ones_like(shard.answer)
            yield shard.acts[keep], row_group[shard.row[keep].long()]

    return values, group_sums(sae, chunks(), len(values) + 1)


def concept_scores(
    sae: SAE,
    store: ActivationStore,
    rows: list[Row],
    concept: Concept,
    method: str,
    tokens: str,
    where: str,
    sums: tuple[list[str], GroupSums] | None = None,
) -> torch.Tensor:
    """Score every latent for one concept from the stored activations of ``rows`` (``sums``: this
    kind's ``label_sums``, computed here when not given)."""
    concept_split(rows, concept, where)  # fails loudly on an empty concept set
    values, groups = sums or label_sums(sae, store, rows, concept.kind, tokens)
    target = values.index(concept.name)
    if method == "specific":
        if len(values) < 2:
            raise InputError(
                where, "select.method", f"'specific' needs other {concept.kind} values to compare with"
            )
        means = groups.means()
        return specific_scores(means[target], [means[i] for i in range(len(values)) if i != target])
    stats = groups.stats(target)
    return saeuron_scores(stats) if method == "saeuron" else contrast_scores(stats)


def run_all(recipe: Recipe, out: Path, progress: bool = True) -> dict[str, Any]:
    """collect -> train-sae -> select -> fold -> export -> verify, then report.json / report.md."""
    from sauce_export.report import machine, write_report

    run = Run(recipe, out, progress)
    calibration = run.calibrate()
    padding = asdict(run.lm.padding)  # before verify, which releases the model
    ranks = distributed.world()
    result = run.verify()
    distributed.close()  # what follows (reading finished stages, the report) is rank 0's alone
    if not distributed.is_main():
        return {}
    exported = run.export()
    checks = gate_checks(result["concepts"], recipe.verify, "exported", REFERENCE[run.method])
    report = {
        "recipe": json.loads(json.dumps(asdict(recipe), default=str)),
        "model": recipe.model,
        "site": recipe.site,
        "padding": padding,
        "sae": run.sae_info,
        "fold": run.fold_info,
        "export": {"path": exported["path"], "files": exported["files"]},
        "concepts": result["concepts"],
        "gates": {"passed": all(c["passed"] for c in checks), "checks": checks},
        "reference": REFERENCE[run.method],
        "method": run.method,
        "metrics_reported": list(METRICS),
        "calibration": calibration,
        "machine": machine(),
        "cost": run.cost(),
        "runtime": {
            "dtype": dtype_name(run.placement.dtype),
            "device": str(run.placement.device),
            "device_map": run.placement.device_map,
            "ranks": ranks,
        },
    }
    write_report(report, Path(out))
    from sauce_export.card import write_card

    write_card(report, Path(out))  # README.md in the exported checkpoint, linked from report.md
    return report
