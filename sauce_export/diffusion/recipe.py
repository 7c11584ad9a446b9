"""The diffusion recipe (``family: diffusion``): the same strict loader as the language recipes,
its own sections, because a UNet run has timesteps, samplers and image judges instead of answers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sauce_export.errors import InputError
from sauce_export.recipe import _build, _f
from sauce_export.sae.train import TrainConfig


def _list(default: list[Any], help: str) -> Any:
    return field(default_factory=lambda: list(default), metadata={"help": help})


@dataclass
class DataSection:
    dir: str = _f("data/world-diffusion", "Directory with train/validation/eval.jsonl diffusion rows.")
    build_world: bool = _f(True, "Build the diffusion world there first when its files are missing.")
    world_seed: int = _f(0, "Seed of the built world.")


@dataclass
class SamplingSection:
    steps: int = _f(12, "DPM-Solver++ steps of every generation.", min=1)
    guidance: float = _f(3.0, "Classifier-free guidance scale.", min=1)
    batch_size: int = _f(64, "Rows per denoising batch.", min=1)


@dataclass
class CollectSection:
    max_rows: int = _f(192, "Training rows (a seeded sample) whose site activations train the SAE.", min=1)
    seed: int = _f(0, "Seed of the row sample.")


@dataclass
class ConceptEntry:
    kind: Literal["object", "style"] = _f("object", "object or style.")
    name: str = _f("", "The object or style to remove.")


@dataclass
class CalibrateSection:
    edits: list[Literal["gated", "project"]] = _list(  # noqa: RUF009
        ["gated"],
        "Edit kinds in order of preference; the first with a passing point for every concept wins. "
        "gated: SAeUron's multiplier on latents above their mean (LoRA fit fold); project: the latents' "
        "decoder directions scaled in a writer's output (exact fold; the site must be a Linear/conv).",
    )
    top_n: list[int] = _list([1, 2, 4, 8, 16], "Feature counts tried, per concept (SAeUron score order).")  # noqa: RUF009
    multipliers: list[float] = _list([-1.0, -4.0, -16.0], "Negative multipliers tried (SAeUron's gamma).")  # noqa: RUF009
    scales: list[float] = _list(  # noqa: RUF009
        [0.0, -0.5, -1.0], "Scales of the directions tried by the project edit (0 projects them out)."
    )
    ua_margin: float = _f(0.05, "UA on validation rows must beat verify.ua by this margin.", min=0)
    retain_margin: float = _f(
        0.02, "IRA/CRA ratios on validation must beat verify.retain_ratio by this.", min=0
    )


@dataclass
class FoldSection:
    modules: list[str] = _list(  # noqa: RUF009
        ["transformer_blocks.0.attn2.to_out.0", "transformer_blocks.0.ff.net.2"],
        "Linear modules inside the site's block that carry the LoRA patch (paths relative to the site).",
    )
    rank: int = _f(8, "LoRA rank of each module's patch.", min=1)
    steps: int = _f(400, "Adam steps fitting the patch to the hooked block outputs.", min=1)
    lr: float = _f(3e-3, "Adam learning rate of the fit.", above=0)
    rows: int = _f(96, "Training rows whose hooked trajectories (every timestep) calibrate the fit.", min=1)
    refits: int = _f(
        0,
        "Refits on the states the folded UNet itself visits, labelled by the hooked UNet (DAgger-style).",
        min=0,
    )


@dataclass
class GatesSection:
    ua: float = _f(0.9, "Hooked UA at least this.", min=0, max=1)
    retain_ratio: float = _f(0.95, "Hooked IRA and CRA at least this share of the original's.", min=0, max=1)
    exported_gap: float = _f(0.03, "Exported UA/IRA/CRA within this of the hooked.", min=0, max=1)
    agreement: float = _f(
        0.95, "Classifier agreement of exported vs hooked images at least this.", min=0, max=1
    )


@dataclass
class DiffusionRecipe:
    family: Literal["diffusion"] = _f("diffusion", "Marks a diffusion recipe.")
    model: str = _f("models/world-diffusion", "A diffusers pipeline folder (IFPipeline-style, pixel space).")
    classifier: str = _f("models/world-diffusion-classifier", "The judge of generated images.")
    site: str = _f(
        "up_blocks.0.attentions.1",
        "Cross-attention block, or a Linear/conv writer inside one (its proj_out), whose output the SAE reads.",
    )
    concepts: list[ConceptEntry] = field(
        default_factory=list, metadata={"help": "Concepts to remove: a list of {kind, name}."}
    )
    data: DataSection = field(default_factory=DataSection, metadata={"help": "Rows."})
    sampling: SamplingSection = field(default_factory=SamplingSection, metadata={"help": "Generation."})
    collect: CollectSection = field(default_factory=CollectSection, metadata={"help": "Activations."})
    sae: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "SAE training."})
    calibrate: CalibrateSection = field(
        default_factory=CalibrateSection,
        metadata={"help": "Search of top_n and multiplier on validation rows."},
    )
    fold: FoldSection = field(default_factory=FoldSection, metadata={"help": "LoRA fold of the edit."})
    verify: GatesSection = field(default_factory=GatesSection, metadata={"help": "Gates."})
    path: str = field(default="", metadata={"help": "(set by the loader)", "internal": True})


def is_diffusion_recipe(path: Path) -> bool:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and raw.get("family") == "diffusion"


def load_diffusion_recipe(path: str | Path, check_paths: bool = True) -> DiffusionRecipe:
    """The recipe, strictly validated; ``check_paths=False`` (dry runs) skips the model and
    classifier directories, which a plan does not read."""
    where = str(path)
    if not Path(path).is_file():
        raise InputError(where, "path", "recipe file does not exist")
    try:
        raw: Any = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        raise InputError(where, "yaml", "malformed YAML") from err
    recipe: DiffusionRecipe = _build(DiffusionRecipe, raw, where, "")
    recipe.path = where
    if not recipe.concepts:
        raise InputError(where, "concepts", "at least one {kind, name} concept is required")
    cal = recipe.calibrate
    if not cal.top_n or not cal.multipliers or min(cal.top_n) < 1 or max(cal.multipliers) >= 0:
        raise InputError(where, "calibrate", "top_n needs values >= 1 and multipliers values < 0")
    if not cal.edits or ("project" in cal.edits and (not cal.scales or max(cal.scales) >= 1)):
        raise InputError(where, "calibrate.scales", "the project edit needs scales below 1")
    for key in ("model", "classifier") if check_paths else ():
        if not Path(getattr(recipe, key)).is_dir():
            raise InputError(where, key, f"{getattr(recipe, key)} is not a directory")
    return recipe
