"""Convert an exported checkpoint for stock runtimes: ONNX (onnxruntime) and GGUF (llama.cpp).

ONNX: ``torch.onnx.export`` (the dynamo exporter) of a logits-only, cache-free forward with dynamic
batch and sequence axes: ``(input_ids, attention_mask) -> logits`` for a causal LM, plus
``pixel_values`` for a LLaVA-style VLM (the whole model: vision tower, projector and language model).
``check_onnx`` compares onnxruntime with transformers on the same inputs (max abs diff of the logits
at unmasked positions, against a per-dtype tolerance as optimum's validator does) and greedy tokens.

GGUF: llama.cpp's own ``convert_hf_to_gguf.py`` with its ``gguf-py``, taken at run time from the
``llama-cpp-python`` source distribution (``pip download``) into an ignored cache: no llama.cpp code
lives in this repository. ``check_gguf`` runs ``llama_cpp.Llama`` in its own environment (a
subprocess of that environment's python) and compares its logits and greedy tokens with transformers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sauce_export.errors import InputError

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
GGUF_OUTTYPES = ("f32", "f16", "q8_0")
# Max abs logit difference accepted per weight dtype (optimum validates fp32 exports at atol 1e-4).
ONNX_ATOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
# llama.cpp (f32 KV cache) vs transformers: f32 is near-exact; f16 rounds the weights; q8_0 also
# quantizes the activations of every matmul to 8 bits, so only its greedy tokens are a tight check.
GGUF_ATOL = {"f32": 1e-4, "f16": 2e-2, "q8_0": 5e-1}
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "chat_template.jinja", "generation_config.json", "processor_config.json", "preprocessor_config.json",
    "config.json",
)  # fmt: skip


class ConversionError(RuntimeError):
    """A converter or runtime failed for a reason other than bad user input."""


def default_cache() -> Path:
    """Where downloaded converter sources live (``$SAUCE_COMPAT_CACHE``, else ``.cache/compat``)."""
    return Path(os.environ.get("SAUCE_COMPAT_CACHE", ".cache/compat"))


def _read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise InputError(str(model_dir), "config.json", "missing: not a checkpoint directory")
    return json.loads(path.read_text())


# ---------------------------------------------------------------- ONNX


class _LogitsOnly(torch.nn.Module):
    """A cache-free forward that returns only the logits (ONNX's single output)."""

    def __init__(self, model: torch.nn.Module, vision: bool) -> None:
        super().__init__()
        self.model, self.vision = model, vision

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        names = ("input_ids", "attention_mask", "pixel_values")[: len(args)]
        return self.model(**dict(zip(names, args, strict=True)), use_cache=False).logits


@contextlib.contextmanager
def _no_trace_checks(model: torch.nn.Module) -> Iterator[None]:
    """Drop transformers' ``torch_compilable_check`` in the model's module while exporting.

    LLaVA checks "image tokens == image features" with ``torch._check_tensor_all``, which traces to
    ``aten._is_all_true``, an op the ONNX exporter cannot translate. It is a runtime assertion only.
    """
    modules = {sys.modules[type(m).__module__] for m in model.modules()}
    patched = [m for m in modules if hasattr(m, "torch_compilable_check")]
    saved = [m.torch_compilable_check for m in patched]  # type: ignore[attr-defined]
    for m in patched:
        m.torch_compilable_check = lambda *a, **k: None  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for m, fn in zip(patched, saved, strict=True):
            m.torch_compilable_check = fn  # type: ignore[attr-defined]


def _load_hf(model_dir: Path, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any, bool]:
    from sauce_export.lm import load_model

    lm = load_model(str(model_dir), where=str(model_dir), dtype=dtype)
    return lm.model, lm.tokenizer, lm.is_vlm


def _example_inputs(model: torch.nn.Module, vision: bool, batch: int, extra: int) -> list[torch.Tensor]:
    """Random ids (with a VLM's image tokens after BOS) of shape ``[batch, n_image + extra]``."""
    cfg = model.config
    gen = torch.Generator().manual_seed(batch * 1000 + extra)
    vocab = cfg.get_text_config().vocab_size
    n_img = int(getattr(cfg, "image_seq_length", 0)) if vision else 0
    ids = torch.randint(3, vocab - 2, (batch, n_img + extra), generator=gen)
    if not vision:
        return [ids, torch.ones_like(ids)]
    ids[ids == cfg.image_token_index] = 3
    ids[:, 1 : 1 + n_img] = cfg.image_token_index
    size = cfg.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=gen, dtype=model.dtype)
    return [ids, torch.ones_like(ids), pixels]


