"""Train an SAE on cached or streamed activations and measure it (FVU, mean L0, dead latents).

The recipe follows sparsify/SAeUron: TopK activation, unit-norm decoder rows (the gradient component
parallel to each row is removed and rows are renormalised after every step), Adam, and the AuxK loss
that lets dead latents learn the residual the live ones miss. Training runs on a standardised copy of
the data (mean removed, unit mean squared norm) so lr, l1_coeff and the init do not depend on the
activation scale of the model; the affine standardisation is folded back into the weights at the end.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sauce_export import distributed
from sauce_export.errors import InputError
from sauce_export.progress import bar
from sauce_export.sae.model import SAE, SaeConfig, SaeKind

Data = torch.Tensor | Iterable[torch.Tensor]
"""A ``[n, d_in]`` tensor or a re-iterable of them (a list of shards, a store yielding shards)."""


@dataclass
class TrainConfig:
    """How to train an SAE; the field help doubles as CLI help."""

    kind: SaeKind = field(
        default="topk",
        metadata={
            "help": "Activation: topk (default, as sparsify/SAeUron; the tuned one), relu (+L1) or jumprelu (+L0)."
        },
    )
    expansion: int = field(
        default=8, metadata={"min": 1, "help": "Latents per input dimension (d_sae = expansion * d_in)."}
    )
    d_sae: int | None = field(
        default=None, metadata={"min": 1, "help": "Number of latents; overrides expansion when set."}
    )
    k: int = field(default=32, metadata={"min": 1, "help": "Active latents per token (topk only)."})
    lr: float | None = field(
        default=None,
        metadata={
            "above": 0,
            "help": "Adam learning rate; default 5e-3 * sqrt(128 / d_in): tuned at d_in=128 on standardised "
            "activations, scaled like the entries of unit-norm weight vectors.",
        },
    )
    batch_size: int = field(default=2048, metadata={"min": 1, "help": "Tokens per optimiser step."})
    epochs: float = field(
        default=6.0, metadata={"above": 0, "help": "Passes over the data (ignored when steps is set)."}
    )
    steps: int | None = field(
        default=None, metadata={"min": 1, "help": "Optimiser steps; overrides epochs when set."}
    )
    warmup_frac: float = field(
        default=0.05,
        metadata={"min": 0, "max": 1, "help": "Fraction of steps with linear lr warm-up from 0."},
    )
    decay_frac: float = field(
        default=0.2,
        metadata={
            "min": 0,
            "max": 1,
            "help": "Final fraction of steps with linear lr decay to 0 (lowers the final FVU).",
        },
    )
    auxk_alpha: float = field(
        default=1 / 32,
        metadata={
            "min": 0,
            "help": "Weight of the AuxK loss: dead latents learn to predict the residual (0 disables).",
        },
    )
    dead_after: int = field(
        default=20_000,
        metadata={
            "min": 1,
            "help": "A latent is dead for AuxK once it has not fired in this many training tokens.",
        },
    )
    l1_coeff: float = field(
        default=0.1,
        metadata={
            "min": 0,
            "help": "relu only: L1 penalty on latent activations (times decoder norms, which are 1).",
        },
    )
    l0_coeff: float = field(
        default=1e-2,
        metadata={"min": 0, "help": "jumprelu only: penalty on the number of active latents per token."},
    )
    seed: int = field(
        default=0, metadata={"help": "Seed for the init and the data order; equal seeds give equal SAEs."}
    )

    def num_latents(self, d_in: int) -> int:
        return self.d_sae if self.d_sae is not None else self.expansion * d_in

    def total_steps(self, tokens: int) -> int:
        """Optimiser steps for ``tokens`` training tokens (``steps``, else ``epochs`` passes)."""
        if self.steps is not None:
            return self.steps
        return max(1, round(self.epochs * math.ceil(tokens / self.batch_size)))

    def learning_rate(self, d_in: int) -> float:
        return self.lr if self.lr is not None else 5e-3 * math.sqrt(128 / d_in)


@dataclass
class SaeStats:
    """How well an SAE fits some activations."""

    fvu: float
    """Fraction of variance unexplained: squared error / squared deviation from the data mean."""
    l0: float
    """Mean number of active latents per token."""
    dead_frac: float
    """Fraction of latents that never fire on the data."""


def _shards(data: Data, d_in: int | None = None) -> Iterator[torch.Tensor]:
    """Yield 2-D float shards, checking the width so a wrong cache fails before training."""
    for shard in [data] if isinstance(data, torch.Tensor) else data:
        shard = shard.reshape(-1, shard.shape[-1])
        if d_in is not None and shard.shape[-1] != d_in:
            raise InputError("activations", "d_in", f"shard has width {shard.shape[-1]}, expected {d_in}")
        yield shard


def _moments(data: Data, d_in: int) -> tuple[int, torch.Tensor, float]:
    """Token count, mean and mean squared distance to the mean (float64, one pass)."""
    sums = torch.zeros(d_in + 2, dtype=torch.float64)  # s1 | s2 | n, summed over the ranks
    for shard in _shards(data, d_in):
        x = shard.to(torch.float64)
        sums[:d_in] += x.sum(0)
        sums[d_in] += x.pow(2).sum()
        sums[d_in + 1] += x.shape[0]
    distributed.all_sum(sums)
    n, s2 = int(sums[d_in + 1]), float(sums[d_in])
    if n == 0:
        raise InputError("activations", "data", "no activations to train on")
    mean = sums[:d_in] / n
    return n, mean, max(s2 / n - float(mean @ mean), 0.0)


def _batches(data: Data, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """One epoch of shuffled batches: shard order (when known) and rows within a shard are shuffled;
    rows left over at a shard's end join the next shard's, so only the epoch's last batch is short."""
    shards: Iterable[torch.Tensor] = _shards(data)
    if isinstance(data, Sequence):
        shards = [data[int(i)] for i in torch.randperm(len(data), generator=gen)]
        shards = _shards(shards)
    buf: list[torch.Tensor] = []
    have = 0
    for shard in shards:
        perm = torch.randperm(shard.shape[0], generator=gen)
        start = 0
        while start < shard.shape[0]:
            take = min(batch_size - have, shard.shape[0] - start)
            buf.append(shard[perm[start : start + take]])
            have, start = have + take, start + take
            if have == batch_size:
                yield torch.cat(buf).float()
                buf, have = [], 0
    if have:
        yield torch.cat(buf).float()


