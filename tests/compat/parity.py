"""Greedy parity against transformers in this environment, shared by the runtime checks."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

LOGPROB_ATOL = 1e-4


def greedy_reference(model_dir: Path, ids: list[list[int]], new_tokens: int = 8) -> list[dict]:
    """Greedy tokens and their logprobs from transformers (this environment), cache-free."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    res = []
    for seq in ids:
        seq, toks, lps = list(seq), [], []
        for _ in range(new_tokens):
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].log_softmax(-1)
            tok = int(logp.argmax())
            toks.append(tok), lps.append(float(logp[tok])), seq.append(tok)
        res.append({"tokens": toks, "logprobs": lps})
    return res


def compare_greedy(name: str, ref: list[dict], got: list[dict], seconds: float) -> None:
    """Same greedy tokens, logprobs within LOGPROB_ATOL; prints the measured difference."""
    pairs = list(zip(ref, got, strict=True))
    diff = max(abs(a - b) for r, g in pairs for a, b in zip(r["logprobs"], g["logprobs"], strict=True))
    equal = all(r["tokens"] == g["tokens"] for r, g in pairs)
    print(f"\n{name}: tokens equal={equal} logprob max_abs_diff={diff:.2e} ({seconds:.1f} s)")
    assert equal
    assert diff <= LOGPROB_ATOL
