"""The YAML recipe: dataclasses that validate strictly and double as documentation.

Every field has a docstring-style ``help`` so ``sauce-export recipe-help`` and ``docs/recipe.md``'s
reference are generated from the same source. Unknown keys, wrong types and missing required
fields are InputErrors naming the file and the dotted field.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sauce_export.data import Concept
from sauce_export.errors import InputError
from sauce_export.fold import FoldConfig
from sauce_export.runtime import RuntimeConfig, check_device
from sauce_export.sae.formats import load_sae
from sauce_export.sae.model import SAE
from sauce_export.sae.train import TrainConfig
from sauce_export.sites import parse_site
from sauce_export.subspace import SubspaceConfig
from sauce_export.verify import VerifyGates


def _f(default: Any, help: str, **bounds: float) -> Any:
    """A recipe field with its help and optional bounds (``min``, ``max``, ``above``), checked at load."""
    return field(default=default, metadata={"help": help, **bounds})


@dataclass
class DataSection:
    train: str = _f("data/world/train.jsonl", "JSONL rows for SAE training, concept sets and calibration.")
    eval: str = _f(
        "data/world/eval.jsonl",
        "JSONL rows for evaluation (held-out views and paraphrases), read only by verify.",
    )
    validation: str | None = _f(
        None,
        "JSONL rows for every automatic choice (calibration). When absent, a deterministic share of "
        "data.train (whole images, per answer) is held back from SAE training and fold calibration.",
    )
    validation_share: float = _f(
        0.1, "Share of each answer's images (or text rows) of data.train held back when validation is absent."
    )
    build_world: bool = _f(False, "Build the fictitious world first if the data files are missing.")
    world_seed: int = _f(0, "Seed of the fictitious world when build_world is set.")


@dataclass
class CollectSection:
    max_rows: int = _f(3000, "Rows of `data.train` (a seeded sample) whose activations train the SAE.", min=1)
    batch_size: int = _f(64, "Rows per forward pass.", min=1)
    scope: Literal["all", "image", "text"] = _f("all", "Tokens whose activations are stored.")
    shard_tokens: int = _f(65536, "Tokens per safetensors shard (bounds memory).", min=1)
    seed: int = _f(0, "Seed of the row sample.")
    dtype: Literal["bfloat16", "float16", "float32"] | None = _f(
        None, "Dtype of the stored activations (default: the model's; bfloat16 halves the cache)."
    )


@dataclass
class SaeSection(TrainConfig):
    """Load an SAE (``path``) or train one with the TrainConfig fields."""

    path: str | None = _f(
        None, "Load this SAE (ours, SAELens or sparsify directory) instead of training one."
    )
    allow_mismatch: bool = _f(
        False,
        "Use the sae.path SAE although the model or site it records differs from the recipe's "
        "(its width must still match the site).",
    )

    def train_config(self) -> TrainConfig:
        return TrainConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)})


@dataclass
class SelectSection:
    method: Literal["saeuron", "contrast", "specific"] = _f(
        "saeuron",
        "Feature score: saeuron (normalised mean difference vs the rest), contrast (SAUCE-style firing-rate "
        "contrast) or specific (share on the target minus the largest share on any sibling of the same kind).",
    )
    top_n: int | None = _f(8, "Keep the n best-scoring features per concept.", min=1)
    percentile: float | None = _f(
        None, "Or keep features scoring at or above this percentile (set top_n: null).", min=0, max=100
    )
    tokens: Literal["prompt", "all"] = _f("prompt", "Score on prompt tokens only (answers excluded) or all.")


@dataclass
class EditSection:
    method: Literal["auto", "clamp", "subspace"] = _f(
        "auto",
        "clamp: the SAE clamp (the papers' edit), folded by fold.*. subspace: a patch along the selected "
        "latents' decoder directions fitted to the unlearning objective (subspace.*, docs/subspace.md). "
        "auto: the clamp, or the subspace patch when no clamp point passes on validation rows.",
    )
    clamp: float = _f(0.0, "Target value c of the selected latents (0 or negative).", max=0)
    multiplier: float | None = _f(None, "If set, f -> multiplier * f instead of the value clamp.")
    only_where_active: bool = _f(
        True, "Edit a latent only where it fires (keeps other tokens bit-identical)."
    )
    scope: Literal["all", "image", "text"] = _f("all", "Which tokens may be edited.")


@dataclass
class CalibrateSection:
    search: bool = _f(
        True,
        "Search each concept's score, top_n and clamp on validation rows (a concept that sets its own "
        "method/top_n/clamp is not searched). false: select.* and edit.clamp for every such concept.",
    )
    methods: list[Literal["saeuron", "contrast", "specific"]] = field(
        default_factory=lambda: ["specific", "contrast", "saeuron"],
        metadata={"help": "Feature scores tried."},
    )
    top_n: list[int] = field(
        default_factory=lambda: [1, 2, 3, 4, 6, 8], metadata={"help": "Feature counts tried."}
    )
    clamps: list[float] = field(
        default_factory=lambda: [0.0, -10.0, -30.0, -60.0, -100.0],
        metadata={"help": "Clamp grid, bisected in this order of |clamp| for the first that forgets."},
    )
    clamp_step: float = _f(
        5.0, "Refine the first forgetting clamp in steps of this between grid points (0: grid only).", min=0
    )
    deeper: int = _f(3, "Clamps past the first that forgets scored while the summary score rises.", min=0)
    runner_ups: int = _f(3, "Points per concept after its best tried in the unions of all concepts.", min=0)
    fold_checks: int = _f(
        3,
        "Unions meeting every limit that are folded and checked on validation rows (0: no fold check).",
        min=0,
    )
    forget_margin: float = _f(0.03, "Validation forget_acc must be this far under the verify gate's limit.")
    keep_margin: float = _f(
        0.01, "Validation retain/interference must keep (verify.hooked_keep + this) x the original."
    )
    sample_rows: int = _f(256, "At most this many retain and interference rows per concept (seeded sample).")
    batch_size: int = _f(64, "Rows per forward pass.")
    seed: int = _f(0, "Seed of the row samples.")


@dataclass
class EvalSection:
    batch_size: int = _f(128, "Rows per forward pass.", min=1)
    forget_split: str = _f("heldout_view", "Split whose target-concept questions measure forgetting.")
    generality_split: str = _f("heldout_paraphrase", "Split with held-out paraphrases (generality).")
    fidelity_rows: int = _f(
        128, "Forget and retain prompts per concept for KL / agreement vs the hooked edit.", min=1
    )


@dataclass
class ConceptEntry:
    kind: str = _f(
        "",
        "Label key in the data rows, e.g. person, event, colour.",
    )
    name: str = _f("", "Label value to remove, e.g. a person's name.")
    method: Literal["saeuron", "contrast", "specific"] | None = _f(
        None, "This concept's feature score (default: select.method)."
    )
    top_n: int | None = _f(
        None, "This concept's number of features (default: select.top_n / percentile).", min=1
    )
    clamp: float | None = _f(
        None,
        "Target value of this concept's features (default: edit.clamp). A concept whose latents are "
        "re-derived downstream may need a negative target.",
        max=0,
    )

    def concept(self) -> Concept:
        return Concept(self.kind, self.name)

    def searched(self, calibrate: CalibrateSection) -> bool:
        """Calibrated on validation rows: the search is on and this entry sets none of its own
        method / top_n / clamp (any of them makes the entry the user's choice)."""
        return calibrate.search and (self.method, self.top_n, self.clamp) == (None, None, None)

    def selection(self, default: SelectSection) -> dict[str, Any]:
        """The selection this concept uses: its own method / top_n where set, else the recipe's."""
        if self.top_n is not None:
            return {"method": self.method or default.method, "top_n": self.top_n, "percentile": None}
        return {
            "method": self.method or default.method,
            "top_n": default.top_n,
            "percentile": default.percentile,
        }


@dataclass
class Recipe:
    model: str = _f("", "Local model directory or Hub id (loaded with stock Auto classes).")
    site: str = _f(
        "layers.1", "Where the SAE reads and the edit writes: layers.L, layers.L.mlp, layers.L.attn."
    )
    runtime: RuntimeConfig = field(
        default_factory=RuntimeConfig, metadata={"help": "Device and dtype of the model (docs/runtime.md)."}
    )
    concepts: list[ConceptEntry] = field(
        default_factory=list, metadata={"help": "Concepts to remove: a list of {kind, name}."}
    )
    data: DataSection = field(default_factory=DataSection, metadata={"help": "Data files (JSONL rows)."})
    collect: CollectSection = field(
        default_factory=CollectSection, metadata={"help": "Activation collection."}
    )
    sae: SaeSection = field(default_factory=SaeSection, metadata={"help": "Load or train the SAE."})
    select: SelectSection = field(default_factory=SelectSection, metadata={"help": "Feature selection."})
    edit: EditSection = field(
        default_factory=EditSection, metadata={"help": "The hook-based reference edit."}
    )
    calibrate: CalibrateSection = field(
        default_factory=CalibrateSection,
        metadata={"help": "Per-concept search of score, top_n and clamp on validation rows (DESIGN §11)."},
    )
    fold: FoldConfig = field(
        default_factory=FoldConfig, metadata={"help": "How the edit is folded into weights."}
    )
    subspace: SubspaceConfig = field(
        default_factory=SubspaceConfig,
        metadata={"help": "The subspace patch (edit.method: subspace), fitted instead of a fold."},
    )
    eval: EvalSection = field(default_factory=EvalSection, metadata={"help": "Evaluation."})
    verify: VerifyGates = field(
        default_factory=VerifyGates, metadata={"help": "Gates: verify exits 1 when one fails."}
    )
    path: str = field(default="", metadata={"help": "(set by the loader) the recipe file", "internal": True})


def _convert(tp: Any, value: Any, where: str, dotted: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, dotted)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where, dotted)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise InputError(where, dotted, f"must be one of {list(allowed)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise InputError(where, dotted, "must be a list")
        (inner,) = typing.get_args(tp)
        return [_convert(inner, v, where, f"{dotted}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise InputError(where, dotted, f"must be a number, got {value!r}")
        if not math.isfinite(value):
            raise InputError(where, dotted, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise InputError(where, dotted, f"must be true or false, got {value!r}")
    if tp in (int, str) and (not isinstance(value, tp) or isinstance(value, bool)):
        raise InputError(where, dotted, f"must be a{'n integer' if tp is int else ' string'}, got {value!r}")
    return value


def _build(cls: type, raw: Any, where: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise InputError(where, prefix or "recipe", "must be a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        dotted = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise InputError(where, dotted, f"unknown key (known: {', '.join(fields)})")
    kwargs = {}
    for name in fields:
        if name in raw:
            dotted = f"{prefix}.{name}" if prefix else name
            kwargs[name] = _convert(hints[name], raw[name], where, dotted)
            _check_bounds(fields[name].metadata, kwargs[name], where, dotted)
    return cls(**kwargs)


def _check_bounds(meta: Any, value: Any, where: str, dotted: str) -> None:
    """The field's ``min`` / ``max`` / ``above`` bounds (None, the field's "unset", always passes)."""
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return
    lo, hi, above = meta.get("min"), meta.get("max"), meta.get("above")
    if lo is not None and hi is not None:
        if not lo <= value <= hi:
            raise InputError(where, dotted, f"must be between {lo} and {hi}, got {value}")
    elif lo is not None and value < lo:
        raise InputError(where, dotted, f"must be at least {lo}, got {value}")
    elif hi is not None and value > hi:
        bound = "0 or negative" if hi == 0 else f"at most {hi}"
        raise InputError(where, dotted, f"must be {bound}, got {value}")
    if above is not None and value <= above:
        raise InputError(where, dotted, f"must be greater than {above}, got {value}")


def check_sae_width(recipe: Recipe, d_in: int) -> None:
    """``sae.k`` against the number of latents the recipe gives an SAE reading width ``d_in``."""
    cfg = recipe.sae
    d_sae = cfg.num_latents(d_in)
    if not cfg.path and cfg.kind == "topk" and cfg.k > d_sae:
        raise InputError(
            recipe.path or "recipe", "sae.k", f"{cfg.k} exceeds the SAE's {d_sae} latents (site width {d_in})"
        )


@contextmanager
def about_sae_path(recipe: Recipe) -> Iterator[None]:
    """Report a problem of the ``sae.path`` SAE under the recipe's ``sae.path`` key, the SAE's own
    file and field kept in the message."""
    try:
        yield
    except InputError as err:
        hint = " (sae.allow_mismatch: true uses it anyway)" if err.field in ("site", "model") else ""
        raise InputError(recipe.path or "recipe", "sae.path", f"{err}{hint}") from None


def load_recipe_sae(recipe: Recipe, d_in: int | None = None, model: str | None = None) -> SAE:
    """The ``sae.path`` SAE, checked against the recipe's site and model (or ``model``, as
    ``run --dry-run --model`` gives) unless ``sae.allow_mismatch``, and against width ``d_in``."""
    site = str(parse_site(recipe.site, recipe.path))
    checked = {} if recipe.sae.allow_mismatch else {"site": site, "model": model or recipe.model}
    with about_sae_path(recipe):
        return load_sae(str(recipe.sae.path), d_in=d_in, **checked)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise InputError(where, "path", "recipe file does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise InputError(where, "yaml", f"malformed YAML{at}") from err
    recipe: Recipe = _build(Recipe, raw if raw is not None else {}, where, "")
    recipe.path = where
    if not recipe.model:
        raise InputError(where, "model", "required: a local model directory or Hub id")
    if not recipe.concepts:
        raise InputError(where, "concepts", "at least one {kind, name} concept is required")
    for i, c in enumerate(recipe.concepts):
        if not c.kind or not c.name:
            raise InputError(where, f"concepts[{i}]", "needs both kind and name")
    cal = recipe.calibrate
    if not cal.methods or not cal.top_n or not cal.clamps:
        raise InputError(where, "calibrate", "methods, top_n and clamps each need at least one value")
    if min(cal.top_n) < 1:
        raise InputError(where, "calibrate.top_n", f"must be at least 1, got {min(cal.top_n)}")
    if max(cal.clamps) > 0:
        raise InputError(where, "calibrate.clamps", f"must be 0 or negative, got {max(cal.clamps)}")
    sub = recipe.subspace
    for name, values in (("latents_grid", sub.latents_grid), ("lrs", sub.lrs), ("step_grid", sub.step_grid)):
        if not values or min(values) <= 0:
            raise InputError(
                where, f"subspace.{name}", f"needs at least one value, all above 0, got {values}"
            )
    if not 0.0 < recipe.data.validation_share < 1.0:
        raise InputError(
            where, "data.validation_share", f"must be between 0 and 1, got {recipe.data.validation_share}"
        )
    if (recipe.select.top_n is None) == (recipe.select.percentile is None):
        raise InputError(where, "select.top_n", "set exactly one of select.top_n and select.percentile")
    check_device(recipe.runtime.device, where, "runtime.device")
    if recipe.sae.path and not Path(recipe.sae.path).exists():
        raise InputError(where, "sae.path", f"{recipe.sae.path} does not exist")
    return recipe


def recipe_help(cls: type = Recipe, prefix: str = "") -> list[str]:
    """One line per field: dotted name, default and help - the recipe reference."""
    lines = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        name = f"{prefix}{f.name}"
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"{name}: {f.metadata.get('help', '')}")
            lines.extend(recipe_help(tp, f"{name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        bounds = ", ".join(f"{k} {f.metadata[k]}" for k in ("min", "above", "max") if k in f.metadata)
        bounds = f"; {bounds}" if bounds else ""
        lines.append(f"{name} (default {default!r}{bounds}): {f.metadata.get('help', '')}")
        if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            lines.extend(recipe_help(typing.get_args(tp)[0], f"{name}[]."))
    return lines
