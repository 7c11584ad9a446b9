"""Read a checkpoint's configuration without ever running the checkpoint's own code.

transformers executes a model folder's Python files when ``config.json`` carries ``auto_map`` and
``trust_remote_code`` is left unset and standard input answers "y" to its prompt. Every load in
this package passes ``NO_REMOTE_CODE``, and ``read_config`` refuses a model that would need its
own code up front, with one line and without reading standard input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers import __version__ as transformers_version
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from sauce_export.errors import InputError, first_line

NO_REMOTE_CODE: dict[str, Any] = {"trust_remote_code": False}
"""Keyword arguments for every ``from_pretrained``: never prompt, never import a model's code."""


def code_files(directory: Path) -> list[str]:
    """Python files shipped in a model folder (the card says so when an export copies them)."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*.py") if p.is_file())


def _check_model_type(config_file: Path) -> None:
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(str(config_file), "config", f"not readable JSON ({err})") from None
    if not isinstance(raw, dict):
        raise InputError(str(config_file), "config", "must be a JSON object")
    model_type = raw.get("model_type")
    if model_type in CONFIG_MAPPING:
        return
    if raw.get("auto_map"):
        raise InputError(
            str(config_file),
            "auto_map",
            f"model_type {model_type!r} needs the model's own Python code; sauce-export never runs "
            "code from a model folder (convert it to a transformers architecture first)",
        )
    raise InputError(
        str(config_file),
        "model_type",
        f"{model_type!r} is not an architecture transformers {transformers_version} knows",
    )


def read_config(model: str | Path, where: str = "model") -> PretrainedConfig:
    """``AutoConfig`` of a local folder or cached Hub id, never executing the model's code.

    A local folder's ``config.json`` is checked first, so an unknown ``model_type`` (with or
    without ``auto_map``) is one ``InputError`` naming the file and field, not transformers'
    multi-line upgrade advice or its trust-remote-code prompt.
    """
    local = Path(model).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise InputError(str(local), "config.json", "missing: not a transformers model directory")
        _check_model_type(local / "config.json")
    try:
        return AutoConfig.from_pretrained(str(model), **NO_REMOTE_CODE)
    except (OSError, ValueError, KeyError) as err:
        raise InputError(
            where,
            "model",
            f"cannot load the config of {str(model)!r} (offline or missing files: {first_line(err)})",
        ) from None