class _JumpStep(torch.autograd.Function):
    """Heaviside step ``pre > threshold`` with a rectangle-kernel straight-through gradient for the
    threshold (Rajamanoharan et al. 2024), so JumpReLU thresholds and the L0 penalty can be learned."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        kernel = ((pre - threshold).abs() < ctx.bandwidth / 2).to(pre.dtype) / ctx.bandwidth
        return None, -(kernel * grad).sum(0), None


_BANDWIDTH = 1e-3


def _forward(
    sae: SAE, x: torch.Tensor, cfg: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reconstruction, pre-activations (for AuxK), how many tokens each latent fired on (``[d_sae]``)
    and the sparsity penalty of this kind (0 for topk)."""
    pre = sae.pre_acts(x)
    if cfg.kind == "topk":
        # Decoding the k winners with embedding_bag skips the dense [n, d_sae] @ W_dec (and its
        # backward), which is most of a step's work when k << d_sae.
        vals, idx = pre.topk(cfg.k, dim=-1, sorted=False)
        vals = vals.relu()
        x_hat = F.embedding_bag(idx, sae.W_dec, per_sample_weights=vals, mode="sum") + sae.b_dec
        counts = pre.new_zeros(pre.shape[-1], dtype=torch.int32).index_add_(
            0, idx.flatten(), (vals > 0).flatten().int()
        )  # from the k winners, not a dense [n, d_sae] mask
        return x_hat, pre, counts, pre.new_zeros(())
    if cfg.kind == "jumprelu":
        gate = _JumpStep.apply(pre, sae.threshold, _BANDWIDTH)
        f, penalty = pre.relu() * gate, cfg.l0_coeff * gate.sum(-1).mean()
    else:
        f = sae.activate(pre)
        penalty = cfg.l1_coeff * f.sum(-1).mean()
    return sae.decode(f), pre, (f > 0).sum(0, dtype=torch.int32), penalty


