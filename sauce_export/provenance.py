"""`sauce-export inspect DIR`: the provenance a checkpoint carries, read back without loading it.

A checkpoint travels without its run directory, so what made it lives in two places inside it: the
``sauce_export*`` entries that ``export`` writes into every rewritten safetensors header's
``__metadata__``, and the model card's YAML header. Reading only headers keeps this instant even for
a 70B checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from sauce_export.errors import InputError
from sauce_export.patch import Patch


def export_metadata(patch: Patch, patch_file: Path, recipe: str | None = None) -> dict[str, str]:
    """The one ``sauce_export`` header entry both `run` and `export` write: enough to trace a shard
    back to the patch (sha256), the modules it rewrote, the fold and, from a run, the recipe."""
    from sauce_export import __version__

    entry: dict[str, Any] = {
        "version": __version__,
        "patch_sha256": hashlib.sha256(Path(patch_file).read_bytes()).hexdigest(),
        "modules": patch.modules,
        "fold": patch.description,
    }
    if recipe is not None:
        entry["recipe"] = recipe
    return {"sauce_export": json.dumps(entry)}


def _decoded(value: str) -> Any:
    """Metadata values are strings; ours hold JSON, which is shown as structure."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def read_provenance(directory: Path) -> dict[str, Any]:
    """``{path, safetensors: {file: entries | None}, card: metadata | None}``; InputError if none."""
    from huggingface_hub import ModelCard

    from sauce_export.layout import read_safetensors_header

    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(str(directory), "directory", "not found (give an exported checkpoint directory)")
    weights: dict[str, Any] = {}
    for path in sorted(directory.rglob("*.safetensors")):
        meta = read_safetensors_header(path)[1].get("__metadata__") or {}
        entries = {k: _decoded(v) for k, v in meta.items() if k.startswith("sauce_export")}
        weights[path.relative_to(directory).as_posix()] = entries or None
    card = None
    if (directory / "README.md").is_file():
        try:
            card = ModelCard.load(directory / "README.md").data.to_dict()
        except ValueError as err:
            raise InputError(
                str(directory / "README.md"), "metadata", f"unreadable YAML header ({err})"
            ) from None
    if not any(weights.values()) and not (card and "sauce_export" in card):
        raise InputError(
            str(directory),
            "provenance",
            "no sauce-export provenance: no safetensors header has a sauce_export entry and there is no "
            "README.md with sauce_export metadata",
        )
    return {"path": str(directory), "safetensors": weights, "card": card}


def format_provenance(info: dict[str, Any]) -> str:
    lines = [f"checkpoint: {info['path']}"]
    for name, entries in info["safetensors"].items():
        if entries is None:
            lines.append(f"\n{name}: no sauce-export entry (copied unchanged from the source)")
        else:
            lines.append(f"\n{name} __metadata__:\n{json.dumps(entries, indent=1)}")
    if info["card"] is None:
        lines.append("\nREADME.md: none")
    else:
        lines.append("\nREADME.md metadata:\n" + yaml.safe_dump(info["card"], sort_keys=False).rstrip())
    return "\n".join(lines)
