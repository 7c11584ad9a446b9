"""Bake a ``Patch`` into a checkpoint on disk (``peft_adapter`` writes it as a LoRA adapter instead).

The writer streams: it never loads the model. Weight files the patch does not touch, and
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
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import PretrainedConfig

from sauce_export.architectures import disk_key_in
from sauce_export.errors import InputError
from sauce_export.fsutil import atomic_dir
from sauce_export.hf_config import read_config
from sauce_export.layout import (
    FLOAT_DTYPES,
    PICKLE_INDEX,
    SAFETENSORS_INDEX,
    ExportCheckError,
    Layout,
    TensorSpec,
    check_export,
    file_record,
    read_layout,
    read_safetensors_header,
    safetensors_header_bytes,
    torch_load,
)
from sauce_export.patch import Growth, Patch, WeightDelta
from sauce_export.progress import Counter, bar

Change = tuple[WeightDelta | Growth, str]  # (what, "weight" | "bias" | "grow")

_HASH_CHUNK = 1 << 20  # the hash thread's buffer: small enough to stay in L2 between read and hash
_COPY_CHUNK = 256 << 20  # bytes per kernel copy call (progress granularity)
_READ_CHUNK = 8 << 20  # the user-space fallback copy
# copy_file_range / sendfile errors that mean "not here" (another file system, kernel or OS): fall back.
_NO_KERNEL_COPY = {
    errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOTSOCK, errno.EBADF,
    errno.EPERM,
}  # fmt: skip
_SKIP_DIRS = {".git"}  # a git clone's LFS objects are a second, unpatched copy of the weights


# --------------------------------------------------------------------------- planning the edit


def check_factors(delta: WeightDelta) -> None:
    """A delta whose factors are finite and multiply (B: out x r, A: r x in); also used for adapters."""
    for name, t in (("B", delta.B), ("A", delta.A), ("bias", delta.bias)):
        if t is not None and not torch.isfinite(t).all():
            raise InputError("patch", f"{delta.module}.{name}", "contains NaN or Inf")
    if delta.B.dim() != 2 or delta.A.dim() != 2 or delta.B.shape[1] != delta.A.shape[0]:
        shapes = f"B {list(delta.B.shape)}, A {list(delta.A.shape)}"
        raise InputError("patch", delta.module, f"factors do not multiply ({shapes})")


def _itemsize(dtype: str) -> int:
    """Bytes per element of a safetensors ("BF16") or torch ("bfloat16") dtype name."""
    found = FLOAT_DTYPES.get(dtype) or getattr(torch, dtype)
    return found.itemsize


def _check_float(spec: TensorSpec, where: str, key: str) -> None:
    """Quantized or integer tensors cannot take a float delta without changing their format."""
    dtype = FLOAT_DTYPES.get(spec.dtype) or getattr(torch, spec.dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(where, key, f"cannot patch a {spec.dtype} tensor (floating point only)")


def plan_edits(source: Path, layout: Layout, config: PretrainedConfig, patch: Patch) -> dict[str, Change]:
    """On-disk key -> (change, "weight" | "bias" | "grow") for every tensor the patch changes, validated."""
    where = str(source)
    edits: dict[str, Change] = {}
    for delta in patch.deltas:
        check_factors(delta)
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
    state = torch_load(src_path)
    with torch.no_grad():
        for key in edits.keys() & state.keys():
            state[key] = _patched(state[key], *edits[key])
    torch.save(state, dst_path)
    record = file_record(dst_path)
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


__all__ = [
    "ExportCheckError",
    "check_export",
    "export_checkpoint",
    "read_layout",
    "read_safetensors_header",
    "safetensors_header_bytes",
]