class _Objective(nn.Module):
    """One step's loss as a module, so DistributedDataParallel can wrap it (its gradient all-reduce
    hooks on the SAE's parameters fire in the backward of this forward)."""

    def __init__(self, sae: SAE, cfg: TrainConfig) -> None:
        super().__init__()
        self.sae, self.cfg = sae, cfg

    def forward(self, x: torch.Tensor, dead: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, FVU of the batch, tokens each latent fired on)."""
        x_hat, pre, counts, penalty = _forward(self.sae, x, self.cfg)
        err = x - x_hat
        fvu = err.pow(2).sum(-1).mean()  # the standardised data has unit mean squared norm
        loss = fvu + penalty
        if self.cfg.auxk_alpha > 0:
            loss = loss + self.cfg.auxk_alpha * _auxk_loss(self.sae, pre, err, dead)
        return loss, fvu, counts


def _auxk_loss(sae: SAE, pre: torch.Tensor, err: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """sparsify's AuxK: the top d_in/2 dead latents reconstruct the residual of the live ones."""
    num_dead = int(dead.sum())
    if num_dead == 0:
        return pre.new_zeros(())
    k_aux = err.shape[-1] // 2
    scale = min(num_dead / k_aux, 1.0)
    # Over the dead columns only: each token's k_aux largest (all of them when fewer are dead),
    # decoded by a dense product with the dead rows of W_dec (dead latents are a minority).
    dead_idx = dead.nonzero().squeeze(1)
    sub = pre[:, dead_idx]
    if num_dead > k_aux:
        vals, pick = sub.topk(k_aux, dim=-1, sorted=False)
        sub = torch.zeros_like(sub).scatter(-1, pick, vals)
    e_hat = sub.relu() @ sae.W_dec[dead_idx]
    return scale * (e_hat - err.detach()).pow(2).sum(-1).mean()


def _lr_factor(step: int, total: int, warmup_frac: float, decay_frac: float) -> float:
    warm, decay = max(1, round(total * warmup_frac)), round(total * decay_frac)
    if step < warm:
        return (step + 1) / warm
    if decay and step >= total - decay:
        return max(total - step, 1) / (decay + 1)
    return 1.0


@torch.no_grad()
def _fold_standardisation(sae: SAE, mean: torch.Tensor, scale: float) -> None:
    """Turn an SAE trained on ``(x - mean) / scale`` into one that reads ``x`` (exact: affine)."""
    sae.W_enc.div_(scale)
    sae.W_dec.mul_(scale)
    sae.b_dec.mul_(scale).add_(mean.to(sae.b_dec))
    sae.normalize_decoder()  # all rows have norm `scale`: a uniform rescale keeps the top-k selection


