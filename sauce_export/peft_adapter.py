"""A ``Patch`` as a PEFT LoRA adapter for the untouched base model, within what vLLM serves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sauce_export.errors import InputError
from sauce_export.export import check_factors
from sauce_export.fsutil import atomic_dir
from sauce_export.hf_config import read_config
from sauce_export.layout import file_record
from sauce_export.patch import Patch, WeightDelta


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
    check_factors(delta)
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
        files = [{"name": p.name, **file_record(p)} for p in sorted(tmp.iterdir())]
    ranks = {d.module: d.rank for d in patch.deltas}
    return {"path": str(out), "files": files, "ranks": ranks}
