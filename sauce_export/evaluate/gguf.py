"""The GGUF quantization attack: the model as llama.cpp users get it.

``attacks.quantized`` rounds the weights in torch; llama.cpp's q8_0 / q4_0 / q4_K_M also pick a type
per tensor (the LM head and token embeddings differ from the rest, a tensor whose width does not fit
a type's block falls back to another) and, on CPU, quantize every matmul's activations to 8 bits.
So this attack takes the real path: llama.cpp's own converter (``convert.convert_gguf``, f32), its
quantizer (``llama_model_quantize`` of the llama-cpp-python build ``make compat`` makes), and its
runtime, which scores the same teacher-forced exact answers as ``metrics.correctness``.

A VLM's language model is what llama.cpp converts; its vision tower and projector stay in torch
(llama.cpp ships them apart, in their own precision, as ``attacks.quantized`` leaves them too): the
projected image features are fed to llama.cpp as embeddings at the image tokens' positions.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sauce_export.architectures import spec_for
from sauce_export.convert import ConversionError, convert_gguf, run_llama_script
from sauce_export.errors import InputError
from sauce_export.lm import Batch

GGUF_QUANTS = {
    "f32": "LLAMA_FTYPE_ALL_F32",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
}
"""``--gguf`` names -> llama.cpp file types; ``f32`` is no quantization (the path's own parity check)."""
DEFAULT_LLAMA_PYTHON = Path(".venv-llamacpp/bin/python")


def llama_python(option: str = "--gguf") -> str:
    """The python of the llama-cpp-python environment (``$SAUCE_LLAMA_PYTHON``, else
    ``.venv-llamacpp``, which ``make compat`` builds); an InputError naming the option if absent."""
    path = Path(os.environ.get("SAUCE_LLAMA_PYTHON", DEFAULT_LLAMA_PYTHON))
    done = (
        subprocess.run([str(path), "-c", "import llama_cpp"], capture_output=True) if path.is_file() else None
    )
    if done is None or done.returncode:
        raise InputError(
            "attack", option,
            f"llama-cpp-python not found at {path}: run `make compat` (builds .venv-llamacpp) or set SAUCE_LLAMA_PYTHON",
        )  # fmt: skip
    return str(path)


# Runs inside the llama.cpp environment (numpy + llama_cpp, no torch): JSON job on stdin.
_RUNNER = r"""
import ctypes, json, sys, numpy as np, llama_cpp
job = json.load(sys.stdin)
if job["quantize"]:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, job["ftype"])
    params.nthread = job["threads"]
    code = llama_cpp.llama_model_quantize(job["source"].encode(), job["gguf"].encode(), ctypes.byref(params))
    if code:
        sys.exit(f"llama_model_quantize returned {code}")
_defaults = llama_cpp.llama_model_default_params
def _params():  # AMX/repacked buffers crash q8_0 on some CPUs: plain CPU buffers only
    p = _defaults(); p.use_extra_bufts = False; return p
llama_cpp.llama_model_default_params = _params
llama_cpp.llama.llama_cpp.llama_model_default_params = _params
llm = llama_cpp.Llama(model_path=job["gguf"], n_ctx=job["n_ctx"], n_batch=job["n_ctx"], n_ubatch=job["n_ctx"],
                      n_threads=job["threads"], seed=0, verbose=False, type_k=0, type_v=0)
ctx, n_vocab = llm.ctx, llm.n_vocab()
n_embd = llama_cpp.llama_model_n_embd(llm.model)
features = np.load(job["features"]) if job["features"] else None
def decode(start, ids=None, embd=None):
    n = len(ids) if ids is not None else len(embd)
    batch = llama_cpp.llama_batch_init(n, 0 if ids is not None else n_embd, 1)
    batch.n_tokens = n
    for i in range(n):
        if ids is not None:
            batch.token[i] = ids[i]
        batch.pos[i] = start + i; batch.n_seq_id[i] = 1; batch.seq_id[i][0] = 0; batch.logits[i] = 1
    if embd is not None:
        flat = np.ascontiguousarray(embd, dtype=np.float32).ravel()
        ctypes.memmove(batch.embd, flat.ctypes.data, flat.nbytes)
    code = llama_cpp.llama_decode(ctx, batch)
    if code:
        sys.exit(f"llama_decode returned {code}")
    out = [np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).argmax() for i in range(n)]
    llama_cpp.llama_batch_free(batch)
    return out
ok = []
for row in job["rows"]:
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    pred, ids, image = [], row["ids"], row["image"]
    segments = [(0, len(ids))] if image is None else [(0, image[0]), (image[0], image[1]), (image[1], len(ids))]
    for a, b in segments:
        if a == b:
            continue
        if image is not None and (a, b) == tuple(image[:2]):
            pred += decode(a, embd=features[image[2] : image[2] + b - a])
        else:
            pred += decode(a, ids=ids[a:b])
    ok.append(all(int(pred[p]) == t for p, t in row["targets"]))
print(json.dumps({"ok": ok}))
"""


def _image_features(model: nn.Module, batch: Batch) -> torch.Tensor | None:
    """[B, T, d] the embeddings the text model receives (image features scattered in), or None for a
    text-only batch: what llama.cpp is fed at the image tokens."""
    if "pixel_values" not in batch.inputs:
        return None
    captured: list[torch.Tensor] = []

    def grab(_m: nn.Module, _args: Any, kwargs: dict[str, Any]) -> None:
        captured.append(kwargs["inputs_embeds"].detach().float())

    text = model.get_submodule(spec_for(model).text_model)
    handle = text.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch.inputs)
    finally:
        handle.remove()
    return captured[0]