def train_sae(
    data: Data,
    d_in: int,
    cfg: TrainConfig | None = None,
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[SAE, SaeStats]:
    """Train an SAE on ``data`` (see ``Data``) on ``device`` (batches are moved there as they are
    drawn; the data stays where it is) and return it, on the CPU, with its stats on that data."""
    device = torch.device(device)
    cfg = cfg or TrainConfig()
    if cfg.kind not in ("topk", "relu", "jumprelu"):
        raise InputError("train", "kind", f"unknown SAE kind {cfg.kind!r}; use topk, relu or jumprelu")
    if cfg.kind == "topk" and not 0 < cfg.k <= cfg.num_latents(d_in):
        raise InputError("train", "k", f"k={cfg.k} must be in 1..d_sae={cfg.num_latents(d_in)}")
    if (
        cfg.batch_size < 1
        or (cfg.steps is None and cfg.epochs <= 0)
        or (cfg.steps is not None and cfg.steps < 1)
    ):
        raise InputError("train", "batch_size/epochs/steps", "must be positive")
    n, mean, var = _moments(data, d_in)  # over every rank's shards under torchrun
    scale = math.sqrt(var) or 1.0
    sae = SAE(SaeConfig(d_in=d_in, d_sae=cfg.num_latents(d_in), kind=cfg.kind, k=cfg.k))
    sae.reset_parameters(seed=cfg.seed)  # b_dec = 0 here is the data mean once folded back
    if cfg.kind == "jumprelu":
        with torch.no_grad():
            sae.threshold.fill_(_BANDWIDTH)
    sae.to(device)  # initialised on the CPU: the same seed gives the same SAE on every device
    # Under torchrun each rank reads its own shards in its own order, batch_size / world tokens a
    # step, so a step sees batch_size tokens in all; DDP averages the gradients.
    gen = torch.Generator().manual_seed(cfg.seed + distributed.rank())
    batch_size = max(1, cfg.batch_size // distributed.world())
    total = cfg.total_steps(n)
    opt = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=cfg.learning_rate(d_in))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _lr_factor(s, total, cfg.warmup_frac, cfg.decay_frac)
    )
    objective: nn.Module = _Objective(sae, cfg)
    if distributed.active():
        objective = DistributedDataParallel(objective, device_ids=[device] if device.type == "cuda" else None)
    since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=device)
    mean32 = mean.float().to(device)
    counter = bar(total, f"train {cfg.kind} SAE {d_in}x{sae.cfg.d_sae}", progress)
    step = 0
    while step < total:
        for batch in _batches(data, batch_size, gen):
            x = (batch.to(device, non_blocking=True) - mean32) / scale
            dead = since_fired >= cfg.dead_after
            loss, fvu, counts = objective(x, dead)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            _remove_parallel_grad(sae)
            opt.step()
            sched.step()
            with torch.no_grad():
                sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
                if cfg.kind == "jumprelu":
                    sae.threshold.clamp_(min=0.0)
                fired = distributed.all_sum(counts.clone()) > 0
                since_fired += x.shape[0] * distributed.world()
                since_fired[fired] = 0
            step += 1
            counter.update()
            if step % 10 == 0 or step == total:
                counter.set_postfix(
                    fvu=f"{fvu.item():.3f}",
                    l0=f"{counts.sum().item() / x.shape[0]:.1f}",
                    dead=f"{float(dead.float().mean()):.3f}",
                )
            if step >= total:
                break
    counter.close()
    _fold_standardisation(sae, mean, scale)
    stats = sae_stats(sae, data)
    return sae.cpu(), stats


@torch.no_grad()
def _remove_parallel_grad(sae: SAE) -> None:
    """Keep decoder rows on the unit sphere: drop the gradient component along each row."""
    grad = sae.W_dec.grad
    if grad is not None:
        grad -= (grad * sae.W_dec).sum(-1, keepdim=True) * sae.W_dec


@torch.no_grad()
def sae_stats(sae: SAE, data: Data, chunk: int = 8192) -> SaeStats:
    """FVU, mean L0 and never-firing fraction of ``sae`` on ``data`` (one pass, float64 sums; under
    torchrun on every rank's ``data`` together)."""
    d_in, device = sae.cfg.d_in, sae.W_enc.device
    sums = torch.zeros(d_in + 4, dtype=torch.float64, device=device)  # s1 | s2 | sse | l0 | n
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.int32, device=device)
    for shard in _shards(data, d_in):
        for start in range(0, shard.shape[0], chunk):
            x = shard[start : start + chunk].to(sae.W_enc)  # its dtype, on its device
            f = sae.encode(x)
            active = f != 0
            xd = x.double()
            sums[:d_in] += xd.sum(0)
            sums[d_in] += xd.pow(2).sum()
            sums[d_in + 1] += (x - sae.decode(f)).double().pow(2).sum()
            sums[d_in + 2] += active.sum()
            sums[d_in + 3] += x.shape[0]
            fired |= active.any(0).int()
    distributed.all_sum(sums)
    distributed.all_sum(fired)
    s2, sse, l0, n = (float(v) for v in sums[d_in:])
    if n == 0:
        raise InputError("activations", "data", "no activations to measure")
    mean = sums[:d_in] / n
    total_var = s2 - n * float(mean @ mean)
    fvu = sse / total_var if total_var > 0 else (0.0 if sse == 0 else math.inf)
    return SaeStats(fvu=fvu, l0=l0 / n, dead_frac=float((fired == 0).float().mean()))
