"""``run --dry-run`` for a diffusion recipe: the plan from ``model_index.json`` and ``unet/config.json``.

The UNet is built on the meta device (shapes, no storage) and run once there, so the site's width
and spatial size, the fold's modules and the cache, SAE, patch and memory sizes of, say, Stable
Diffusion 1.5 are known in seconds, and a wrong site or fold module fails with exit 2 before any
weight is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sauce_export.diffusion.fold import linear_module
from sauce_export.diffusion.recipe import DiffusionRecipe
from sauce_export.diffusion.unet import block_of, sample_of, site_module
from sauce_export.errors import InputError

TEXT_TOKENS = 77


def _read_json(path: Path, where: str, field: str) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(where, field, f"{path} does not exist (a diffusers pipeline folder is expected)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(str(path), "json", f"not JSON ({err.msg})") from None


def dry_run(recipe: DiffusionRecipe, model: str | None = None) -> dict[str, Any]:
    from diffusers import UNet2DConditionModel

    where = recipe.path or "recipe"
    root = Path(model or recipe.model)
    index = _read_json(root / "model_index.json", where, "model")
    if "unet" not in index:
        raise InputError(str(root / "model_index.json"), "unet", "the pipeline has no UNet")
    cfg = _read_json(root / "unet" / "config.json", where, "model")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
    module = site_module(unet, recipe.site, where)
    block_name, block = block_of(unet, recipe.site, where)
    shape: list[int] = []
    handle = module.register_forward_hook(lambda _m, _i, o: shape.extend(sample_of(o).shape))
    size = int(cfg.get("sample_size", 64))
    with torch.device("meta"), torch.no_grad():
        unet(
            torch.zeros(1, cfg.get("in_channels", 4), size, size),
            torch.tensor(10),
            encoder_hidden_states=torch.zeros(1, TEXT_TOKENS, cfg["cross_attention_dim"]),
        )
    handle.remove()
    width, positions = shape[1], shape[2] * shape[3]
    fold_modules = []
    for rel in recipe.fold.modules:
        lin = linear_module(block, rel, where)
        fold_modules.append(
            {
                "module": f"{block_name}.{rel}",
                "shape": [lin.out_features, lin.in_features],
                "lora_params": recipe.fold.rank * (lin.in_features + lin.out_features),
            }
        )
    params = sum(p.numel() for p in unet.parameters())
    d_sae = recipe.sae.num_latents(width)
    vectors = recipe.collect.max_rows * recipe.sampling.steps * positions
    fold_vectors = recipe.fold.rows * recipe.sampling.steps * 2  # both CFG halves
    block_io = fold_vectors * (2 * width * positions + TEXT_TOKENS * cfg["cross_attention_dim"])
    return {
        "model": str(root),
        "pipeline": index.get("_class_name"),
        "unet_params": params,
        "unet_bytes": {"float32": 4 * params, "float16": 2 * params},
        "site": recipe.site,
        "site_output": shape,
        "site_width": width,
        "positions_per_image": positions,
        "sites": [n for n, m in unet.named_modules() if type(m).__name__ == "Transformer2DModel"],
        "collect_vectors": vectors,
        "collect_bytes_float32": 4 * vectors * width,
        "sae_latents": d_sae,
        "sae_bytes_float32": 4 * (2 * width * d_sae + d_sae + width),
        "fold_modules": fold_modules,
        "patch_bytes_float32": 4 * sum(m["lora_params"] for m in fold_modules),
        "fold_calibration_bytes_float32": 4 * block_io,
        "notes": [
            "collect stores the conditional half at every denoising step of every sampled row",
            "fold calibration keeps block input, encoder states and hooked output of both CFG halves",
        ],
    }


def format_plan(plan: dict[str, Any]) -> str:
    gib = 2.0**30
    lines = [
        f"model: {plan['model']} ({plan['pipeline']}), UNet {plan['unet_params'] / 1e6:.0f} M parameters "
        f"({plan['unet_bytes']['float16'] / gib:.2f} GiB float16, {plan['unet_bytes']['float32'] / gib:.2f} GiB float32)",
        f"site: {plan['site']} output {plan['site_output']} -> {plan['positions_per_image']} vectors of width "
        f"{plan['site_width']} per image and step",
        f"collect: {plan['collect_vectors']:,} vectors, {plan['collect_bytes_float32'] / gib:.2f} GiB float32",
        f"SAE: {plan['sae_latents']} latents, {plan['sae_bytes_float32'] / 2**20:.1f} MiB",
        "fold: "
        + ", ".join(
            f"{m['module']} {m['shape']} ({m['lora_params']:,} LoRA params)" for m in plan["fold_modules"]
        ),
        f"fold calibration: {plan['fold_calibration_bytes_float32'] / gib:.2f} GiB float32; "
        f"patch {plan['patch_bytes_float32'] / 2**20:.2f} MiB",
    ]
    return "\n".join(lines)
