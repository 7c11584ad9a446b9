"""Where things live inside each supported transformer, in one declarative table.

Every other module asks this one for module paths (decoder layers, residual writers, norms) and for
the on-disk tensor key of an in-memory module, so no per-family branching leaks elsewhere. Paths
were checked against transformers 5.23 by printing ``named_modules()`` and by reading the keys that
``save_pretrained`` writes (VLMs are saved with legacy llava-hf / Meta keys such as
``language_model.model.layers.N``, while the same model in memory is ``model.language_model.layers.N``).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass, replace

from torch import nn
from transformers import PretrainedConfig

from sauce_export.errors import InputError
from sauce_export.sites import Site, parse_site


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one architecture family, relative to the top model (``*ForCausalLM`` etc.).

    ``disk_prefixes`` maps an in-memory module-name prefix to an on-disk tensor-key prefix. One
    in-memory prefix may appear several times: the first pair is what transformers 5 writes, later
    pairs are other layouts found in the wild (native transformers-5 keys, Hub llava-hf keys).
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    embed: str
    lm_head: str
    final_norm: str
    writers: tuple[str, ...]
    readers: tuple[str, ...]
    norms: tuple[str, ...]
    extra_writers: tuple[str, ...] = ()
    attn: str = "self_attn"
    mlp: str = "mlp"
    cross_attn: str | None = None
    disk_prefixes: tuple[tuple[str, str], ...] = ()
    text_model: str = "model"
    """The language model (embeddings, decoder layers, final norm): with ``lm_head``, what full
    fine-tuning trains. A VLM's vision tower and projector lie outside it and stay frozen."""
    adapted: tuple[str, ...] = (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
    """Per-layer projections (relative to a decoder layer) that LoRA adapters go on."""


_LLAMA = ArchSpec(
    name="llama",
    model_types=("llama",),
    layers="model.layers",
    embed="model.embed_tokens",
    lm_head="lm_head",
    final_norm="model.norm",
    writers=("self_attn.o_proj", "mlp.down_proj"),
    readers=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"),
    norms=("input_layernorm", "post_attention_layernorm"),
)
# VLMs nest the text model at ``model.language_model``. transformers 5.23 saves them with the
# llava-hf / Meta keys ``language_model.model.*`` and ``language_model.lm_head``; a checkpoint saved
# natively by transformers 5 may keep the in-memory names, so both are listed (saved layout first).
_VLM_TEXT = replace(
    _LLAMA,
    layers="model.language_model.layers",
    embed="model.language_model.embed_tokens",
    final_norm="model.language_model.norm",
    text_model="model.language_model",
    disk_prefixes=(
        ("lm_head", "language_model.lm_head"),
        ("lm_head", "lm_head"),
        ("model.language_model", "language_model.model"),
        ("model.language_model", "model.language_model"),
    ),
)

REGISTRY: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": replace(_LLAMA, name="mistral", model_types=("mistral",)),
    "qwen2": replace(_LLAMA, name="qwen2", model_types=("qwen2",)),
    "llava": replace(
        _VLM_TEXT,
        name="llava",
        model_types=("llava",),
        # The projector's output replaces the image-token embeddings, so it writes the residual stream.
        extra_writers=("model.multi_modal_projector.linear_2",),
        disk_prefixes=(
            *_VLM_TEXT.disk_prefixes,
            # 5.23 flattens CLIPVisionModel (no ``vision_model``); Hub llava-hf keys still have it.
            ("model.vision_tower", "vision_tower"),
            ("model.vision_tower", "vision_tower.vision_model"),
            ("model.vision_tower", "model.vision_tower"),
            ("model.multi_modal_projector", "multi_modal_projector"),
            ("model.multi_modal_projector", "model.multi_modal_projector"),
        ),
    ),
    "mllama": replace(
        _VLM_TEXT,
        name="mllama",
        model_types=("mllama",),
        # Cross-attention layers (text_config.cross_attention_layers) have ``cross_attn`` instead of
        # ``self_attn``; its output enters the residual scaled by tanh(cross_attn_attn_gate). There only
        # q_proj reads the residual; k/v_proj read the projected image features. The
        # multi_modal_projector feeds those keys/values, not the residual stream, so it is no writer.
        writers=("self_attn.o_proj", "cross_attn.o_proj", "mlp.down_proj"),
        readers=(*_LLAMA.readers, "cross_attn.q_proj"),
        cross_attn="cross_attn",
        adapted=(*_LLAMA.adapted, *(f"cross_attn.{p}_proj" for p in "qkvo")),
        disk_prefixes=(
            *_VLM_TEXT.disk_prefixes,
            ("model.vision_model", "vision_model"),
            ("model.vision_model", "model.vision_model"),
            ("model.multi_modal_projector", "multi_modal_projector"),
            ("model.multi_modal_projector", "model.multi_modal_projector"),
        ),
    ),
}
_BY_MODEL_TYPE = {mt: spec for spec in REGISTRY.values() for mt in spec.model_types}


