"""transformers 4.57 and optimum-onnx (their own environment: optimum-onnx needs transformers < 4.58).

The exported text checkpoint loads unchanged in transformers 4.57, and optimum's ONNX export of it
runs greedy decoding in ONNX Runtime (``ORTModelForCausalLM``); both match transformers 5 here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from sauce_export.export import export_checkpoint
from sauce_export.patch import Patch
from tests.compat.parity import compare_greedy, greedy_reference

pytestmark = pytest.mark.compat
NEW_TOKENS = 8
WORLD_LLAMA = Path(__file__).resolve().parents[2] / "models" / "world-llama"
_RESAVE = (
    "import sys, torch; from transformers import AutoModelForCausalLM; "
    "AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32).save_pretrained(sys.argv[2])"
)

_RUNNER = r"""
import json, sys, torch, transformers
job = json.load(sys.stdin)
if job["runtime"] == "ort":
    from optimum.onnxruntime import ORTModelForCausalLM
    model = ORTModelForCausalLM.from_pretrained(job["model"], export=True, use_cache=False)
else:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(job["model"], torch_dtype=torch.float32).eval()
res = []
for ids in job["ids"]:
    seq, toks, lps = list(ids), [], []
    for _ in range(job["new_tokens"]):
        x = torch.tensor([seq])
        with torch.no_grad():
            logp = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].float().log_softmax(-1)
        tok = int(logp.argmax())
        toks.append(tok); lps.append(float(logp[tok])); seq.append(tok)
    res.append({"tokens": toks, "logprobs": lps})
print("VERSION " + transformers.__version__)
print("RESULT " + json.dumps(res))
"""


def _run(python: Path, runtime: str, model: Path, ids: list[list[int]]) -> tuple[str, list[dict]]:
    job = {"runtime": runtime, "model": str(model), "ids": ids, "new_tokens": NEW_TOKENS}
    done = subprocess.run([str(python), "-c", _RUNNER], input=json.dumps(job), capture_output=True, text=True)
    out = done.stdout.splitlines()
    result = [ln for ln in out if ln.startswith("RESULT ")]
    assert done.returncode == 0 and result, (done.stdout + done.stderr)[-3000:]
    version = next(ln for ln in out if ln.startswith("VERSION ")).removeprefix("VERSION ")
    return version, json.loads(result[-1].removeprefix("RESULT "))


@pytest.mark.parametrize("runtime", ["transformers", "ort"])
def test_exported_checkpoint_in_transformers_457_and_optimum(
    runtime: str, text_export: Path, prompts: list[str], optimum_python: Path
) -> None:
    tok = AutoTokenizer.from_pretrained(text_export)
    ids = [tok(p)["input_ids"] for p in prompts]
    started = time.perf_counter()
    version, got = _run(optimum_python, runtime, text_export, ids)
    assert version.startswith("4.57")
    name = "optimum ORTModelForCausalLM" if runtime == "ort" else f"transformers {version}"
    compare_greedy(name, greedy_reference(text_export, ids, NEW_TOKENS), got, time.perf_counter() - started)


def test_source_saved_by_transformers_457_round_trips(
    text_patch: Patch, prompts: list[str], optimum_python: Path, tmp_path: Path
) -> None:
    """A checkpoint written by transformers 4.57 exports here and loads back there unchanged."""
    source, out = tmp_path / "saved-by-4.57", tmp_path / "export"
    subprocess.run([str(optimum_python), "-c", _RESAVE, str(WORLD_LLAMA), str(source)], check=True)
    # 4.57 cannot read a tokenizer_config.json written by transformers 5 ("TokenizersBackend"), so
    # the tokenizer files travel as they are; the weights and config.json are 4.57's.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(WORLD_LLAMA / name, source / name)
    export_checkpoint(source, text_patch, out, progress=False)
    tok = AutoTokenizer.from_pretrained(out)
    ids = [tok(p)["input_ids"] for p in prompts]
    started = time.perf_counter()
    version, got = _run(optimum_python, "transformers", out, ids)
    assert version.startswith("4.57")
    compare_greedy(
        f"4.57-saved source, transformers {version}",
        greedy_reference(out, ids, NEW_TOKENS),
        got,
        time.perf_counter() - started,
    )
