"""Bake a ``Patch`` into a checkpoint on disk, or write it as a PEFT LoRA adapter.

The checkpoint writer streams: it never loads the model. Weight files the patch does not touch, and
every non-weight file, are copied byte for byte by the kernel (``copy_file_range``) while a second
thread hashes the same bytes from the source; a touched safetensors file is rewritten with the
source's byte layout (same header entries in the same order, only the touched tensors' bytes
replaced; offsets move only after a grown tensor), so memory stays near one tensor and time near a
file copy. A patch that grows weights also rewrites ``config.json`` (its ``config_updates``) and the
shard index's ``total_size``; before anything is written, the model built from the updated config
must have exactly the grown shapes. Everything is written into a temporary directory that replaces
``out`` only after ``check_export`` has compared every tensor's name, shape and dtype with the source.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import struct
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PretrainedConfig

from sauce_export.architectures import disk_key_in
from sauce_export.errors import InputError, unpickling_problem
from sauce_export.fsutil import atomic_dir
from sauce_export.hf_config import read_config
from sauce_export.patch import Growth, Patch, WeightDelta
from sauce_export.progress import Counter, bar

Change = tuple[WeightDelta | Growth, str]  # (what, "weight" | "bias" | "grow")

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
_SHARD = re.compile(r"^(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)$")
_FLOAT_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
_CHUNK = 16 << 20  # hashing a file already written (pickle rewrites, adapters)
_HASH_CHUNK = 1 << 20  # the hash thread's buffer: small enough to stay in L2 between read and hash
_COPY_CHUNK = 256 << 20  # bytes per kernel copy call (progress granularity)
_READ_CHUNK = 8 << 20  # the user-space fallback copy
# copy_file_range / sendfile errors that mean "not here" (another file system, kernel or OS): fall back.
_NO_KERNEL_COPY = {
    errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOTSOCK, errno.EBADF,
    errno.EPERM,
}  # fmt: skip
_SKIP_DIRS = {".git"}  # a git clone's LFS objects are a second, unpatched copy of the weights


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


# --------------------------------------------------------------------------- reading a checkpoint


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


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
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
        for key, t in _torch_load(directory / name).items():
            layout.tensors[key] = TensorSpec(name, tuple(t.shape), str(t.dtype).removeprefix("torch."))
    return layout


# --------------------------------------------------------------------------- planning the edit


def _check_factors(delta: WeightDelta) -> None:
    for name, t in (("B", delta.B), ("A", delta.A), ("bias", delta.bias)):
        if t is not None and not torch.isfinite(t).all():
            raise InputError("patch", f"{delta.module}.{name}", "contains NaN or Inf")
    if delta.B.dim() != 2 or delta.A.dim() != 2 or delta.B.shape[1] != delta.A.shape[0]:
        shapes = f"B {list(delta.B.shape)}, A {list(delta.A.shape)}"
        raise InputError("patch", delta.module, f"factors do not multiply ({shapes})")


def _itemsize(dtype: str) -> int:
    """Bytes per element of a safetensors ("BF16") or torch ("bfloat16") dtype name."""
    found = _FLOAT_DTYPES.get(dtype) or getattr(torch, dtype)
    return found.itemsize


def _check_float(spec: TensorSpec, where: str, key: str) -> None:
    """Quantized or integer tensors cannot take a float delta without changing their format."""
    dtype = _FLOAT_DTYPES.get(spec.dtype) or getattr(torch, spec.dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(where, key, f"cannot patch a {spec.dtype} tensor (floating point only)")


def plan_edits(source: Path, layout: Layout, config: PretrainedConfig, patch: Patch) -> dict[str, Change]:
    """On-disk key -> (change, "weight" | "bias" | "grow") for every tensor the patch changes, validated."""
    where = str(source)
    edits: dict[str, Change] = {}
    for delta in patch.deltas:
        _check_factors(delta)
        prefix = disk_key_in(layout.tensors.keys(), config, delta.module, where)  # type: ignore[arg-type]
        parts = [("weight", list(delta.shape))]
        if delta.bias is not None:
            parts.append(("bias", list(delta.bias.shape)))
        for part, want in parts:
            key = f"{prefix}.{part}"
            spec = layout.tensors.get(key)
            if spec is None:
                raise InputError(where, key, f"not in the checkpoint (patch module {delta.module})")
            if list(spec.shape) != want:
                raise InputError(where, key, f"shape {list(spec.shape)} != patch shape {want}")
            _check_float(spec, where, key)
            edits[key] = (delta, part)
    for grow in patch.grows:
        if not torch.isfinite(grow.extra).all():
            raise InputError("patch", f"{grow.module}.extra", "contains NaN or Inf")
        if grow.dim not in (0, 1) or grow.extra.dim() != 2:
            raise InputError(
                "patch", grow.module, f"cannot append a {grow.extra.dim()}-d block along dim {grow.dim}"
            )
        key = disk_key_in(layout.tensors.keys(), config, grow.module, where) + ".weight"  # type: ignore[arg-type]
        spec = layout.tensors.get(key)
        if spec is None:
            raise InputError(where, key, f"not in the checkpoint (patch module {grow.module})")
        if len(spec.shape) != 2 or spec.shape[1 - grow.dim] != grow.extra.shape[1 - grow.dim]:
            raise InputError(
                where, key, f"cannot append {list(grow.extra.shape)} to shape {list(spec.shape)}"
            )
        _check_float(spec, where, key)
        edits[key] = (grow, "grow")
    return edits


def new_shapes(layout: Layout, edits: dict[str, Change]) -> dict[str, tuple[int, ...]]:
    """Tensors whose shape the patch changes (grown weights), with their new shape."""
    return {
        key: change.grown_shape(layout.tensors[key].shape)  # type: ignore[arg-type]
        for key, (change, part) in edits.items()
        if isinstance(change, Growth)
    }


def _patched(tensor: torch.Tensor, change: WeightDelta | Growth, part: str) -> torch.Tensor:
    """The new value in the source dtype; float32 math as in ``WeightDelta.apply_to``."""
    if isinstance(change, Growth):
        return change.grown(tensor)
    if part == "weight":
        return change.apply_to(tensor)
    assert change.bias is not None
    return (tensor.float() + change.bias.float()).to(tensor.dtype)


# --------------------------------------------------------------------------- writing


class _Writer:
    """One output file and the sha256 of everything written to it.

    Ranges of a source file are copied by the kernel (``copy_file_range``; ``sendfile`` or a plain
    read/write where that is unavailable) while the single hash thread reads the same range from
    the source (page-cached, in a buffer that fits L2) and hashes it, so the hash costs a second
    core rather than a second pass. In-memory bytes (headers, patched tensors) are written on this
    thread and hashed on the other. The hash thread runs jobs in submission order, which keeps the
    digest in file order.
    """

    def __init__(self, path: Path, pool: ThreadPoolExecutor, counter: Counter) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.pool, self.counter = path, pool, counter
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o666)
        self.sha = hashlib.sha256()
        self.bytes = 0
        self.jobs: list[Future[None]] = []
        self.held: Future[None] | None = None  # the hash of the last in-memory block
        self.buffer = bytearray(_HASH_CHUNK)  # the hash thread's
        self.mode = "copy_file_range" if hasattr(os, "copy_file_range") else "sendfile"

    def _out(self, data: memoryview) -> None:
        while data:
            n = os.write(self.fd, data)
            data = data[n:]

    def write(self, data: bytes | memoryview) -> None:
        """Write ``data``, hashed on the other thread: it must stay unchanged until the next ``write``
        or ``close`` (which wait for its hash, so at most one block is held beyond the caller's)."""
        view = memoryview(data).cast("B")
        if self.held is not None:
            self.held.result()
        self.held = self.pool.submit(self.sha.update, view)
        self.jobs.append(self.held)
        self._out(view)
        self.bytes += len(view)
        self.counter.update(len(view))

    def copy_from(self, src: Path, offset: int, length: int) -> None:
        """Append ``length`` bytes of ``src`` from ``offset``, copied by the kernel, never decoded."""
        if length <= 0:
            return
        self.jobs.append(self.pool.submit(_hash_range, self.sha, src, offset, length, self.buffer))
        with open(src, "rb", buffering=0) as f:
            while length > 0:
                n = self._copy(f.fileno(), offset, min(length, _COPY_CHUNK), src)
                offset, length = offset + n, length - n
                self.bytes += n
                self.counter.update(n)

    def _copy(self, src: int, offset: int, count: int, name: Path) -> int:
        """Copy up to ``count`` bytes of ``src`` at ``offset`` to the end of the output; bytes copied."""
        if self.mode in ("copy_file_range", "sendfile"):
            try:
                if self.mode == "copy_file_range":
                    n = os.copy_file_range(src, self.fd, count, offset)
                else:
                    n = os.sendfile(self.fd, src, offset, count)
            except OSError as err:
                if err.errno not in _NO_KERNEL_COPY:
                    raise
                self.mode = (
                    "sendfile" if self.mode == "copy_file_range" and hasattr(os, "sendfile") else "read"
                )
                return self._copy(src, offset, count, name)
            if n:
                return n
            self.mode = "read"  # 0 before the end: the source is short (reported below) or the file
            # system copies nothing this way (some virtual file systems); read it the plain way
        os.lseek(src, offset, os.SEEK_SET)
        data = os.read(src, min(count, _READ_CHUNK))
        if not data:
            raise InputError(str(name), "data", "file is truncated")
        self._out(memoryview(data))
        return len(data)

    def close(self) -> dict[str, Any]:
        try:
            for job in self.jobs:  # all of them, even after an error, before the buffers go
                job.exception()
            for job in self.jobs:
                job.result()
        finally:
            os.close(self.fd)
        return {"bytes": self.bytes, "sha256": self.sha.hexdigest()}


def _hash_range(sha: Any, src: Path, offset: int, length: int, buffer: bytearray) -> None:
    """On the hash thread: ``sha.update`` with ``length`` bytes of ``src`` from ``offset``."""
    view = memoryview(buffer)
    with open(src, "rb", buffering=0) as f:
        f.seek(offset)
        while length > 0:
            n = f.readinto(view[: min(length, len(view))])
            if not n:
                raise InputError(str(src), "data", "file is truncated")
            sha.update(view[:n])
            length -= n


def _rewrite_safetensors(
    src_path: Path,
    writer: _Writer,
    edits: dict[str, Change],
    metadata: dict[str, str],
    shapes: dict[str, tuple[int, ...]],
) -> None:
    """The source's header entries in the source's order plus provenance metadata; edited bytes swapped
    in. Offsets move only after a tensor whose size changed (a grown weight)."""
    data_start, header = read_safetensors_header(src_path)
    touched = sorted((header[k]["data_offsets"], k) for k in edits if k in header)
    entries = {k: dict(v) for k, v in header.items() if k != "__metadata__"}
    shift = 0
    for key, info in sorted(entries.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        start, end = info["data_offsets"]
        length = end - start
        if key in shapes:
            info["shape"] = list(shapes[key])
            length = math.prod(shapes[key]) * _itemsize(info["dtype"])
        info["data_offsets"] = [start + shift, start + shift + length]
        shift += length - (end - start)
    new_header = {"__metadata__": {**header.get("__metadata__", {}), **metadata}, **entries}
    writer.write(memoryview(safetensors_header_bytes(new_header)))

    data_len = src_path.stat().st_size - data_start
    pos = 0
    with safe_open(str(src_path), "pt") as st:
        for (start, end), key in touched:
            writer.copy_from(src_path, data_start + pos, start - pos)
            new = _patched(st.get_tensor(key), *edits[key])
            raw = new.contiguous().reshape(-1).view(torch.uint8).numpy()
            want = entries[key]["data_offsets"][1] - entries[key]["data_offsets"][0]
            if raw.nbytes != want:
                raise ExportCheckError(f"{src_path}: {key}: {raw.nbytes} bytes != {want} in header")
            writer.write(memoryview(raw))
            pos = end
        writer.copy_from(src_path, data_start + pos, data_len - pos)


def _updated_json(path: Path, updates: dict[str, Any]) -> bytes:
    """``path``'s JSON with dotted keys set, in transformers' own layout (indent 2, sorted keys).

    A missing parent object is created (a config.json may omit a sub-config left at its defaults).
    """
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(str(path), "json", f"unreadable ({err})") from None
    for dotted, value in updates.items():
        *parents, key = dotted.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError(str(path), dotted, f"{part} is not an object")
        node[key] = value
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def _rewrite_pickle(
    src_path: Path, dst_path: Path, edits: dict[str, Change], counter: Counter
) -> dict[str, Any]:
    state = _torch_load(src_path)
    with torch.no_grad():
        for key in edits.keys() & state.keys():
            state[key] = _patched(state[key], *edits[key])
    torch.save(state, dst_path)
    record = _file_record(dst_path)
    counter.update(record["bytes"])
    return record


def _rewritten_json(
    source: Path, layout: Layout, config: PretrainedConfig, patch: Patch, shapes: dict[str, tuple[int, ...]]
) -> dict[str, bytes]:
    """config.json with the patch's config updates and the shard index with the new ``total_size``,
    both only where the patch needs them (every other non-weight file stays byte-identical).

    Validated before anything is written: every updated key exists in the source config, and the
    model that the updated config builds has exactly the source's parameter shapes except the grown
    weights, which have their grown shape (so the export loads with stock classes).
    """
    out: dict[str, bytes] = {}
    if patch.config_updates or patch.grows:
        where = str(source / "config.json")
        for dotted, value in patch.config_updates.items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise InputError("patch", f"config_updates.{dotted}", f"{value!r} is not an integer")
            node: Any = config
            for part in dotted.split("."):
                if not hasattr(node, part):
                    raise InputError(where, dotted, "no such key in the model's config")
                node = getattr(node, part)
        updated = _updated_json(source / "config.json", patch.config_updates)
        _check_growth(
            where, config, json.loads((source / "config.json").read_text()), json.loads(updated), patch
        )
        if patch.config_updates:
            out["config.json"] = updated
    index = SAFETENSORS_INDEX if layout.kind == "safetensors" else PICKLE_INDEX
    if shapes and (source / index).is_file():
        meta = json.loads((source / index).read_text()).get("metadata", {})
        if "total_size" in meta:
            grown = sum(
                (math.prod(shape) - math.prod(layout.tensors[k].shape)) * _itemsize(layout.tensors[k].dtype)
                for k, shape in shapes.items()
            )
            out[index] = _updated_json(source / index, {"metadata.total_size": meta["total_size"] + grown})
    return out


def _meta_model_for(config: PretrainedConfig) -> torch.nn.Module:
    """The class ``lm.load_model`` would load for ``config`` (whose module names a patch uses), on meta."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    cls = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    with torch.device("meta"):
        return cls.from_config(config)


def _param_shapes(config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    try:
        model = _meta_model_for(config)
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise InputError("config", "model", f"cannot build the model from the config ({err})") from None
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _check_growth(
    where: str,
    config: PretrainedConfig,
    source_json: dict[str, Any],
    updated_json: dict[str, Any],
    patch: Patch,
) -> None:
    """InputError unless the model built from ``updated_json`` (config.json after the patch's updates)
    has each grown weight's new shape and every other parameter the shape it has in ``source_json``'s."""
    original = type(config).from_dict(source_json)
    try:
        after_config = type(config).from_dict(updated_json)
    except Exception as err:  # transformers' own validators raise several kinds
        raise InputError(where, "config_updates", f"the updated config does not load ({err})") from None
    for dotted, value in patch.config_updates.items():
        node: Any = after_config
        for part in dotted.split("."):
            node = getattr(node, part, None)
        if node != value:
            raise InputError(where, dotted, f"set to {value!r}, but the rewritten config reads back {node!r}")
    before, after = _param_shapes(original), _param_shapes(after_config)
    grown = {f"{g.module}.weight": g for g in patch.grows}
    updates = ", ".join(f"{k}={v}" for k, v in patch.config_updates.items()) or "no config updates"
    for name, g in grown.items():
        if name not in before or name not in after:
            raise InputError("patch", g.module, "the model built from config.json has no such Linear")
        want = g.grown_shape(before[name])
        if after[name] != want:
            raise InputError(
                "patch",
                g.module,
                f"grows to {list(want)}, but config.json with {updates} builds {list(after[name])}",
            )
    for name in sorted(before.keys() | after.keys()):
        if name not in grown and before.get(name) != after.get(name):
            old, new = before.get(name), after.get(name)
            raise InputError(
                "patch", name, f"{updates} changes it ({old} -> {new}) but the patch does not grow it"
            )


def _source_files(source: Path) -> list[str]:
    """Every file under ``source`` (symlinks followed, as in a Hub cache snapshot), relative, sorted."""
    found = []
    for root, dirs, files in os.walk(source, followlinks=True):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        rel = Path(root).relative_to(source)
        found += [(rel / f).as_posix() for f in files]
    return sorted(found)


def _check_paths(source: Path, out: Path, overwrite: bool) -> tuple[Path, Path]:
    source, out = Path(source), Path(out)
    src, dst = source.resolve(), out.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise InputError(str(out), "output", f"must not be, contain or lie inside the source {source}")
    if out.exists() and not overwrite:
        raise InputError(str(out), "output", "already exists (pass --overwrite to replace it)")
    return source, out


def _load_config(source: Path) -> PretrainedConfig:
    return read_config(source, str(source))


def export_checkpoint(
    source: Path,
    patch: Patch,
    out: Path,
    *,
    overwrite: bool = False,
    allow_pickle: bool = False,
    metadata: dict[str, str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``source`` with ``patch`` baked in to ``out``, streaming (see the module docstring).

    ``metadata`` is added to the ``__metadata__`` of every rewritten safetensors file (provenance).
    Pickle weights that safetensors shadow are ``skipped``: copying them would ship the unpatched model.
    Returns ``path``, ``files`` (name, bytes, sha256 of every file written), ``touched`` (disk keys),
    ``skipped`` and ``seconds``.
    """
    started = time.perf_counter()
    source, out = _check_paths(source, out, overwrite)
    metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
    config = _load_config(source)
    layout = read_layout(source, allow_pickle)
    edits = plan_edits(source, layout, config, patch)
    shapes = new_shapes(layout, edits)
    touched_files = {layout.tensors[k].file for k in edits}
    rewritten_json = _rewritten_json(source, layout, config, patch, shapes)
    names = [n for n in _source_files(source) if n not in layout.stale]
    total = sum((source / n).stat().st_size for n in names)

    records: list[dict[str, Any]] = []
    with (
        atomic_dir(out, overwrite) as tmp,
        ThreadPoolExecutor(1) as pool,
        bar(total, f"export {out.name}", progress, unit="B") as counter,
    ):
        for name in names:
            src, dst = source / name, tmp / name
            if name in touched_files and layout.kind == "pickle":
                records.append({"name": name, **_rewrite_pickle(src, dst, edits, counter)})
                continue
            writer = _Writer(dst, pool, counter)
            try:
                if name in rewritten_json:
                    writer.write(memoryview(rewritten_json[name]))
                elif name in touched_files:
                    _rewrite_safetensors(src, writer, edits, metadata, shapes)
                else:
                    writer.copy_from(src, 0, src.stat().st_size)
            finally:
                records.append({"name": name, **writer.close()})
        check_export(source, tmp, allow_pickle=allow_pickle, changed=shapes)
    return {
        "path": str(out),
        "files": records,
        "touched": sorted(edits),
        "skipped": layout.stale,
        "seconds": round(time.perf_counter() - started, 3),
    }


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


# --------------------------------------------------------------------------- PEFT adapter


def _meta_model(base_model: str) -> torch.nn.Module:
    """The base model's task class built on the meta device: module types and shapes, no weights."""
    import transformers

    config = read_config(base_model, base_model)
    archs = [getattr(transformers, a, None) for a in (config.architectures or [])]
    cls = next((a for a in archs if a is not None), transformers.AutoModelForCausalLM)
    with torch.device("meta"):
        return cls._from_config(config) if hasattr(cls, "_from_config") else cls.from_config(config)


def _check_lora_delta(model: torch.nn.Module, delta: WeightDelta, base_model: str, max_rank: int) -> None:
    """What vLLM serves: a weight-only change of an ``nn.Linear`` with rank <= max_rank."""
    _check_factors(delta)
    if delta.bias is not None:
        raise InputError("patch", f"{delta.module}.bias", "a LoRA adapter cannot carry a bias change")
    try:
        module = model.get_submodule(delta.module)
    except AttributeError:
        raise InputError(base_model, delta.module, "the base model has no such module") from None
    if not isinstance(module, torch.nn.Linear):
        kind = type(module).__name__
        raise InputError("patch", delta.module, f"is {kind}, not Linear; vLLM serves LoRA on Linear only")
    if tuple(module.weight.shape) != delta.shape:
        got, want = list(module.weight.shape), list(delta.shape)
        raise InputError(base_model, delta.module, f"weight shape {got} != patch shape {want}")
    if not 1 <= delta.rank <= max_rank:
        raise InputError("patch", delta.module, f"rank {delta.rank} is not in 1..{max_rank}")


def write_peft_adapter(
    patch: Patch, base_model: str, out: Path, *, overwrite: bool = False, max_rank: int = 16
) -> dict[str, Any]:
    """A LoRA adapter (``lora_B @ lora_A`` = the patch, scaling 1) within what vLLM serves.

    Key names and config fields are those ``get_peft_model(...).save_pretrained`` writes (peft 0.21):
    ``base_model.model.{module}.lora_{A,B}.weight`` and a ``LoraConfig`` with full module names.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(str(out), "output", "already exists (pass --overwrite to replace it)")
    if patch.grows:
        raise InputError(
            "patch",
            "grows",
            f"a {patch.description.get('method', 'gated')} fold adds neurons; a LoRA adapter "
            "can only carry low-rank changes of existing weights (use fold.method: lora for --format peft)",
        )
    if not patch.deltas:
        raise InputError("patch", "modules", "the patch is empty")
    model = _meta_model(base_model)
    for delta in patch.deltas:
        _check_lora_delta(model, delta, base_model, max_rank)
    auto_mapping = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}

    from peft import LoraConfig

    r = max(d.rank for d in patch.deltas)
    other = {d.module: d.rank for d in patch.deltas if d.rank != r}
    config = LoraConfig(
        r=r,
        lora_alpha=r,  # scaling = alpha / r = 1, and per module through alpha_pattern
        target_modules=patch.modules,
        rank_pattern=other,
        alpha_pattern=dict(other),
        lora_dropout=0.0,
        bias="none",
        base_model_name_or_path=base_model,
        inference_mode=True,
    )
    tensors: dict[str, torch.Tensor] = {}
    for d in patch.deltas:
        tensors[f"base_model.model.{d.module}.lora_A.weight"] = d.A.contiguous()
        tensors[f"base_model.model.{d.module}.lora_B.weight"] = d.B.contiguous()
    with atomic_dir(out, overwrite) as tmp:
        # What config.save_pretrained writes, but with its sets (target_modules) sorted: peft dumps
        # them in hash order, which differs between runs (PYTHONHASHSEED).
        fields = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
        (tmp / "adapter_config.json").write_text(
            json.dumps({**fields, "auto_mapping": auto_mapping}, indent=2, sort_keys=True)
        )
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        files = [{"name": p.name, **_file_record(p)} for p in sorted(tmp.iterdir())]
    ranks = {d.module: d.rank for d in patch.deltas}
    return {"path": str(out), "files": files, "ranks": ranks}


def _file_record(path: Path) -> dict[str, Any]:
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": sha.hexdigest()}


__all__ = [
    "ExportCheckError",
    "check_export",
    "export_checkpoint",
    "read_layout",
    "safetensors_header_bytes",
    "write_peft_adapter",
]
