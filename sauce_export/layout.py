"""What a checkpoint directory holds, read without loading the model: its weight files (safetensors
first, pickle only when allowed, as transformers chooses), each tensor's name, shape and dtype from
the safetensors headers, and ``check_export``, which compares two such layouts after an export.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sauce_export.errors import InputError, unpickling_problem

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
_SHARD = re.compile(r"^(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)$")
FLOAT_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
_CHUNK = 16 << 20  # hashing a file already written (pickle rewrites, adapters)


class ExportCheckError(RuntimeError):
    """An exported checkpoint's tensors differ from the source's in name, shape, dtype or file."""


@dataclass(frozen=True)
class TensorSpec:
    file: str
    shape: tuple[int, ...]
    dtype: str


@dataclass
class Layout:
    """The weight files of a checkpoint directory and the tensors each holds."""

    kind: str  # "safetensors" or "pickle"
    files: list[str]
    tensors: dict[str, TensorSpec] = field(default_factory=dict)
    stale: list[str] = field(default_factory=list)  # pickle weights shadowed by safetensors: not exported


def read_safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """``(data_start, header)`` of a safetensors file, read without touching its data."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if n < 2 or 8 + n > size:
            raise InputError(str(path), "header", "not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(str(path), "header", f"not a safetensors file ({err})") from None
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        raise InputError(str(path), "header", "not a safetensors file (malformed tensor entries)") from None
    if 8 + n + end > size:
        raise InputError(str(path), "data", f"file is truncated ({size} bytes, its header needs more)")
    return 8 + n, header


def safetensors_header_bytes(header: dict[str, Any]) -> bytes:
    """Length prefix + JSON header, space-padded so the data starts 8-byte aligned (as safetensors does)."""
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


def torch_load(path: Path) -> dict[str, torch.Tensor]:
    """A pickle state dict, loaded with ``weights_only=True`` (memory-mapped where the format allows)."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (pre-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        problem = unpickling_problem(err)
        raise InputError(
            str(path), "weights", f"cannot be loaded with weights_only=True ({problem})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(str(path), "weights", "is not a state dict of tensors")
    return state


def _index_files(directory: Path, index_name: str) -> list[str]:
    try:
        weight_map = json.loads((directory / index_name).read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(str(directory / index_name), "weight_map", f"unreadable index ({err})") from None
    files = sorted(set(weight_map.values()))
    for name in files:
        if not (directory / name).is_file():
            raise InputError(str(directory / name), "shard", f"named by {index_name} but missing")
    return files


def read_layout(directory: Path, allow_pickle: bool = False) -> Layout:
    """Find the weight files the way transformers does: safetensors first, pickle only if allowed."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(str(directory), "model", "is not a directory")
    names = sorted(p.name for p in directory.iterdir() if p.is_file())
    pickles = [n for n in names if re.fullmatch(r"pytorch_model.*\.bin", n)]
    pt_files = [n for n in names if n.endswith(".pt")]
    sharded_st = [n for n in names if _SHARD.match(n) and n.endswith(".safetensors")]
    sharded_pt = [n for n in names if _SHARD.match(n) and n.endswith(".bin")]
    if SAFETENSORS in names:
        files = [SAFETENSORS]
    elif SAFETENSORS_INDEX in names:
        files = _index_files(directory, SAFETENSORS_INDEX)
    elif sharded_st:
        raise InputError(str(directory), SAFETENSORS_INDEX, f"missing, but shards {sharded_st} are here")
    elif not pickles + pt_files:
        raise InputError(str(directory), "weights", "no model.safetensors, index or pickle weights here")
    elif not allow_pickle:
        found = pickles + pt_files
        raise InputError(
            str(directory), "weights", f"only pickle weights {found}; pass --allow-pickle to load them"
        )
    elif PICKLE_INDEX in names:
        files = _index_files(directory, PICKLE_INDEX)
    elif PICKLE in names:
        files = [PICKLE]
    elif sharded_pt:
        raise InputError(str(directory), PICKLE_INDEX, f"missing, but shards {sharded_pt} are here")
    elif pickles:
        files = pickles
    else:
        files = pt_files

    if files[0].endswith(".safetensors"):
        layout = Layout("safetensors", files, stale=pickles)
        for name in files:
            _, header = read_safetensors_header(directory / name)
            for key, info in header.items():
                if key != "__metadata__":
                    layout.tensors[key] = TensorSpec(name, tuple(info["shape"]), info["dtype"])
        return layout
    layout = Layout("pickle", files)
    for name in files:
        for key, t in torch_load(directory / name).items():
            layout.tensors[key] = TensorSpec(name, tuple(t.shape), str(t.dtype).removeprefix("torch."))
    return layout


def check_export(
    source: Path, out: Path, *, allow_pickle: bool = True, changed: dict[str, tuple[int, ...]] | None = None
) -> None:
    """Raise ``ExportCheckError`` unless ``out`` holds the same tensors (name, shape, dtype, file) as
    ``source``, except the new shapes ``changed`` that the patch is meant to give (grown weights)."""
    want = read_layout(Path(source), allow_pickle).tensors
    for key, shape in (changed or {}).items():
        if key not in want:
            raise ExportCheckError(f"{source}: {key} is to change shape but is not in the source")
        want[key] = TensorSpec(want[key].file, tuple(shape), want[key].dtype)
    try:
        got = read_layout(Path(out), allow_pickle).tensors
    except (InputError, OSError, ValueError, KeyError) as err:
        raise ExportCheckError(f"{out}: cannot read the exported weights: {err}") from None
    problems = [f"dropped {k}" for k in want.keys() - got.keys()]
    problems += [f"added {k}" for k in got.keys() - want.keys()]
    problems += [f"{k}: {want[k]} -> {got[k]}" for k in want.keys() & got.keys() if want[k] != got[k]]
    if problems:
        shown = "; ".join(sorted(problems)[:8]) + ("; ..." if len(problems) > 8 else "")
        raise ExportCheckError(f"{out} does not match {source}: {len(problems)} problem(s): {shown}")


def file_record(path: Path) -> dict[str, Any]:
    """``bytes`` and ``sha256`` of a file already written."""
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": sha.hexdigest()}