def _config_of(model_or_config: nn.Module | PretrainedConfig) -> PretrainedConfig:
    return model_or_config if isinstance(model_or_config, PretrainedConfig) else model_or_config.config


def spec_for(model_or_config: nn.Module | PretrainedConfig) -> ArchSpec:
    """The registry entry for a model or config, keyed by ``config.model_type``."""
    config = _config_of(model_or_config)
    model_type = getattr(config, "model_type", None)
    spec = _BY_MODEL_TYPE.get(str(model_type))
    if spec is None:
        where = getattr(config, "_name_or_path", "") or "model"
        supported = sorted(_BY_MODEL_TYPE)
        problem = f"{model_type!r} is not a supported architecture; use one of {supported}"
        raise InputError(where, "model_type", problem)
    return spec


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The language model's config: ``config.text_config`` for VLMs, else the config itself."""
    return getattr(config, "text_config", None) or config


def _module_at(model: nn.Module, path: str) -> nn.Module | None:
    module: nn.Module | None = model
    for part in path.split("."):
        module = getattr(module, part, None)
    return module if isinstance(module, nn.Module) else None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The language model's decoder layers; the top model must be the task model, not a bare backbone."""
    spec = spec_for(model)
    layers = _module_at(model, spec.layers)
    if not isinstance(layers, nn.ModuleList):
        raise InputError(
            type(model).__name__,
            "model",
            f"no decoder layers at {spec.layers!r}; load the full model "
            "(AutoModelForCausalLM / AutoModelForImageTextToText), not a bare backbone",
        )
    return layers


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def _check_layer(model: nn.Module, layer: int, where: str, field: str) -> nn.Module:
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise InputError(
            where, field, f"layer {layer} is out of range; this model has layers 0..{len(layers) - 1}"
        )
    return layers[layer]


def _site_suffix(spec: ArchSpec, layer_module: nn.Module, site: Site, where: str) -> str:
    if site.kind == "resid":
        return ""
    attn_names = [spec.attn] + ([spec.cross_attn] if spec.cross_attn else [])
    names = [spec.mlp] if site.kind == "mlp" else attn_names
    for name in names:
        if _module_at(layer_module, name) is not None:
            return "." + name
    raise InputError(where, "site", f"layer {site.layer} has no {site.kind} module (looked for {names})")


def site_module_name(model: nn.Module, site: str | Site, where: str = "site") -> str:
    """Full in-memory name of the module whose forward output is the site's activation.

    Mllama cross-attention layers are skipped in a text-only forward, so hooks there fire only
    when images are given; their ``.attn`` site is the cross-attention output before the tanh gate.
    """
    parsed = site if isinstance(site, Site) else parse_site(site, where)
    spec = spec_for(model)
    layer_module = _check_layer(model, parsed.layer, where, "site")
    return f"{spec.layers}.{parsed.layer}{_site_suffix(spec, layer_module, parsed, where)}"


