"""The YAML recipe: dataclasses that validate strictly and double as documentation.

Every field has a docstring-style ``help`` so ``sauce-export recipe-help`` and the README's recipe
reference are generated from the same source. Unknown keys, wrong types and missing required
fields are InputErrors naming the file and the dotted field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sauce_export.data import Concept
from sauce_export.errors import InputError
from sauce_export.fold import FoldConfig
from sauce_export.sae.train import TrainConfig
from sauce_export.verify import VerifyGates


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class DataSection:
    train: str = _f("data/world/train.jsonl", "JSONL rows for SAE training, concept sets and calibration.")
    eval: str = _f("data/world/eval.jsonl", "JSONL rows for evaluation (held-out views and paraphrases).")
    build_world: bool = _f(False, "Build the fictitious world first if the data files are missing.")
    world_seed: int = _f(0, "Seed of the fictitious world when build_world is set.")


@dataclass
class CollectSection:
    max_rows: int = _f(3000, "Rows of `data.train` (a seeded sample) whose activations train the SAE.")
    batch_size: int = _f(64, "Rows per forward pass.")
    scope: Literal["all", "image", "text"] = _f("all", "Tokens whose activations are stored.")
    shard_tokens: int = _f(65536, "Tokens per safetensors shard (bounds memory).")
    seed: int = _f(0, "Seed of the row sample.")


@dataclass
class SaeSection(TrainConfig):
    """Load an SAE (``path``) or train one with the TrainConfig fields."""

    path: str | None = _f(
        None, "Load this SAE (ours, SAELens or sparsify directory) instead of training one."
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
    top_n: int | None = _f(8, "Keep the n best-scoring features per concept.")
    percentile: float | None = _f(
        None, "Or keep features scoring at or above this percentile (set top_n: null)."
    )
    tokens: Literal["prompt", "all"] = _f("prompt", "Score on prompt tokens only (answers excluded) or all.")


@dataclass
class EditSection:
    clamp: float = _f(0.0, "Target value c of the selected latents (0 or negative).")
    multiplier: float | None = _f(None, "If set, f -> multiplier * f instead of the value clamp.")
    only_where_active: bool = _f(
        True, "Edit a latent only where it fires (keeps other tokens bit-identical)."
    )
    scope: Literal["all", "image", "text"] = _f("all", "Which tokens may be edited.")


@dataclass
class EvalSection:
    batch_size: int = _f(128, "Rows per forward pass.")
    forget_split: str = _f("heldout_view", "Split whose target-concept questions measure forgetting.")
    generality_split: str = _f("heldout_paraphrase", "Split with held-out paraphrases (generality).")
    fidelity_rows: int = _f(
        128, "Forget and retain prompts per concept for KL / agreement vs the hooked edit."
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
    top_n: int | None = _f(None, "This concept's number of features (default: select.top_n / percentile).")
    clamp: float | None = _f(
        None,
        "Target value of this concept's features (default: edit.clamp). A concept whose latents are "
        "re-derived downstream may need a negative target.",
    )

    def concept(self) -> Concept:
        return Concept(self.kind, self.name)

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
    fold: FoldConfig = field(
        default_factory=FoldConfig, metadata={"help": "How the edit is folded into weights."}
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
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
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
    kwargs = {
        name: _convert(hints[name], raw[name], where, f"{prefix}.{name}" if prefix else name)
        for name in fields
        if name in raw
    }
    return cls(**kwargs)


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
        if c.top_n is not None and c.top_n < 1:
            raise InputError(where, f"concepts[{i}].top_n", f"must be at least 1, got {c.top_n}")
        if c.clamp is not None and c.clamp > 0:
            raise InputError(where, f"concepts[{i}].clamp", f"must be 0 or negative, got {c.clamp}")
    if (recipe.select.top_n is None) == (recipe.select.percentile is None):
        raise InputError(where, "select.top_n", "set exactly one of select.top_n and select.percentile")
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
        lines.append(f"{name} (default {default!r}): {f.metadata.get('help', '')}")
        if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            lines.extend(recipe_help(typing.get_args(tp)[0], f"{name}[]."))
    return lines
