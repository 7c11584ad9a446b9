"""``run --dry-run``: what a recipe would touch and cost, from the model's ``config.json`` alone.

Nothing is downloaded or written and no model weight is loaded: the model is built on the meta
device (shapes, no storage), so a 7B or 11B plan takes about a second, and a wrong site, layer,
fold module or ``sae.path`` SAE (read to check its model, site and width) fails here with exit 2
instead of after an hour of activation collection. The tokenizer files next to ``config.json`` are
read for the padding id; ``conventions`` lists what a real checkpoint ships with (pad id, eos ids,
tied embeddings, rope scaling, sliding window). Sizes are estimates; the
assumptions (tokens per row, union of features) are listed in ``notes``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer, PretrainedConfig

from sauce_export.architectures import (
    ArchSpec,
    disk_key,
    residual_writers,
    site_module_name,
    spec_for,
    text_config,
    tied_embeddings,
)
from sauce_export.data import read_rows
from sauce_export.errors import InputError
from sauce_export.fold import TIED_EMBEDDINGS, writers_for_site
from sauce_export.hf_config import NO_REMOTE_CODE, read_config
from sauce_export.lm import padding_of
from sauce_export.recipe import Recipe, check_sae_width, load_recipe_sae
from sauce_export.runtime import checkpoint_dtype, dtype_name, resolve_dtype
from sauce_export.sites import parse_site
from sauce_export.subspace import writer_for_site

DEFAULT_TEXT_TOKENS = 48  # chat template + question + short answer, when data.train is not there yet
TEMPLATE_TOKENS = 12  # chat-template tokens around a row's prompt and answer
# One stored token in a collect shard besides its activation: int64 row and pos + uint8 image/answer flags.
SHARD_META_BYTES = 8 + 8 + 1 + 1


def resolve_config(model: str, where: str) -> tuple[PretrainedConfig, Path]:
    """``config.json`` of a local directory or of a Hub id already in the local HF cache (never fetched)."""
    local = Path(model).expanduser()
    if local.is_dir():
        directory = local
    elif not model.startswith((".", "/", "~")) and model.count("/") == 1:
        from huggingface_hub import hf_hub_download

        try:
            directory = Path(hf_hub_download(model, "config.json", local_files_only=True)).parent
        except Exception as err:  # a missing cache entry raises one of several hub errors
            raise InputError(
                where,
                "model",
                f"{model!r} is no local directory and not in the local Hugging Face cache "
                "(a dry run never downloads)",
            ) from err
    else:
        raise InputError(where, "model", f"{model!r} is neither a local directory nor a Hub id (org/name)")
    return read_config(directory, where), directory


def meta_model(config: PretrainedConfig) -> nn.Module:
    """The full task model with shapes but no storage: module names and parameter counts for free."""
    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config)


def _nbytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def image_tokens(config: PretrainedConfig, spec: ArchSpec) -> tuple[int, int]:
    """(image tokens in the language model's sequence, vision-encoder tokens) for one image.

    LLaVA splices every patch into the sequence; Mllama (a ``cross_attn`` family) keeps one
    ``<|image|>`` placeholder there and reads its tiles' patches through cross-attention instead.
    """
    vision = getattr(config, "vision_config", None)
    if vision is None:
        return 0, 0
    patches = (int(vision.image_size) // int(vision.patch_size)) ** 2
    if spec.cross_attn is not None:
        tiles = int(getattr(vision, "max_num_tiles", 1))
        return 1, tiles * (patches + 1)  # + one class token per tile
    full = getattr(config, "vision_feature_select_strategy", "default") == "full"
    return patches + int(full), patches + 1


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _padding(directory: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the padding the run will use, a note when it cannot be told) from the tokenizer files."""
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return None, (
            "no tokenizer files next to config.json: the run pads with the tokenizer's pad token, "
            "else eos, else unk, else id 0 (never a new token)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), **NO_REMOTE_CODE)
    except Exception as err:  # a tokenizer may need an optional package (sentencepiece, tiktoken)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return None, f"tokenizer not loadable here ({first}): padding is decided when the run loads it"
    return asdict(padding_of(tokenizer)), None


def conventions(
    config: PretrainedConfig, model: nn.Module, directory: Path
) -> tuple[dict[str, Any], list[str]]:
    """What a real checkpoint ships with that changes how it is run and exported, with notes."""
    text = text_config(config)
    padding, note = _padding(directory)
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    tied = tied_embeddings(model)
    notes = [note] if note else []
    if tied:
        notes.append(
            "lm_head is tied to the input embedding (one matrix on disk): lora and gated folds never "
            "write either, so the export keeps it shared; projection refuses fold.include_embed"
        )
    return {
        "padding": padding,
        "eos_token_id": getattr(text, "eos_token_id", None),
        "tied_embeddings": tied,
        "rope_scaling": rope if rope.get("rope_type", "default") != "default" else None,
        "sliding_window": getattr(text, "sliding_window", None),
    }, notes


def _data_profile(recipe: Recipe) -> tuple[int, float, float, str | None]:
    """(rows collected, share of rows with an image, text tokens per row, note) from ``data.train``."""
    path = Path(recipe.data.train)
    if not path.is_file():
        note = f"{path} not found: assumed {DEFAULT_TEXT_TOKENS} text tokens and one image per row"
        return recipe.collect.max_rows, 1.0, float(DEFAULT_TEXT_TOKENS), note
    rows = read_rows(path)
    if not rows:
        raise InputError(str(path), "rows", "the data file has no rows")
    chars = sum(len(r.prompt) + len(r.answer) + 1 for r in rows) / len(rows)
    with_image = sum(r.image is not None for r in rows) / len(rows)
    return min(len(rows), recipe.collect.max_rows), with_image, chars / 4 + TEMPLATE_TOKENS, None


def _features(recipe: Recipe, d_sae: int | None) -> int:
    """Upper bound on the selected features: the sum of each concept's count (the union may be smaller;
    a calibrated concept counts its largest ``calibrate.top_n``)."""

    def count(plan: dict[str, Any]) -> int:
        if plan["top_n"] is not None:
            return plan["top_n"]
        if d_sae is not None and plan["percentile"] is not None:
            return math.ceil(d_sae * (100 - plan["percentile"]) / 100)
        return 1

    return sum(
        max(recipe.calibrate.top_n) if c.searched(recipe.calibrate) else count(c.selection(recipe.select))
        for c in recipe.concepts
    )


def _lowrank(module: nn.Module, rank: int) -> int:
    """Parameters of ``B [out, rank] @ A [rank, in]`` for a module's weight (+ a bias delta)."""
    rows, cols = module.weight.shape
    bias = getattr(module, "bias", None)
    return rank * (rows + cols) + (0 if bias is None else rows)


def _fold_plan(model: nn.Module, recipe: Recipe, feats: int, where: str) -> dict[str, Any]:
    """The modules the fold rewrites, with on-disk keys, and the patch's parameter count."""
    cfg, spec, site = recipe.fold, spec_for(model), parse_site(recipe.site, where)
    d_model = int(text_config(model.config).hidden_size)
    growth = 0
    intermediate: list[int] | None = None
    method = cfg.method
    if recipe.edit.method == "subspace":
        # One writer; rank = the union of every concept's latents at the most the search may pick.
        sub, method = recipe.subspace, "subspace"
        names = [writer_for_site(model, str(site), sub.module)]
        per = max(sub.latents_grid) if sub.search else sub.latents
        rank = min(d_model, sum(e.top_n or per for e in recipe.concepts))
    elif cfg.method == "projection":
        names = list(
            residual_writers(
                model,
                range(cfg.first_layer, site.layer + 1),
                include_embed=cfg.include_embed,
                include_extra=cfg.include_embed,
                where=where,
            )
        )
        if cfg.include_embed and tied_embeddings(model):
            raise InputError(where, "fold.include_embed", TIED_EMBEDDINGS)
        rank = min(feats, d_model)
    elif cfg.method == "lora" and cfg.modules:
        layer = site_module_name(model, f"layers.{site.layer}", where)
        names = [f"{layer}.{m}" for m in cfg.modules]
        rank = feats
    else:
        names = writers_for_site(model, str(site))
        rank = feats
    patch = 0
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise InputError(where, "fold.modules", f"the model has no module {name}") from None
        if not isinstance(module, nn.Linear | nn.Embedding):
            raise InputError(where, "fold.modules", f"{name} is not a Linear writer")
        patch += _lowrank(module, rank)
    if method == "gated":
        width = int(text_config(model.config).intermediate_size)
        pad = max(cfg.pad_multiple, 1)
        intermediate = [width, -(-(width + feats) // pad) * pad]
        layers = len(model.get_submodule(spec.layers))
        # gate and up gain rows, down gains columns, in every layer (zeros outside the site layer)
        growth = 3 * layers * (intermediate[1] - width) * d_model
        prefix = f"{spec.layers}.{site.layer}.{spec.mlp}"
        names, patch = [f"{prefix}.{p}" for p in ("gate_proj", "up_proj", "down_proj")], growth
    writers = [
        {
            "module": n,
            "disk_key": disk_key(model, n) + ".weight",
            "shape": list(model.get_submodule(n).weight.shape),
        }
        for n in names
    ]
    return {
        "method": method,
        "rank": None if method == "gated" else rank,
        "writers": writers,
        "intermediate_size": intermediate,
        "growth_params": growth,
        "patch_params": patch,
        "patch_bytes": patch * 4,  # folds compute and store their factors in float32
    }


def dry_run(recipe: Recipe, model: str | None = None) -> dict[str, Any]:
    """The plan for ``recipe`` (its model replaced by ``model`` when given) as a JSON-ready dict."""
    where = recipe.path or "recipe"
    source = model or recipe.model
    config, directory = resolve_config(source, where)
    spec = spec_for(config)
    lm = meta_model(config)
    site = parse_site(recipe.site, where)
    site_name = site_module_name(lm, site, where)
    n_params = sum(p.numel() for p in lm.parameters())
    src_dtype = checkpoint_dtype(config)
    rt = recipe.runtime
    load_dtype = resolve_dtype(rt.dtype, config)
    act_dtype = getattr(torch, recipe.collect.dtype) if recipe.collect.dtype else load_dtype
    d_model = int(text_config(config).hidden_size)
    notes: list[str] = []

    rows, with_image, text_tokens, note = _data_profile(recipe)
    notes += [note] if note else []
    in_seq, vision_tokens = image_tokens(config, spec)
    img = in_seq * with_image
    per_row = {"all": text_tokens + img, "image": img, "text": text_tokens}[recipe.collect.scope]
    tokens = math.ceil(rows * per_row)
    if spec.cross_attn is not None:
        notes.append(
            f"{spec.name}: images enter through cross-attention ({vision_tokens} vision tokens per image), "
            "so the residual stream holds text tokens and one <|image|> placeholder"
        )

    layer_module = lm.get_submodule(f"{spec.layers}.{site.layer}")
    if spec.cross_attn is not None and hasattr(layer_module, spec.cross_attn):
        notes.append(
            f"layer {site.layer} is a cross-attention layer: its attention and MLP outputs enter the "
            "residual scaled by tanh gates and masked before the image, so a fold there acts through them"
        )

    sae_cfg = recipe.sae
    check_sae_width(recipe, d_model)
    if sae_cfg.path:
        loaded = load_recipe_sae(recipe, d_in=d_model, model=source).cfg
        sae_dir = Path(sae_cfg.path)
        files = [p for p in sae_dir.rglob("*") if p.is_file()] if sae_dir.is_dir() else []
        sae: dict[str, Any] = {
            "path": sae_cfg.path,
            "bytes": sum(p.stat().st_size for p in files),
            "kind": loaded.kind,
            "d_in": loaded.d_in,
            "d_sae": loaded.d_sae,
            "k": loaded.k if loaded.kind == "topk" else None,
        }
        d_sae = loaded.d_sae
    else:
        d_sae = sae_cfg.num_latents(d_model)
        sae_params = 2 * d_model * d_sae + 2 * d_sae + d_model  # W_enc, W_dec, b_enc, threshold, b_dec
        sae = {
            "kind": sae_cfg.kind,
            "d_in": d_model,
            "d_sae": d_sae,
            "k": sae_cfg.k if sae_cfg.kind == "topk" else None,
            "params": sae_params,
            "bytes": sae_params * 4,
            "train_bytes": sae_params * 4 * 4,  # weights, gradients and two Adam moments in float32
        }
    feats = _features(recipe, d_sae)
    fold = _fold_plan(lm, recipe, feats, where)
    if fold["method"] == "subspace":
        feats = fold["rank"]
    notes.append(
        f"patch sized for {feats} features (selection per concept x concepts; the union may be fewer)"
    )
    conv, conv_notes = conventions(config, lm, directory)
    notes += conv_notes

    shards = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    ckpt = sum(p.stat().st_size for p in shards) if shards else n_params * _nbytes(src_dtype)
    return {
        "model": source,
        "config": str(directory / "config.json"),
        "architecture": spec.name,
        "class": type(lm).__name__,
        "parameters": n_params,
        "source_dtype": str(src_dtype).removeprefix("torch."),
        "conventions": conv,
        "site": {
            "name": str(site),
            "module": site_name,
            "disk_key": disk_key(lm, site_name),
            "d_model": d_model,
            "num_layers": len(lm.get_submodule(spec.layers)),
        },
        "fold": fold,
        "collect": {
            "rows": rows,
            "text_tokens_per_row": round(text_tokens, 1),
            "image_tokens_per_row": round(img, 1),
            "vision_tokens_per_image": vision_tokens,
            "scope": recipe.collect.scope,
            "tokens": tokens,
            "dtype": dtype_name(act_dtype),
            "bytes": tokens * (_nbytes(act_dtype) * d_model + SHARD_META_BYTES),
            "shards": max(1, math.ceil(tokens / recipe.collect.shard_tokens)),
        },
        "sae": sae,
        "memory": {
            "load_dtype": dtype_name(load_dtype),
            "device": f"device_map {rt.device_map}" if rt.device_map else rt.device,
            "model_bytes": n_params * _nbytes(load_dtype),
            "gpus": gpus_needed(n_params * _nbytes(load_dtype) + sae.get("train_bytes", sae["bytes"])),
            "torchrun": f"torchrun --nproc-per-node N -m sauce_export run {where} --out DIR",
        },
        "export": {
            "bytes": ckpt + fold["growth_params"] * _nbytes(src_dtype),
            "measured": bool(shards),
        },
        "notes": notes,
    }


GPU_GB = (24, 40, 80)


def gpus_needed(nbytes: int) -> dict[str, int]:
    """GPUs of each common size that hold ``nbytes`` (the model once, the SAE in training) with a
    10% margin for activations (docs/scaling.md: 1B bf16 peaked at the model + 0.5 GB on a CPU)."""
    return {f"{gb} GB": math.ceil(1.1 * nbytes / (gb * 1e9)) for gb in GPU_GB}


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _convention_rows(conv: dict[str, Any]) -> list[tuple[str, str]]:
    pad = conv["padding"]
    rope = conv["rope_scaling"]
    return [
        (
            "padding",
            "unknown (no tokenizer)" if pad is None else f"id {pad['id']} {pad['token']!r} ({pad['source']})",
        ),
        ("eos_token_id", str(conv["eos_token_id"])),
        ("tied embeddings", "yes (lm_head = embed_tokens)" if conv["tied_embeddings"] else "no"),
        ("rope scaling", "none" if rope is None else json.dumps(rope, sort_keys=True)),
        ("sliding window", "none" if conv["sliding_window"] is None else str(conv["sliding_window"])),
    ]


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as a two-column table a person reads."""
    site, fold, col, sae = plan["site"], plan["fold"], plan["collect"], plan["sae"]
    rows = [
        ("model", f"{plan['model']} ({plan['class']}, {plan['architecture']})"),
        ("parameters", f"{_count(plan['parameters'])} ({plan['source_dtype']} on disk)"),
        *_convention_rows(plan["conventions"]),
        ("site", f"{site['name']} of {site['num_layers']} layers, d_model {site['d_model']}"),
        ("site module", site["module"]),
        ("site on disk", site["disk_key"]),
        ("fold", f"{fold['method']}" + (f", rank {fold['rank']}" if fold["rank"] is not None else "")),
    ]
    rows += [("  writes", f"{w['module']} {w['shape']} -> {w['disk_key']}") for w in fold["writers"]]
    if fold["intermediate_size"]:
        old, new = fold["intermediate_size"]
        rows.append(("  intermediate_size", f"{old} -> {new} (every layer; zeros outside the site)"))
    rows += [
        ("fold patch", f"{fold['patch_params']:,} params, {_size(fold['patch_bytes'])}"),
        (
            "tokens per row",
            f"{col['text_tokens_per_row']} text + {col['image_tokens_per_row']} image "
            f"(vision encoder: {col['vision_tokens_per_image']} per image)",
        ),
        (
            "activation cache",
            f"{col['rows']:,} rows x scope {col['scope']} = {col['tokens']:,} tokens, "
            f"{_size(col['bytes'])} ({col['dtype']}) in {col['shards']} shards",
        ),
    ]
    k = f", k {sae['k']}" if sae["k"] else ""
    if "path" in sae:
        shape = f"{sae['kind']} {sae['d_in']}x{sae['d_sae']}{k}"
        rows.append(("SAE", f"loaded from {sae['path']} ({shape}, {_size(sae['bytes'])})"))
    else:
        rows.append(
            (
                "SAE",
                f"{sae['kind']} {sae['d_in']}x{sae['d_sae']}{k}: {sae['params']:,} params, "
                f"{_size(sae['bytes'])} (training ~{_size(sae['train_bytes'])})",
            )
        )
    mem = plan["memory"]
    rows += [
        ("model memory", f"{_size(mem['model_bytes'])} ({mem['load_dtype']} on {mem['device']})"),
        (
            "GPUs needed",
            ", ".join(f"{n} x {size}" for size, n in mem["gpus"].items())
            + ": more than 1 -> runtime.device_map: auto; 1 -> "
            + f"`{mem['torchrun']}` splits collect, SAE and verify over N of them",
        ),
        (
            "export disk",
            f"{_size(plan['export']['bytes'])} ({'measured' if plan['export']['measured'] else 'estimated'})",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines += [f"note: {n}" for n in plan["notes"]]
    return "\n".join(lines)
