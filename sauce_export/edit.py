"""The reference edit (delta-clamp): the ground truth every fold is measured against.

``h' = h + sum_{i in S} (target_i - f_i(h)) * W_dec[i]`` with ``target_i = clamp`` or
``multiplier * f_i``. Only the change of the selected latents is decoded, never the full
reconstruction, so the SAE's reconstruction error stays in ``h``; with ``only_where_active`` a
latent is edited only on tokens where it fires, and tokens where nothing is edited are returned
bit-identical (``torch.where`` on the original tensor, not ``h + 0``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from sauce_export.errors import InputError
from sauce_export.hooks import register_output_hook
from sauce_export.sae.model import SAE

Scope = Literal["all", "image", "text"]
_SCOPES = ("all", "image", "text")


@dataclass(frozen=True)
class Edit:
    """Clamp SAE latents ``features`` at ``site``; a value object, hooks only live inside ``apply``."""

    sae: SAE
    features: tuple[int, ...]
    site: str
    clamp: float | tuple[float, ...] = 0.0
    """Target value c for selected latents (0 removes them, negative pushes against them); one value,
    or one per feature (concepts removed together may need different targets)."""
    multiplier: float | None = None
    """If set, ``f_i -> multiplier * f_i`` (SAeUron's gamma) instead of the value ``clamp``."""
    only_where_active: bool = True
    """Edit a latent only on tokens where it fires (``f_i > 0``); elsewhere the token is untouched."""
    scope: Scope = "all"
    """Which tokens may be edited: all, image placeholder tokens only, or the rest (text)."""
    image_token_id: int | None = None

    def __post_init__(self) -> None:
        feats = tuple(int(i) for i in self.features)
        object.__setattr__(self, "features", feats)
        where = "edit"
        if not feats:
            raise InputError(where, "features", "no features selected; nothing to edit")
        if len(set(feats)) != len(feats):
            raise InputError(where, "features", f"duplicate feature indices in {list(feats)}")
        bad = [i for i in feats if not 0 <= i < self.sae.cfg.d_sae]
        if bad:
            raise InputError(
                where, "features", f"{bad} out of range for an SAE with {self.sae.cfg.d_sae} latents"
            )
        if isinstance(self.clamp, list | tuple):
            object.__setattr__(self, "clamp", tuple(float(c) for c in self.clamp))
            if len(self.clamp) != len(feats):
                raise InputError(
                    where,
                    "clamp",
                    f"{len(self.clamp)} values for {len(feats)} features: give one or one each",
                )
        if self.multiplier is None and max(self.clamps) > 0:
            raise InputError(
                where, "clamp", f"must be 0 or negative (a target that removes), got {self.clamp}"
            )
        if self.scope not in _SCOPES:
            raise InputError(where, "scope", f"must be one of {_SCOPES}, got {self.scope!r}")
        if self.scope != "all" and self.image_token_id is None:
            raise InputError(where, "image_token_id", f"scope {self.scope!r} needs the image token id")

    @property
    def clamps(self) -> tuple[float, ...]:
        """The clamp target of each selected feature, in ``features`` order."""
        if isinstance(self.clamp, tuple):
            return self.clamp
        return (float(self.clamp),) * len(self.features)

    # --- pure tensor functions -------------------------------------------------------------

    def _coefficients(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        """``target - f_S`` on ``x`` (already in the SAE's dtype/device), zero where not edited."""
        f = self.sae.encode(x)[..., list(self.features)]
        if self.multiplier is not None:
            target = f * self.multiplier
        else:
            target = torch.tensor(self.clamps, dtype=f.dtype, device=f.device).expand_as(f)
        coeff = target - f
        if self.only_where_active:
            coeff = torch.where(f > 0, coeff, torch.zeros_like(coeff))
        if token_mask is not None:
            mask = token_mask.to(device=coeff.device, dtype=torch.bool)
            coeff = torch.where(mask[..., None], coeff, torch.zeros_like(coeff))
        return coeff

    def _to_sae(self, h: torch.Tensor) -> torch.Tensor:
        w = self.sae.W_dec
        return h.to(device=w.device, dtype=w.dtype)

    def coefficients(self, h: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token ``target - f_S(h)``, shape ``[..., |S|]`` in the SAE's dtype; zero where inactive
        or outside ``token_mask``. The edit is ``h + coefficients(h) @ W_dec[S]``: folds regress onto it."""
        _check_mask(h, token_mask)
        return self._coefficients(self._to_sae(h), token_mask)

    def edit_hidden(self, h: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The edited hidden state ``[..., d]``; tokens with no edit are the original values, bit for bit.

        ``token_mask`` (``h.shape[:-1]``, bool) limits the edit to its True tokens. Computed in the
        SAE's dtype, returned in ``h``'s dtype and device.
        """
        _check_mask(h, token_mask)
        x = self._to_sae(h)
        coeff = self._coefficients(x, token_mask)
        touched = (coeff != 0).any(-1)
        if self.multiplier is None and not self.only_where_active:
            # A clamp applied everywhere touches every in-scope token, even where c - f is 0.
            touched = torch.ones_like(touched) if token_mask is None else token_mask.to(touched.device).bool()
        edited = (x + coeff @ self.sae.W_dec[list(self.features)]).to(device=h.device, dtype=h.dtype)
        return torch.where(touched.to(h.device)[..., None], edited, h)

    # --- hooks -------------------------------------------------------------------------------

    def apply(self, model: nn.Module) -> EditHandle:
        """Hook the edit into ``model`` now; use as ``with edit.apply(model): ...`` or call
        ``.remove()`` on the returned handle. ``model`` is the top module the caller runs (its
        ``input_ids`` give the image/text token mask, also at each ``generate()`` step)."""
        from sauce_export.architectures import resolve_site

        return EditHandle(self, model, resolve_site(model, self.site, where="edit.site"))

    # --- saving --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Everything but the SAE weights (saved on their own); the SAE shape is kept for checks."""
        return {
            "features": list(self.features),
            "site": self.site,
            "clamp": list(self.clamp) if isinstance(self.clamp, tuple) else self.clamp,
            "multiplier": self.multiplier,
            "only_where_active": self.only_where_active,
            "scope": self.scope,
            "image_token_id": self.image_token_id,
            "sae": {"d_in": self.sae.cfg.d_in, "d_sae": self.sae.cfg.d_sae, "kind": self.sae.cfg.kind},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], sae: SAE) -> Edit:
        """Rebuild from ``to_dict``; an SAE of another shape than the saved one is an InputError."""
        shape = d.get("sae", {})
        for key in ("d_in", "d_sae"):
            if key in shape and shape[key] != getattr(sae.cfg, key):
                raise InputError(
                    "edit",
                    f"sae.{key}",
                    f"edit saved for {shape[key]}, given SAE has {getattr(sae.cfg, key)}",
                )
        if "features" not in d or "site" not in d:
            raise InputError("edit", "features/site", "both are required")
        mult, clamp = d.get("multiplier"), d.get("clamp", 0.0)
        return cls(
            sae=sae,
            features=tuple(d["features"]),
            site=str(d["site"]),
            clamp=tuple(float(c) for c in clamp) if isinstance(clamp, list | tuple) else float(clamp),
            multiplier=None if mult is None else float(mult),
            only_where_active=bool(d.get("only_where_active", True)),
            scope=d.get("scope", "all"),
            image_token_id=d.get("image_token_id"),
        )


def _check_mask(h: torch.Tensor, token_mask: torch.Tensor | None) -> None:
    if token_mask is not None and tuple(token_mask.shape) != tuple(h.shape[:-1]):
        raise ValueError(
            f"token_mask shape {list(token_mask.shape)} does not match hidden {list(h.shape[:-1])}"
        )


class EditHandle:
    """The live hooks of one ``Edit`` on one model; a context manager and a removable handle."""

    def __init__(self, edit: Edit, model: nn.Module, site_module: nn.Module) -> None:
        self.edit = edit
        self._input_ids: torch.Tensor | None = None
        self._handles: list[RemovableHandle] = []
        if edit.scope != "all":
            # Record each forward's input_ids (during generate() with a KV cache: only the new
            # tokens, which are exactly the positions the site sees), and forget them afterwards so a
            # stale mask is never used.
            self._handles.append(model.register_forward_pre_hook(self._capture, with_kwargs=True))
            self._handles.append(model.register_forward_hook(self._release, always_call=True))
        self._handles.append(register_output_hook(site_module, self._hook))

    def _capture(self, _mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            ids = args[0]
        self._input_ids = ids

    def _release(self, *_: object) -> None:
        self._input_ids = None

    def _token_mask(self, h: torch.Tensor) -> torch.Tensor | None:
        edit = self.edit
        if edit.scope == "all":
            return None
        ids = self._input_ids
        if ids is None:
            raise RuntimeError(
                f"Edit scope {edit.scope!r} needs input_ids from the hooked model's forward; "
                "none were seen (inputs_embeds only, or the site ran outside that model's forward)"
            )
        if tuple(ids.shape) != tuple(h.shape[:-1]):
            raise RuntimeError(
                f"input_ids shape {list(ids.shape)} does not match the site's tokens {list(h.shape[:-1])}"
            )
        is_image = ids.to(h.device) == edit.image_token_id
        return is_image if edit.scope == "image" else ~is_image

    def _hook(self, h: torch.Tensor) -> torch.Tensor:
        return self.edit.edit_hidden(h, self._token_mask(h))

    def remove(self) -> None:
        """Remove every hook; safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._input_ids = None

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> EditHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()
