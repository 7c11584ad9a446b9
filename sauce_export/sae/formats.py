"""Save our SAEs; load ours, SAELens and sparsify (eai-sparsify) directories as one ``SAE``.

Layouts (read from the libraries' own save code, SAELens 6.x and eai-sparsify 1.3):

- ours: ``cfg.json`` (``format: sauce-export-sae`` + ``SaeConfig``) and ``sae.safetensors``
  (``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``, ``b_dec``, ``threshold``).
- SAELens (``SAE.save_model``): ``cfg.json`` (``architecture``, ``d_in``, ``d_sae``, ``k``,
  ``apply_b_dec_to_input``, ``normalize_activations``, ``metadata.{model_name, hook_name}``; before 6.0
  the metadata keys sit at the top level) and ``sae_weights.safetensors`` with our tensor layout.
- sparsify (``SparseCoder.save_to_disk``): ``cfg.json`` (``k``, ``num_latents``/``expansion_factor``,
  ``activation``, ``d_in``, ...) and ``sae.safetensors`` (``encoder.weight [d_sae, d_in]``,
  ``encoder.bias``, ``W_dec``, ``b_dec``). The directory name is the hookpoint; the trainer writes the
  model name into ``config.json`` of the run directory above it.

Loading maps every format onto ``SAE`` so ``encode``/``decode`` give the library's numbers, and fails
loudly (``InputError``) on anything that would silently change them or that does not match the model.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sauce_export.errors import InputError
from sauce_export.sae.model import SAE, SaeConfig, SaeKind
from sauce_export.sites import canonical_site

FORMAT = "sauce-export-sae"
FORMAT_VERSION = 1
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"  # ours and sparsify's
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_SCALER_FILE = "activation_scaler.json"
SAELENS_WHITENING_FILE = "activation_whitening.safetensors"
SPARSIFY_RUN_CFG_FILE = "config.json"

Format = Literal["sauce", "saelens", "sparsify"]
_SAELENS_KINDS: dict[str, SaeKind] = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}


# ----------------------------------------------------------------------------------------- saving


def save_sae(sae: SAE, directory: str | Path) -> Path:
    """Write ``sae`` as ``directory/{cfg.json, sae.safetensors}``.

    Written into a temporary sibling and renamed into place, so a crash never leaves a half-written
    SAE that a later run would load. Replaces an existing SAE of ours; refuses any other directory.
    """
    target = Path(directory)
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and _detect(target) != "sauce")):
        raise InputError(
            str(target), "directory", "exists and is not a sauce-export SAE; refusing to overwrite"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        tensors = {name: t.detach().cpu().contiguous() for name, t in sae.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        cfg = {"format": FORMAT, "format_version": FORMAT_VERSION, **sae.cfg.to_dict()}
        (tmp / CFG_FILE).write_text(json.dumps(cfg, indent=2, default=str) + "\n")
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# ---------------------------------------------------------------------------------------- loading


def load_sae(
    path: str | Path,
    *,
    d_in: int | None = None,
    site: str | None = None,
    model: str | None = None,
    where: str | None = None,
) -> SAE:
    """Load an SAE directory of any supported format and check it against what it will be used on.

    ``d_in`` (the site's width), ``site`` (any spelling ``canonical_site`` accepts) and ``model``
    (path or Hub id; basenames may match) are checked when given; a mismatch is an ``InputError``.
    ``path`` may also be a sparsify run directory holding one subdirectory per hookpoint (``site``
    picks one) or a file inside an SAE directory. ``where`` names the SAE in error messages.
    """
    where = where or str(path)
    directory = _sae_directory(Path(path), site, where)
    kind = _detect(directory)
    if kind is None:
        if (directory / CFG_FILE).is_file():
            _read_json(directory / CFG_FILE, where)  # an unreadable cfg.json says so
        raise InputError(
            where,
            "format",
            f"not an SAE directory: expected {CFG_FILE} with {WEIGHTS_FILE} (sauce-export or sparsify) "
            f"or with {SAELENS_WEIGHTS_FILE} (SAELens)",
        )
    cfg = _read_json(directory / CFG_FILE, where)
    loader = {"sauce": _load_ours, "saelens": _load_saelens, "sparsify": _load_sparsify}[kind]
    sae = loader(directory, cfg, where)
    check_sae(sae, d_in=d_in, site=site, model=model, where=where)
    return sae


def _detect(directory: Path) -> Format | None:
    if not (directory / CFG_FILE).is_file():
        return None
    if (directory / SAELENS_WEIGHTS_FILE).is_file():
        return "saelens"
    if not (directory / WEIGHTS_FILE).is_file():
        return None
    try:
        cfg = json.loads((directory / CFG_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    if cfg.get("format") == FORMAT:
        return "sauce"
    if "d_in" in cfg and ("num_latents" in cfg or "expansion_factor" in cfg):
        return "sparsify"
    return None


def _sae_directory(path: Path, site: str | None, where: str) -> Path:
    """The SAE directory ``path`` means: itself, its parent (a file) or one hookpoint of a run."""
    if not path.exists():
        raise InputError(where, "path", "does not exist")
    if path.is_file():
        return path.parent
    if (path / CFG_FILE).is_file():
        return path
    hooks = sorted(p for p in path.iterdir() if p.is_dir() and _detect(p) is not None)
    if site is not None and hooks:
        want = canonical_site(site, "site")
        hooks = [p for p in hooks if _maybe_canonical(p.name) == want]
        if not hooks:
            raise InputError(where, "site", f"no SAE for site {want} in this directory")
    if len(hooks) == 1:
        return hooks[0]
    if len(hooks) > 1:
        names = ", ".join(p.name for p in hooks)
        raise InputError(where, "site", f"holds SAEs for several hookpoints ({names}); say which site")
    return path  # not an SAE directory: load_sae says so


def _load_ours(directory: Path, cfg: dict[str, Any], where: str) -> SAE:
    known = {f.name for f in fields(SaeConfig)}
    for required in ("d_in", "d_sae"):
        if required not in cfg:
            raise InputError(where, required, f"missing from {CFG_FILE}")
    sae = SAE(SaeConfig(**{k: v for k, v in cfg.items() if k in known}))
    tensors = _read_tensors(directory / WEIGHTS_FILE, where)
    expected = {name: tuple(t.shape) for name, t in sae.state_dict().items()}
    for name, shape in expected.items():
        if name not in tensors or tuple(tensors[name].shape) != shape:
            got = tuple(tensors[name].shape) if name in tensors else "missing"
            raise InputError(where, name, f"expected a tensor of shape {shape}, got {got}")
    for name in expected:
        if tensors[name].is_floating_point() and not torch.isfinite(tensors[name]).all():
            raise InputError(where, name, f"contains NaN or inf ({WEIGHTS_FILE})")
    sae.load_state_dict({k: tensors[k] for k in expected}, assign=True)  # keep dtype: bit-exact
    return sae


def _load_saelens(directory: Path, cfg: dict[str, Any], where: str) -> SAE:
    meta: dict[str, Any] = cfg["metadata"] if isinstance(cfg.get("metadata"), dict) else cfg
    act = cfg.get("activation_fn_str") or cfg.get("activation_fn")  # SAELens < 6 spellings
    arch = cfg.get("architecture") or ("topk" if act == "topk" else "standard")
    if arch not in _SAELENS_KINDS:
        raise InputError(
            where, "architecture", f"SAELens {arch!r} SAEs are not supported (use standard, topk or jumprelu)"
        )
    head = meta.get("hook_head_index", cfg.get("hook_point_head_index"))
    if cfg.get("reshape_activations", "none") != "none" or head is not None:
        raise InputError(where, "reshape_activations", "per-head (hook_z) SAEs are not supported")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if arch == "topk" and not k:
        raise InputError(where, "k", f"missing from {CFG_FILE} for a topk SAE")
    t = _read_tensors(directory / SAELENS_WEIGHTS_FILE, where)
    if "log_threshold" in t:  # older JumpReLU checkpoints, as SAELens converts them
        t["threshold"] = t.pop("log_threshold").exp()
    need = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if arch == "jumprelu" else [])
    w = {name: _tensor(t, name, where, SAELENS_WEIGHTS_FILE).double() for name in need}
    d_in, d_sae = _check_shapes(w, cfg, where)
    if "scaling_factor" in t and not torch.all(t["scaling_factor"] == 1):
        raise InputError(where, "finetuning_scaling_factor", "a fine-tuning scaling factor is not supported")

    extra: dict[str, object] = {"format": "saelens", "source_cfg": cfg}
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        # SAELens ranks pre * |W_dec| and decodes f / |W_dec|: the same as unit rows and a scaled encoder.
        # Done before the normalisation fold because the norms are those of the normalised space.
        n = w["W_dec"].norm(dim=1)
        w["W_enc"], w["b_enc"], w["W_dec"] = w["W_enc"] * n, w["b_enc"] * n, w["W_dec"] / n[:, None]
    norm = cfg.get("normalize_activations") or "none"
    norm = {True: "expected_average_only_in", False: "none"}.get(norm, norm)
    apply_b_dec = bool(cfg.get("apply_b_dec_to_input", True))
    if norm != "none":
        _fold_saelens_normalisation(w, norm, apply_b_dec, directory, where)
        extra["activation_normalization"] = norm
        warnings.warn(
            f"{where}: SAE was trained on normalised activations ({norm}); the normalisation was folded "
            "into its weights exactly, but check the edit on real inputs",
            stacklevel=3,
        )
    if not apply_b_dec:
        # SAELens encodes x @ W_enc + b_enc; we always encode (x - b_dec) @ W_enc + b_enc'.
        w["b_enc"] = w["b_enc"] + w["b_dec"] @ w["W_enc"]
    if arch == "jumprelu":
        # SAELens gates relu(pre) by pre > threshold; with threshold clamped at 0, pre * (pre > t) is equal.
        w["threshold"] = w["threshold"].clamp_min(0)
    hook = str(meta.get("hf_hook_name") or meta.get("hook_name") or cfg.get("hook_point") or "")
    extra["hook_name"] = hook
    return _build(
        SaeConfig(
            d_in=d_in,
            d_sae=d_sae,
            kind=_SAELENS_KINDS[arch],
            k=int(k or 32),
            site=_maybe_canonical(hook) or "",  # an unknown hook name stays in extra, and fails _check
            model=str(meta.get("model_name") or ""),
            extra=extra,
        ),
        w,
    )


def _fold_saelens_normalisation(
    w: dict[str, torch.Tensor], norm: str, apply_b_dec: bool, directory: Path, where: str
) -> None:
    """Fold SAELens' affine input normalisation into the weights, as its trainer does after training.

    SAELens' own inference skips ``expected_average_only_in`` when the factor is not folded, silently
    feeding unscaled activations; we fold it from the trainer's ``activation_scaler.json`` or refuse.
    Per-token normalisations (``layer_norm``, ``constant_norm_rescale``) are not affine: refused.
    """
    scaler_path = directory / SAELENS_SCALER_FILE
    scaler = _read_json(scaler_path, where) if scaler_path.is_file() else {}
    if norm == "expected_average_only_in" and scaler.get("scaling_factor"):
        s = float(scaler["scaling_factor"])
        w["W_enc"], w["W_dec"], w["b_dec"] = w["W_enc"] * s, w["W_dec"] / s, w["b_dec"] / s
        return
    if norm == "covariance_whitening" and (directory / SAELENS_WHITENING_FILE).is_file():
        wh = {k: v.double() for k, v in _read_tensors(directory / SAELENS_WHITENING_FILE, where).items()}
        mean, m, m_inv = wh["mean"], wh["matrix"], wh["inverse_matrix"]
        w["W_enc"] = m @ w["W_enc"]
        w["W_dec"] = w["W_dec"] @ m_inv
        w["b_dec"] = w["b_dec"] @ m_inv + mean
        if not apply_b_dec:  # the mean is no longer removed through b_dec: remove it through b_enc
            w["b_enc"] = w["b_enc"] - mean @ w["W_enc"]
        return
    if norm in ("expected_average_only_in", "covariance_whitening"):
        problem = (
            f"{norm} statistics not found ({SAELENS_SCALER_FILE}); fold them into the weights and re-save"
        )
    else:
        problem = f"{norm!r} is a per-token, non-affine input normalisation that our SAE cannot reproduce"
    raise InputError(where, "normalize_activations", problem)


def _load_sparsify(directory: Path, cfg: dict[str, Any], where: str) -> SAE:
    if cfg.get("activation", "topk") != "topk":
        raise InputError(
            where, "activation", f"sparsify {cfg['activation']!r} SAEs are not supported (topk only)"
        )
    for flag in ("transcode", "skip_connection"):
        if cfg.get(flag):
            raise InputError(where, flag, f"sparsify SAEs with {flag}=true are not supported")
    t = _read_tensors(directory / WEIGHTS_FILE, where)
    w = {
        "W_enc": _tensor(t, "encoder.weight", where, WEIGHTS_FILE).T,
        "b_enc": _tensor(t, "encoder.bias", where, WEIGHTS_FILE),
        "W_dec": _tensor(t, "W_dec", where, WEIGHTS_FILE),
        "b_dec": _tensor(t, "b_dec", where, WEIGHTS_FILE),
    }
    d_in, d_sae = _check_shapes(w, cfg, where)
    # sparsify names the directory after the hookpoint (plus /seedN when several seeds were trained).
    hook_dir = directory.parent if re.fullmatch(r"seed\d+", directory.name) else directory
    run_cfg_path = hook_dir.parent / SPARSIFY_RUN_CFG_FILE
    run_cfg = _read_json(run_cfg_path, where) if run_cfg_path.is_file() else {}
    if "sae" not in run_cfg:  # not sparsify's run config (e.g. a model's config.json): no model name
        run_cfg = {}
    return _build(
        SaeConfig(
            d_in=d_in,
            d_sae=d_sae,
            kind="topk",
            k=int(_require(cfg, "k", where)),
            site=_maybe_canonical(hook_dir.name) or "",
            model=str(run_cfg.get("model") or ""),
            extra={"format": "sparsify", "source_cfg": cfg, "hookpoint": hook_dir.name},
        ),
        w,
    )


def _build(cfg: SaeConfig, w: dict[str, torch.Tensor]) -> SAE:
    sae = SAE(cfg)
    with torch.no_grad():
        for name, value in w.items():
            getattr(sae, name).copy_(value)
    norms = sae.W_dec.norm(dim=1)
    cfg.extra["decoder_unit_norm"] = bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-3))
    return sae


# ---------------------------------------------------------------------------------------- checks


def check_sae(
    sae: SAE, *, d_in: int | None = None, site: str | None = None, model: str | None = None, where: str
) -> None:
    """``InputError`` unless ``sae`` reads width ``d_in``, was trained at ``site`` and on ``model`` (each
    checked when given; an SAE that records no site or model gets a warning)."""
    if d_in is not None and sae.cfg.d_in != d_in:
        raise InputError(where, "d_in", f"SAE reads width {sae.cfg.d_in}, but the site has width {d_in}")
    if site is not None:
        want = canonical_site(site, "site")
        recorded = sae.cfg.site or str(sae.cfg.extra.get("hook_name") or "")
        if not recorded:
            warnings.warn(f"{where}: SAE does not record its site; cannot check it is {want}", stacklevel=3)
        elif _maybe_canonical(recorded) != want:
            raise InputError(where, "site", f"SAE was trained on {recorded!r}, expected site {want}")
    if model is not None:
        if not sae.cfg.model:
            warnings.warn(f"{where}: SAE does not record its model; cannot check it is {model}", stacklevel=3)
        elif not same_model(sae.cfg.model, model):
            raise InputError(where, "model", f"SAE was trained on {sae.cfg.model!r}, expected {model!r}")


def same_model(a: str, b: str) -> bool:
    """Loose model identity: equal ids, or equal last path components (``org/name`` vs ``/ckpt/name``)."""
    a, b = a.strip().rstrip("/").lower(), b.strip().rstrip("/").lower()
    return a == b or a.rsplit("/", 1)[-1] == b.rsplit("/", 1)[-1]


def _maybe_canonical(name: str) -> str | None:
    try:
        return canonical_site(name)
    except InputError:
        return None


def _check_shapes(w: dict[str, torch.Tensor], cfg: dict[str, Any], where: str) -> tuple[int, int]:
    """``(d_in, d_sae)`` from the encoder, after checking every tensor and ``cfg.json`` agree with it."""
    d_in, d_sae = w["W_enc"].shape
    for key, value in (("d_in", d_in), ("d_sae", d_sae), ("num_latents", d_sae)):
        if cfg.get(key) and cfg[key] != value:
            raise InputError(where, key, f"{CFG_FILE} says {cfg[key]}, the weights have {value}")
    shapes = {
        "W_enc": (d_in, d_sae),
        "b_enc": (d_sae,),
        "W_dec": (d_sae, d_in),
        "b_dec": (d_in,),
        "threshold": (d_sae,),
    }
    for name, value in w.items():
        if tuple(value.shape) != shapes[name]:
            raise InputError(where, name, f"expected shape {shapes[name]}, got {tuple(value.shape)}")
        if not torch.isfinite(value).all():
            raise InputError(where, name, "contains NaN or inf")
    return d_in, d_sae


def _require(cfg: dict[str, Any], key: str, where: str) -> Any:
    if cfg.get(key) is None:
        raise InputError(where, key, f"missing from {CFG_FILE}")
    return cfg[key]


def _tensor(t: dict[str, torch.Tensor], name: str, where: str, file: str) -> torch.Tensor:
    if name not in t:
        raise InputError(where, name, f"missing from {file}")
    return t[name]


def _read_tensors(path: Path, where: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise InputError(where, path.name, f"unreadable safetensors file: {e}") from e


def _read_json(path: Path, where: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(where, path.name, f"unreadable JSON: {e}") from e
    if not isinstance(data, dict):
        raise InputError(where, path.name, "expected a JSON object")
    return data
