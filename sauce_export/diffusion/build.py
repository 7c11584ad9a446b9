"""Rebuild the shipped diffusion models from their seed: the pipeline, the classifier, and the
original pipeline's quality on validation rows (the figure every retain gate is relative to)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from sauce_export.diffusion import metrics
from sauce_export.diffusion import model as M
from sauce_export.diffusion import world as W
from sauce_export.errors import InputError
from sauce_export.fsutil import atomic_dir

PIPELINE = "world-diffusion"
CLASSIFIER = "world-diffusion-classifier"


def train_world_diffusion(out: Path, cfg: M.DiffusionTrainConfig, progress: bool = True) -> dict[str, object]:
    """Write ``out/world-diffusion`` (IFPipeline folder), ``out/world-diffusion-classifier`` and
    ``out/world-diffusion.json`` (config, seconds, losses, accuracies)."""
    torch.set_num_threads(cfg.threads)
    if cfg.init and not (Path(cfg.init) / "model_index.json").is_file():
        raise InputError(cfg.init, "--init", "not a pipeline folder (no model_index.json)")
    # a continuation keeps the record of the run it continues, so the JSON says how to rebuild it all
    earlier_path = Path(cfg.init).parent / f"{PIPELINE}.json" if cfg.init else None
    earlier = json.loads(earlier_path.read_text()) if earlier_path and earlier_path.is_file() else {}
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with atomic_dir(out / PIPELINE, overwrite=True) as tmp:
        report = M.train_pipeline(tmp, cfg, progress)
    clf_start = time.time()
    clf = M.train_classifier(cfg.seed)
    with atomic_dir(out / CLASSIFIER, overwrite=True) as tmp:
        M.save_classifier(clf, tmp)
    report["classifier_seconds"] = round(time.time() - clf_start, 1)
    held_out, images = M.renders(8, cfg.seed + 1)
    judged = metrics.Judged(images / 2 + 0.5, *clf.predict(images / 2 + 0.5))
    report["classifier_accuracy_on_renders"] = metrics.accuracy(held_out, judged)
    rows = W.rows("validation", 2, cfg.seed)
    judged = metrics.generate(M.load_pipeline(out / PIPELINE), rows, clf, progress=progress)
    report["original_accuracy_validation"] = metrics.accuracy(rows, judged)
    report["sampling"] = asdict(M.Sampling())
    report["seconds_total"] = round(time.time() - start, 1)
    flags = "".join(
        f" --{k.replace('_', '-')} {v}"
        for k, v in asdict(cfg).items()
        if v != getattr(M.DiffusionTrainConfig, k)
    )
    report["commands"] = [
        *earlier.get("commands", []),
        f"sauce-export world train-diffusion --out {out}{flags}",
    ]
    if earlier:
        report["init_record"] = {k: earlier[k] for k in ("config", "seconds", "original_accuracy_validation")}
    (out / f"{PIPELINE}.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
