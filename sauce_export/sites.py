"""One canonical name for a site, whatever tool named it.

Canonical form: ``layers.L`` (residual stream at the output of decoder layer L of the language
model), ``layers.L.mlp`` (MLP output) or ``layers.L.attn`` (attention output). SAELens hook names
(``blocks.2.hook_resid_post``), sparsify hookpoints and HF module names
(``model.language_model.layers.2.mlp``) all map onto it, so layer-index ambiguity between SAE
formats is resolved in exactly one place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from sauce_export.errors import InputError

SiteKind = Literal["resid", "mlp", "attn"]

_KIND_SUFFIX: dict[str, SiteKind] = {
    "": "resid",
    "hook_resid_post": "resid",
    "mlp": "mlp",
    "hook_mlp_out": "mlp",
    "self_attn": "attn",
    "attn": "attn",
    "hook_attn_out": "attn",
}
_PATTERN = re.compile(r"^(?:.*\.)?(?:layers|blocks|h)\.(\d+)(?:\.(\w+))?$")


@dataclass(frozen=True)
class Site:
    layer: int
    kind: SiteKind = "resid"

    def __str__(self) -> str:
        return f"layers.{self.layer}" + ("" if self.kind == "resid" else f".{self.kind}")


def parse_site(name: str, where: str = "site") -> Site:
    """Parse any supported hookpoint spelling into a ``Site``; unknown spellings are an InputError."""
    match = _PATTERN.match(name.strip())
    if match is None or (match.group(2) or "") not in _KIND_SUFFIX:
        raise InputError(
            where,
            "site",
            f"unknown site name {name!r}; use layers.L, layers.L.mlp or layers.L.attn "
            "(SAELens blocks.L.hook_resid_post and HF module names are accepted too)",
        )
    return Site(int(match.group(1)), _KIND_SUFFIX[match.group(2) or ""])


def canonical_site(name: str, where: str = "site") -> str:
    return str(parse_site(name, where))