def gguf_job(model: nn.Module, encoded: Sequence[Batch]) -> tuple[list[dict[str, Any]], np.ndarray | None]:
    """Per row: unpadded ids, (answer position, target) pairs, and the span of image tokens with its
    offset into the returned image-feature matrix (llama.cpp takes those positions as embeddings)."""
    cfg = model.config
    image_id = getattr(cfg, "image_token_id", None) or getattr(cfg, "image_token_index", None)
    rows, feats, offset = [], [], 0
    for batch in encoded:
        embeds = _image_features(model, batch)
        lengths = batch.inputs["attention_mask"].sum(1).tolist()
        for i, length in enumerate(lengths):
            ids = batch.inputs["input_ids"][i, :length]
            where = batch.answer_mask[i, :length].nonzero().flatten().tolist()
            targets = [(p, int(batch.targets[i, p])) for p in where]
            image = None
            if embeds is not None:
                spots = (ids == image_id).nonzero().flatten()
                start, end = int(spots[0]), int(spots[-1]) + 1
                if end - start != len(spots):
                    raise ConversionError("image tokens are not contiguous: cannot feed them to llama.cpp")
                feats.append(embeds[i, start:end].numpy())
                image, offset = [start, end, offset], offset + end - start
            rows.append({"ids": ids.tolist(), "targets": targets, "image": image})
    return rows, (np.concatenate(feats) if feats else None)


def gguf_correctness(
    model: nn.Module,
    model_dir: Path,
    encoded: Sequence[Batch],
    quants: Sequence[str],
    work: Path,
    *,
    python: str,
) -> dict[str, tuple[dict[str, bool], dict[str, Any]]]:
    """Per quantization: (row id -> exact answer through llama.cpp, facts about the run) for the
    checkpoint at ``model_dir`` (``model``: the same checkpoint in torch, for the image features)."""
    work.mkdir(parents=True, exist_ok=True)
    source = convert_gguf(model_dir, work / "model-f32.gguf", "f32")
    rows, feats = gguf_job(model, encoded)
    if feats is not None:
        np.save(work / "features.npy", feats)
    ids = [r.id for b in encoded for r in b.rows]
    n_ctx = max(len(r["ids"]) for r in rows)
    out = {}
    for q in quants:
        start = time.perf_counter()
        target = work / f"model-{q}.gguf"
        job = {
            "quantize": q != "f32", "ftype": GGUF_QUANTS[q], "source": source["path"],
            "gguf": source["path"] if q == "f32" else str(target), "rows": rows,
            "features": str(work / "features.npy") if feats is not None else None,
            "n_ctx": max(64, n_ctx), "threads": 1,
        }  # fmt: skip
        ok = run_llama_script(python, _RUNNER, job, q)["ok"]
        facts = {
            "bytes": Path(job["gguf"]).stat().st_size,
            "seconds": round(time.perf_counter() - start, 2),
        }
        out[q] = (dict(zip(ids, ok, strict=True)), facts)
    return out
