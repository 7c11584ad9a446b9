"""Score many edits at one residual site by replaying only the layers above it.

Calibration scores hundreds of edits on the same validation batches, and an edit at ``layers.L``
changes nothing below it: the vision tower, the embeddings and layers ``0..L`` give the same site
output every time. One full forward per batch stores that output and the keyword arguments each
later decoder layer received (attention mask, rotary embeddings); an edit is then scored by editing
the stored output and running layers ``L+1..``, the final norm and ``lm_head`` alone. The replay of
the unedited model is checked against the full forward once per batch; a model where it differs
(or a site inside a layer) is scored with full hooked forwards instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sauce_export.architectures import decoder_layers, site_module_name, spec_for
from sauce_export.edit import Edit
from sauce_export.fold import edit_mask
from sauce_export.hooks import hidden_of
from sauce_export.lm import Batch, correct
from sauce_export.sites import parse_site

TOLERANCE = 1e-4
"""Largest |logit| difference between replay and full forward of the unedited model accepted."""


@dataclass
class _Cached:
    batch: Batch
    site_out: torch.Tensor
    layer_kwargs: list[dict[str, Any]]


class Replay:
    """The site outputs of fixed batches, and correctness under any edit at that site."""

    def __init__(self, model: nn.Module, site: str, encoded: Sequence[Batch]) -> None:
        self.model = model
        parsed = parse_site(site)
        spec = spec_for(model)
        layers = decoder_layers(model)
        self.later = list(layers[parsed.layer + 1 :])
        self.norm = model.get_submodule(spec.final_norm)
        self.lm_head = model.get_submodule(spec.lm_head)
        self.site_module = model.get_submodule(site_module_name(model, parsed))
        self.exact = parsed.kind == "resid"
        self.cached: list[_Cached] = []
        self.original: dict[str, bool] = {}
        for batch in encoded:
            cached, logits = self._capture(batch)
            self.original.update(_rows_ok(logits, batch))
            self.exact = self.exact and bool(
                (self._replay(cached, cached.site_out) - logits).abs().max() <= TOLERANCE
            )
            self.cached.append(cached)
        if not self.exact:  # full forwards: the stored tensors are not needed
            self.cached = [_Cached(c.batch, torch.empty(0), []) for c in self.cached]

    @torch.no_grad()
    def _capture(self, batch: Batch) -> tuple[_Cached, torch.Tensor]:
        """One full forward (no KV cache): the site output and later layers' kwargs, and the logits."""
        seen: dict[str, Any] = {"kwargs": []}

        def site_hook(_m: nn.Module, _a: object, out: object) -> None:
            seen["h"] = hidden_of(out)

        def layer_hook(_m: nn.Module, _args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen["kwargs"].append(dict(kwargs))

        handles = [self.site_module.register_forward_hook(site_hook)]
        handles += [layer.register_forward_pre_hook(layer_hook, with_kwargs=True) for layer in self.later]
        try:
            logits = self.model(**batch.inputs, use_cache=False).logits
        finally:
            for handle in handles:
                handle.remove()
        return _Cached(batch, seen["h"], seen["kwargs"]), logits

    @torch.no_grad()
    def _replay(self, cached: _Cached, h: torch.Tensor) -> torch.Tensor:
        for layer, kwargs in zip(self.later, cached.layer_kwargs, strict=True):
            h = hidden_of(layer(h, **kwargs))
        return self.lm_head(self.norm(h))

    @torch.no_grad()
    def logits(self, edit: Edit, index: int) -> torch.Tensor:
        """Logits of batch ``index`` under ``edit``."""
        cached = self.cached[index]
        if not self.exact:
            with edit.apply(self.model):
                return self.model(**cached.batch.inputs, use_cache=False).logits
        mask = edit_mask(edit, cached.batch.inputs["input_ids"])
        return self._replay(cached, edit.edit_hidden(cached.site_out, mask))

    @torch.no_grad()
    def full_correctness(self) -> dict[str, bool]:
        """Row id -> exact greedy answer of full forwards (whatever hooks or patch the model carries)."""
        out: dict[str, bool] = {}
        for cached in self.cached:
            out.update(_rows_ok(self.model(**cached.batch.inputs, use_cache=False).logits, cached.batch))
        return out

    def correctness(self, edit: Edit | None, start: int = 0, stop: int | None = None) -> dict[str, bool]:
        """Row id -> exact greedy answer under ``edit`` (None: the original) on batches ``start:stop``."""
        out: dict[str, bool] = {}
        for index in range(len(self.cached))[start:stop]:
            batch = self.cached[index].batch
            if edit is None:
                out.update({r.id: self.original[r.id] for r in batch.rows})
            else:
                out.update(_rows_ok(self.logits(edit, index), batch))
        return out

    def __len__(self) -> int:
        return len(self.cached)

    def rows_in(self, index: int) -> int:
        return len(self.cached[index].batch.rows)


def _rows_ok(logits: torch.Tensor, batch: Batch) -> dict[str, bool]:
    ok = correct(logits, batch)
    return {r.id: bool(g) for r, g in zip(batch.rows, ok.tolist(), strict=True)}