def resolve_site(model: nn.Module, site: str | Site, where: str = "site") -> nn.Module:
    """The module to hook for a site: decoder layer (resid), its mlp or its attention (mlp/attn)."""
    return model.get_submodule(site_module_name(model, site, where))


def residual_writers(
    model: nn.Module,
    layers: Iterable[int],
    include_embed: bool = False,
    include_extra: bool = False,
    where: str = "layers",
) -> dict[str, nn.Module]:
    """Modules whose outputs are added into the residual stream, by full in-memory name.

    These are the weights an edit can be folded into; only modules present on a layer are listed
    (Mllama cross-attention layers have ``cross_attn.o_proj`` instead of ``self_attn.o_proj``).
    """
    spec = spec_for(model)
    found: dict[str, nn.Module] = {}
    if include_embed:
        found[spec.embed] = model.get_submodule(spec.embed)
    for layer in layers:
        layer_module = _check_layer(model, layer, where, "layer")
        for writer in spec.writers:
            module = _module_at(layer_module, writer)
            if module is not None:
                found[f"{spec.layers}.{layer}.{writer}"] = module
    if include_extra:
        for name in spec.extra_writers:
            found[name] = model.get_submodule(name)
    return found


def text_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The language model's and its head's parameters, each once (a tied head is the embedding)."""
    spec = spec_for(model)
    found = {
        id(p): p for path in (spec.text_model, spec.lm_head) for p in model.get_submodule(path).parameters()
    }
    return list(found.values())


def lora_targets(model: nn.Module) -> str:
    """PEFT ``target_modules`` (a regex PEFT full-matches against module names): every adapted
    projection of every decoder layer, and nothing in a vision tower or projector."""
    spec = spec_for(model)
    names = "|".join(re.escape(name) for name in spec.adapted)
    return rf"{re.escape(spec.layers)}\.\d+\.({names})"


def _disk_candidates(spec: ArchSpec, module_name: str) -> list[str]:
    """On-disk names for ``module_name``, preferred first, from the longest matching in-memory prefix."""
    matches = [
        (mem, disk)
        for mem, disk in spec.disk_prefixes
        if module_name == mem or module_name.startswith(mem + ".")
    ]
    if not matches:
        return [module_name]
    longest = max(len(mem) for mem, _ in matches)
    return [disk + module_name[len(mem) :] for mem, disk in matches if len(mem) == longest]


def disk_key(model: nn.Module, module_name: str) -> str:
    """The tensor-key prefix ``save_pretrained`` (transformers 5.23) writes for an in-memory module."""
    return _disk_candidates(spec_for(model), module_name)[0]


def disk_key_in(keys: Collection[str], model: nn.Module, module_name: str, where: str = "checkpoint") -> str:
    """The tensor-key prefix of ``module_name`` in a given checkpoint, whichever known layout it uses."""
    candidates = _disk_candidates(spec_for(model), module_name)
    for candidate in candidates:
        if any(key.startswith(candidate + ".") for key in keys):
            return candidate
    raise InputError(where, module_name, f"no tensor keys found under any of {candidates}")


def tied_embeddings(model: nn.Module) -> bool:
    """Whether editing the input embedding would also edit ``lm_head`` (shared storage or tie flag).

    The flag matters even when storage is not shared: with it set (and the class declaring tied
    keys), ``save_pretrained`` drops ``lm_head`` and loading re-ties it to the (edited) embedding.
    """
    spec = spec_for(model)
    embed = model.get_submodule(spec.embed).weight
    head = model.get_submodule(spec.lm_head).weight
    # meta tensors (a dry run) all report data_ptr 0: only identity says they share storage there
    real = embed.device.type != "meta"
    shared = embed is head or (real and embed.shape == head.shape and embed.data_ptr() == head.data_ptr())
    flagged = bool(getattr(model, "_tied_weights_keys", None)) and (
        getattr(_config_of(model), "tie_word_embeddings", False) is True
    )
    return shared or flagged
