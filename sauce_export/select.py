"""Which SAE latents carry a concept: per-latent statistics, two scores, and top-n/percentile picks.

Statistics stream over activation chunks (``[n, d_in]`` tensors of the site), so a selection never
needs all tokens in memory. Positives are tokens of the concept, negatives everything else.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sauce_export.errors import InputError
from sauce_export.sae.model import SAE

_EPS = 1e-8


@dataclass
class ConceptStats:
    """Per-latent mean activation and firing frequency (fraction of tokens with ``f > 0``).

    Means are over tokens, zeros included, so ``mu / freq`` is the mean activation *when firing*.
    """

    mu_pos: torch.Tensor
    mu_neg: torch.Tensor
    freq_pos: torch.Tensor
    freq_neg: torch.Tensor
    n_pos: int
    n_neg: int


def _accumulate(
    sae: SAE, chunks: Iterable[torch.Tensor], side: str
) -> tuple[torch.Tensor, torch.Tensor, int]:
    d_sae = sae.cfg.d_sae
    total = torch.zeros(d_sae, dtype=torch.float64)
    fired = torch.zeros(d_sae, dtype=torch.float64)
    n = 0
    param = sae.W_enc
    with torch.no_grad():
        for chunk in chunks:
            if chunk.ndim != 2 or chunk.shape[-1] != sae.cfg.d_in:
                raise InputError(
                    f"{side} activations",
                    "shape",
                    f"expected [n, {sae.cfg.d_in}] chunks for this SAE, got {list(chunk.shape)}",
                )
            f = sae.encode(chunk.to(device=param.device, dtype=param.dtype))
            total += f.sum(0).to("cpu", torch.float64)
            fired += (f > 0).sum(0).to("cpu", torch.float64)
            n += chunk.shape[0]
    if n == 0:
        raise InputError(f"{side} activations", "tokens", "no tokens given; selection needs both sides")
    return total / n, fired / n, n


def concept_stats(sae: SAE, pos: Iterable[torch.Tensor], neg: Iterable[torch.Tensor]) -> ConceptStats:
    """Stream both token sets through the SAE once; statistics are float64 on the CPU."""
    mu_pos, freq_pos, n_pos = _accumulate(sae, pos, "positive")
    mu_neg, freq_neg, n_neg = _accumulate(sae, neg, "negative")
    return ConceptStats(mu_pos, mu_neg, freq_pos, freq_neg, n_pos, n_neg)


def saeuron_scores(stats: ConceptStats) -> torch.Tensor:
    """SAeUron's normalised mean difference.

    ``mu_i(pos) / (sum_j mu_j(pos) + 1e-8) - mu_i(neg) / (sum_j mu_j(neg) + 1e-8)``: the share of
    activation mass a latent holds on the concept minus its share elsewhere. Normalising by the
    total makes the two sides comparable when the concept's tokens are simply louder.
    """
    return stats.mu_pos / (stats.mu_pos.sum() + _EPS) - stats.mu_neg / (stats.mu_neg.sum() + _EPS)


def contrast_scores(stats: ConceptStats) -> torch.Tensor:
    """SAUCE-style contrast: ``(freq_pos - freq_neg) * mean activation when firing on the concept``.

    Why this form: the reference edit is gated (it acts only where the latent fires), so its
    footprint is exactly the set of tokens where the latent fires. ``freq_pos - freq_neg`` (Youden's J
    of "latent fires" as a concept detector) is coverage of the concept minus collateral firing
    elsewhere, and it penalises firing on other tokens *however weak*: with a negative clamp every
    such token is moved by at least ``|c|``, so collateral damage scales with frequency, not
    magnitude (unlike a plain mean difference). The factor ``mu_pos / freq_pos`` (the size of the
    edit on a concept token at c=0, decoder rows being unit-norm) prefers latents whose removal
    actually moves the concept tokens, and breaks the many ties J has on small samples.
    """
    strength = torch.where(stats.freq_pos > 0, stats.mu_pos / stats.freq_pos.clamp_min(_EPS), 0.0)
    return (stats.freq_pos - stats.freq_neg) * strength


@dataclass
class GroupSums:
    """Per-latent activation sums and firing counts of each group of tokens (float64, CPU), from
    one pass over the activations: every concept of a kind and every score reads the same sums."""

    total: torch.Tensor
    """[groups, d_sae] sum of ``f`` over the group's tokens."""
    fired: torch.Tensor
    """[groups, d_sae] number of the group's tokens with ``f > 0``."""
    count: torch.Tensor
    """[groups] tokens per group."""

    def stats(self, group: int) -> ConceptStats:
        """Positives: the group's tokens; negatives: every other token."""
        n_pos, n_all = float(self.count[group]), float(self.count.sum())
        if n_pos == 0 or n_pos == n_all:
            side = "positive" if n_pos == 0 else "negative"
            raise InputError(f"{side} activations", "tokens", "no tokens given; selection needs both sides")
        rest = n_all - n_pos
        return ConceptStats(
            mu_pos=self.total[group] / n_pos,
            mu_neg=(self.total.sum(0) - self.total[group]) / rest,
            freq_pos=self.fired[group] / n_pos,
            freq_neg=(self.fired.sum(0) - self.fired[group]) / rest,
            n_pos=int(n_pos),
            n_neg=int(rest),
        )

    def means(self) -> torch.Tensor:
        """[groups, d_sae] mean activation per group (zeros where a group has no tokens)."""
        return self.total / self.count.clamp_min(1)[:, None]