def export_onnx(model_dir: Path, out: Path, *, opset: int = 18) -> dict[str, Any]:
    """Write ``out/model.onnx`` (fp32; dynamic sequence, and batch for a text model) + tokenizer/config files."""
    model_dir, out = Path(model_dir), Path(out)
    _read_config(model_dir)
    started = time.perf_counter()
    model, _, vision = _load_hf(model_dir)
    # A VLM's batch is fixed at 1 (one image): its vision path specialises the batch when traced.
    args = _example_inputs(model, vision, batch=1 if vision else 2, extra=6)
    names = ["input_ids", "attention_mask", "pixel_values"][: len(args)]
    n_img = int(getattr(model.config, "image_seq_length", 0)) if vision else 0
    seq = torch.export.Dim("seq", min=n_img + 2)
    text_axes = {1: seq} if vision else {0: torch.export.Dim("batch"), 1: seq}
    dynamic: dict[str, dict[int, Any]] = {
        "input_ids": text_axes,
        "attention_mask": text_axes,
        "pixel_values": {},
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    wrapper = _LogitsOnly(model, vision)
    with _no_trace_checks(model), torch.no_grad(), _quiet():
        torch.onnx.export(
            wrapper, tuple(args), str(path), input_names=names, output_names=["logits"],
            dynamic_shapes={"args": tuple(dynamic[n] for n in names)}, opset_version=opset, dynamo=True,
            external_data=False, verbose=False,
        )  # fmt: skip
    for name in _TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out / name)
    return {
        "path": str(path),
        "inputs": names,
        "vision": vision,
        "bytes": path.stat().st_size,
        "seconds": round(time.perf_counter() - started, 2),
    }


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's progress prints and warnings (errors still raise)."""
    import io
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _session(onnx_path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


def _greedy(step: Any, ids: list[int], n: int) -> list[int]:
    """``n`` argmax tokens after ``ids``, recomputing the whole prefix each step (no cache)."""
    out: list[int] = []
    for _ in range(n):
        nxt = int(np.argmax(step(ids + out)))
        out.append(nxt)
    return out


def check_onnx(
    model_dir: Path, onnx_path: Path, prompts: Sequence[str], *, max_new_tokens: int = 8
) -> dict[str, Any]:
    """onnxruntime vs transformers: logits max abs diff (padded batches too) and greedy tokens."""
    model, tokenizer, vision = _load_hf(Path(model_dir))
    session = _session(Path(onnx_path))
    names = [i.name for i in session.get_inputs()]
    # fp32 rounding through a CLIP tower + projector is larger: a VLM gets 10x the text tolerance.
    atol = ONNX_ATOL[model.dtype] * (10 if vision else 1)

    def run_both(args: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad(), _no_trace_checks(model):
            ref = _LogitsOnly(model, vision)(*args).float().numpy()
        got = session.run(None, {n: a.numpy() for n, a in zip(names, args, strict=True)})[0]
        return ref, got

    rows: list[dict[str, Any]] = []
    for batch, extra in ((1, 5), (1, 9), (1, 4)) if vision else ((1, 5), (2, 9), (3, 4)):
        args = _example_inputs(model, vision, batch, extra)
        if batch > 1:
            args[1][0, : extra // 2] = 0  # left padding in the first row
        ref, got = run_both(args)
        keep = args[1].numpy().astype(bool)
        diff = float(np.abs(ref - got)[keep].max())
        rows.append({"output": "logits", "shape": list(ref.shape), "max_abs_diff": diff, "atol": atol})

    pixels = _example_inputs(model, vision, 1, 1)[2] if vision else None
    n_img = int(getattr(model.config, "image_seq_length", 0)) if vision else 0
    greedy: list[dict[str, Any]] = []
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        if vision:
            ids = ids[:1] + [model.config.image_token_index] * n_img + ids[1:]

        def step(seq: list[int], use_onnx: bool, pix: torch.Tensor | None = pixels) -> np.ndarray:
            args = [torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long)]
            if pix is not None:
                args.append(pix)
            if use_onnx:
                return session.run(None, {n: a.numpy() for n, a in zip(names, args, strict=True)})[0][0, -1]
            with torch.no_grad(), _no_trace_checks(model):
                return _LogitsOnly(model, vision)(*args)[0, -1].float().numpy()

        hf = _greedy(lambda s: step(s, False), ids, max_new_tokens)
        ox = _greedy(lambda s: step(s, True), ids, max_new_tokens)
        greedy.append({"prompt": prompt, "transformers": hf, "onnxruntime": ox, "equal": hf == ox})
    worst = max(r["max_abs_diff"] for r in rows)
    return {
        "dtype": str(model.dtype).removeprefix("torch."),
        "atol": atol,
        "outputs": rows,
        "max_abs_diff": worst,
        "greedy": greedy,
        "passed": worst <= atol and all(g["equal"] for g in greedy),
    }


# ---------------------------------------------------------------- GGUF


def llama_cpp_tree(cache: Path | None = None) -> Path:
    """llama.cpp's converter (``convert_hf_to_gguf.py``, ``conversion/``, ``gguf-py/``) from the sdist.

    Downloaded once with ``pip download --no-binary :all:`` into ``cache`` (see ``default_cache``).
    """
    cache = Path(cache or default_cache())
    version = LLAMA_CPP_PYTHON.split("==")[1]
    tree = cache / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if (tree / "convert_hf_to_gguf.py").is_file() and (tree / "gguf-py").is_dir():
        return tree
    sdist_dir = cache / "sdist"
    tarballs = sorted(sdist_dir.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not tarballs:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
               "--no-binary", ":all:", "--no-deps", LLAMA_CPP_PYTHON, "-d", str(sdist_dir)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        tarballs = sorted(sdist_dir.glob(f"llama_cpp_python-{version}.tar.gz"))
        if done.returncode or not tarballs:
            raise ConversionError(f"pip download {LLAMA_CPP_PYTHON} failed: {done.stderr.strip()[-500:]}")
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    wanted = (prefix + "convert_hf_to_gguf.py", prefix + "conversion/", prefix + "gguf-py/")
    with tarfile.open(tarballs[0]) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(wanted)]
        tar.extractall(cache, members=members, filter="data")
    return tree


def _converter_failure(model_dir: Path, log: str) -> Exception:
    """Turn the converter's known failures into errors that name the cause."""
    if "BPE pre-tokenizer was not recognized" in log:
        hsh = next((ln.split("chkhsh:")[1].strip() for ln in log.splitlines() if "chkhsh:" in ln), "?")
        return InputError(
            str(model_dir / "tokenizer.json"), "tokenizer",
            "llama.cpp's converter does not recognise this byte-level BPE pre-tokenizer (hash "
            f"{hsh} is not in its convert_hf_to_gguf_update.py list). Use a model whose tokenizer "
            "llama.cpp knows (e.g. a Llama-style byte-fallback BPE), or add the tokenizer upstream.",
        )  # fmt: skip
    for marker in ("No module named 'sentencepiece'", "sentencepiece"):
        if f"ModuleNotFoundError: {marker}" in log or marker in log.splitlines()[-1:]:
            return ConversionError("the converter needs sentencepiece: pip install sentencepiece")
    if "is not supported" in log or "Unsupported model" in log or "NotImplementedError" in log:
        last = [ln for ln in log.splitlines() if ln.strip()][-1]
        return InputError(
            str(model_dir / "config.json"), "architectures", f"llama.cpp cannot convert: {last}"
        )
    tail = "\n".join(log.strip().splitlines()[-15:])
    return ConversionError(f"convert_hf_to_gguf.py failed:\n{tail}")


def convert_gguf(
    model_dir: Path,
    out: Path,
    outtype: str = "f16",
    *,
    mmproj: bool = False,
    cache: Path | None = None,
    python: str = sys.executable,
) -> dict[str, Any]:
    """Run llama.cpp's ``convert_hf_to_gguf.py`` on ``model_dir``; ``out`` is the ``.gguf`` file.

    A VLM converts to its language model (``mmproj=False``) or its projector (``mmproj=True``, where
    the converter supports the architecture). ``python`` needs torch, numpy, sentencepiece and
    transformers (this environment's do).
    """
    model_dir, out = Path(model_dir), Path(out)
    if outtype not in GGUF_OUTTYPES:
        raise InputError("convert", "--outtype", f"{outtype!r}: use one of {', '.join(GGUF_OUTTYPES)}")
    _read_config(model_dir)
    tree = llama_cpp_tree(cache)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [python, str(tree / "convert_hf_to_gguf.py"), str(model_dir), "--outfile", str(out),
           "--outtype", outtype]  # fmt: skip
    if mmproj:
        cmd.append("--mmproj")
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # use the sdist's gguf-py
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        out.unlink(missing_ok=True)
        raise _converter_failure(model_dir, done.stdout + done.stderr)
    produced = out if out.is_file() else next(iter(sorted(out.parent.glob(f"{out.stem}*.gguf"))), out)
    return {
        "path": str(produced),
        "outtype": outtype,
        "bytes": produced.stat().st_size,
        "seconds": round(time.perf_counter() - started, 2),
    }


# Runs inside the llama.cpp environment (no torch there): reads JSON on stdin, writes .npy files.
_LLAMA_RUNNER = r"""
import json, sys, numpy as np, llama_cpp
job = json.load(sys.stdin)
if job["no_extra_bufts"]:  # AMX/repacked buffers crash q8_0 on some CPUs: plain CPU buffers only
    _defaults = llama_cpp.llama_model_default_params
    def _params():
        p = _defaults(); p.use_extra_bufts = False; return p
    llama_cpp.llama_model_default_params = _params
    llama_cpp.llama.llama_cpp.llama_model_default_params = _params
llm = llama_cpp.Llama(model_path=job["gguf"], logits_all=True, n_ctx=job["n_ctx"], n_batch=job["n_ctx"],
                      n_threads=job["threads"], seed=0, verbose=False,
                      type_k=0, type_v=0)  # GGML_TYPE_F32 KV cache: the default f16 cache costs ~1e-2
res = {"tokenize": [], "greedy": []}
for i, ids in enumerate(job["ids"]):
    llm.reset(); llm.eval(ids)
    np.save(f"{job['out']}/logits_{i}.npy", np.array(llm.scores[: len(ids)], dtype=np.float32))
    out = []
    for _ in range(job["new_tokens"]):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1]))); llm.eval([out[-1]])
    res["greedy"].append(out)
for text in job["texts"]:
    res["tokenize"].append(llm.tokenize(text.encode(), add_bos=True, special=False))
print(json.dumps(res))
"""


def run_llama_cpp(
    gguf: Path,
    ids: Sequence[Sequence[int]],
    texts: Sequence[str],
    *,
    python: str,
    new_tokens: int = 8,
    no_extra_bufts: bool = True,
    workdir: Path,
) -> tuple[list[np.ndarray], dict[str, Any]]:
    """``llama_cpp.Llama(logits_all=True)`` in the environment of ``python``: logits per prompt + JSON."""
    workdir.mkdir(parents=True, exist_ok=True)
    job = {
        "gguf": str(gguf), "ids": [list(map(int, x)) for x in ids], "texts": list(texts),
        "out": str(workdir), "new_tokens": new_tokens, "no_extra_bufts": no_extra_bufts,
        "n_ctx": 256, "threads": min(2, os.cpu_count() or 1),
    }  # fmt: skip
    res = run_llama_script(python, _LLAMA_RUNNER, job, gguf.name)
    return [np.load(workdir / f"logits_{i}.npy") for i in range(len(ids))], res


def run_llama_script(python: str, script: str, job: dict[str, Any], what: str) -> dict[str, Any]:
    """Run ``script`` with the llama-cpp-python environment's ``python`` (no torch there), ``job`` as
    JSON on stdin; its last stdout line is the JSON result. A ConversionError with the output's tail."""
    done = subprocess.run([python, "-c", script], input=json.dumps(job), capture_output=True, text=True)
    if done.returncode:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-12:])
        raise ConversionError(f"llama.cpp failed on {what} (exit {done.returncode}):\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_gguf(
    model_dir: Path,
    gguf: Path,
    prompts: Sequence[str],
    *,
    python: str,
    outtype: str,
    new_tokens: int = 8,
    no_extra_bufts: bool = True,
) -> dict[str, Any]:
    """llama.cpp vs transformers on the same token ids: max abs logit diff, greedy tokens, tokenizer."""
    model, tokenizer, _ = _load_hf(Path(model_dir))
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    started = time.perf_counter()
    logits, res = run_llama_cpp(
        gguf, ids, prompts, python=python, new_tokens=new_tokens, no_extra_bufts=no_extra_bufts,
        workdir=Path(gguf).parent / f".{Path(gguf).stem}-check",
    )  # fmt: skip
    seconds = time.perf_counter() - started
    rows: list[dict[str, Any]] = []
    for prompt, seq, got, greedy in zip(prompts, ids, logits, res["greedy"], strict=True):

        def step(s: list[int]) -> np.ndarray:
            with torch.no_grad():
                return model(input_ids=torch.tensor([s]), use_cache=False).logits[0, -1].float().numpy()

        with torch.no_grad():
            ref = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0].float().numpy()
        hf = _greedy(step, list(seq), new_tokens)
        rows.append({
            "prompt": prompt, "max_abs_diff": float(np.abs(ref - got).max()),
            "transformers": hf, "llama_cpp": greedy, "equal": hf == greedy,
        })  # fmt: skip
    tok_equal = [list(t) == list(i) for t, i in zip(res["tokenize"], ids, strict=True)]
    worst = max(r["max_abs_diff"] for r in rows)
    return {
        "outtype": outtype,
        "atol": GGUF_ATOL[outtype],
        "max_abs_diff": worst,
        "rows": rows,
        "tokenizer_equal": all(tok_equal),
        "seconds": round(seconds, 2),
        "passed": worst <= GGUF_ATOL[outtype] and all(r["equal"] for r in rows),
    }