def group_sums(sae: SAE, chunks: Iterable[tuple[torch.Tensor, torch.Tensor]], n_groups: int) -> GroupSums:
    """Stream ``(activations [n, d_in], group of each token [n])`` chunks through the SAE once."""
    d_sae, param = sae.cfg.d_sae, sae.W_enc
    total = torch.zeros(n_groups, d_sae, dtype=torch.float64)
    fired = torch.zeros(n_groups, d_sae, dtype=torch.float64)
    count = torch.zeros(n_groups, dtype=torch.float64)
    with torch.no_grad():
        for acts, groups in chunks:
            if acts.ndim != 2 or acts.shape[-1] != sae.cfg.d_in:
                raise InputError(
                    "activations", "shape", f"expected [n, {sae.cfg.d_in}] chunks, got {list(acts.shape)}"
                )
            f = sae.encode(acts.to(device=param.device, dtype=param.dtype)).to("cpu", torch.float64)
            total.index_add_(0, groups, f)
            fired.index_add_(0, groups, (f > 0).to(torch.float64))
            count.index_add_(0, groups, torch.ones(len(groups), dtype=torch.float64))
    return GroupSums(total, fired, count)


def specific_scores(mu_target: torch.Tensor, mu_others: Sequence[torch.Tensor]) -> torch.Tensor:
    """A latent's activation share on the target minus its largest share on any *single* sibling.

    Siblings are the other values of the same kind (the other persons). SAeUron's score compares
    against the pooled rest, where a latent shared by the target and a few siblings (the badge's
    outer colour, common to 4 of 16 persons) still looks concept-specific, and clamping it then
    erases those siblings too. Comparing against the worst sibling ranks such latents low.
    """

    def share(mu: torch.Tensor) -> torch.Tensor:
        return mu / (mu.sum() + _EPS)

    return share(mu_target) - torch.stack([share(m) for m in mu_others]).max(dim=0).values


def select_features(
    scores: torch.Tensor,
    top_n: int | None = None,
    percentile: float | None = None,
    min_score: float = 0.0,
) -> list[int]:
    """Latent indices, best first: the ``top_n`` best, or all at or above the ``percentile``-th score.

    Exactly one rule is given. Only scores strictly above ``min_score`` qualify, so a latent that
    is no more typical of the concept than of the rest is never clamped. Ties go to the lower index,
    so selections are deterministic across runs and machines.
    """
    if (top_n is None) == (percentile is None):
        raise InputError("select", "top_n/percentile", "give exactly one of top_n and percentile")
    scores = scores.detach().to("cpu", torch.float64).flatten()
    if scores.numel() == 0:
        return []
    # Stable sort on -score keeps index order among equal scores.
    order = torch.sort(-scores, stable=True).indices
    keep = scores[order] > min_score
    if top_n is not None:
        if top_n < 0:
            raise InputError("select", "top_n", f"must be >= 0, got {top_n}")
        keep[top_n:] = False
    else:
        assert percentile is not None
        if not 0.0 <= percentile <= 100.0:
            raise InputError("select", "percentile", f"must be in [0, 100], got {percentile}")
        threshold = torch.quantile(scores, percentile / 100.0)
        keep &= scores[order] >= threshold
    return order[keep].tolist()


def union_features(lists: Iterable[Sequence[int]]) -> list[int]:
    """Features of several concepts, deduplicated and sorted (one SAE removes them all at once)."""
    return sorted({int(i) for features in lists for i in features})


def union_clamps(selected: Mapping[str, Sequence[int]], targets: Mapping[str, float]) -> list[float]:
    """The clamp target of each feature of ``union_features(selected.values())``: its concept's, or
    the most negative of them where several concepts selected it (removing one must not restore another)."""
    return [
        min(targets[c] for c, feats in selected.items() if f in feats)
        for f in union_features(selected.values())
    ]


def _vectors_path(path: Path) -> Path:
    return path.with_suffix(".safetensors")


def save_scores(
    path: str | Path,
    scores_by_concept: Mapping[str, torch.Tensor],
    selected: Mapping[str, Sequence[int]],
    top: int = 20,
) -> Path:
    """Write ``path`` (JSON: selected features and the ``top`` best scores per concept, for the
    model card) and ``path.with_suffix('.safetensors')`` (full score vectors). Returns the JSON path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    summary: dict[str, object] = {}
    vectors: dict[str, torch.Tensor] = {}
    for concept, scores in scores_by_concept.items():
        s = scores.detach().to("cpu", torch.float64).flatten()
        best = select_features(s, top_n=top, min_score=float("-inf"))
        chosen = [int(i) for i in selected.get(concept, [])]
        summary[concept] = {
            "d_sae": s.numel(),
            "selected": [{"feature": i, "score": float(s[i])} for i in chosen],
            "top": [{"feature": i, "score": float(s[i])} for i in best],
        }
        vectors[concept] = s.to(torch.float32).contiguous()
    path.write_text(json.dumps({"concepts": summary}, indent=2) + "\n")
    save_file(vectors, str(_vectors_path(path)))
    return path


def load_scores(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """Inverse of ``save_scores``: (full score vectors, selected features) per concept."""
    path = Path(path)
    if not path.is_file():
        raise InputError(str(path), "file", "scores file not found")
    concepts = json.loads(path.read_text()).get("concepts", {})
    selected = {c: [int(e["feature"]) for e in entry["selected"]] for c, entry in concepts.items()}
    vectors_path = _vectors_path(path)
    if not vectors_path.is_file():
        raise InputError(str(vectors_path), "file", "score vectors missing next to the JSON summary")
    vectors = load_file(str(vectors_path))
    missing = set(concepts) - set(vectors)
    if missing:
        raise InputError(str(vectors_path), "concepts", f"no score vector for {sorted(missing)}")
    return {c: vectors[c] for c in concepts}, selected
