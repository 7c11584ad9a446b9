"""Our TopK SAE trainer against EleutherAI's sparsify (`eai-sparsify`) on the same activations.

Collects the demo recipe's activations (the collect stage of `recipes/demo.yaml`, into
OUT/sae_peer_run), then trains a TopK SAE of the same width and k, for the same number of steps
of the same number of tokens, with `sauce_export.sae.train.train_sae` and with sparsify's
`Trainer` (fed the same activations through a stand-in model whose hook point returns them; its
own defaults otherwise: optimizer, learning rate, no AuxK). Reports tokens/s of training and the
FVU of each SAE on all the activations, measured the same way. Writes OUT/sae_peer.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from sauce_export.pipeline import Run
from sauce_export.recipe import load_recipe
from sauce_export.sae.train import TrainConfig, sae_stats, train_sae

ROOT = Path(__file__).resolve().parent.parent
SEQ = 64  # sparsify batches sequences: the stand-in model's rows are SEQ activation indices


class Table(nn.Module):
    """A stand-in for sparsify's model: ``input_ids`` index rows of an activation table, which the
    hook point ``layers.0`` outputs."""

    def __init__(self, acts: torch.Tensor) -> None:
        super().__init__()
        self.acts = acts
        self.layers = nn.ModuleList([nn.Identity()])

    @property
    def base_model(self) -> nn.Module:
        return self

    @property
    def device(self) -> torch.device:
        return self.acts.device

    @property
    def dummy_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.zeros(1, SEQ, dtype=torch.long)}

    def forward(self, input_ids: torch.Tensor, **_: object) -> torch.Tensor:
        return self.layers[0](self.acts[input_ids])


def fvu(reconstruct: object, acts: torch.Tensor, chunk: int = 8192) -> float:
    """Squared error over squared deviation from the mean, over all of ``acts`` (float64 sums)."""
    sse = 0.0
    with torch.no_grad():
        for start in range(0, acts.shape[0], chunk):
            x = acts[start : start + chunk]
            sse += float((x - reconstruct(x)).double().pow(2).sum())  # type: ignore[operator]
    return sse / float((acts.double() - acts.double().mean(0)).pow(2).sum())


def ours(acts: torch.Tensor, expansion: int, k: int, steps: int, batch: int, auxk: float) -> dict[str, float]:
    cfg = TrainConfig(kind="topk", expansion=expansion, k=k, steps=steps, batch_size=batch, auxk_alpha=auxk)
    started = time.perf_counter()
    sae, _ = train_sae(acts, acts.shape[1], cfg, progress=False)
    seconds = time.perf_counter() - started
    started = time.perf_counter()
    sae_stats(sae, acts)  # train_sae ends with this pass over the data; sparsify's timing has none
    seconds -= time.perf_counter() - started
    return {
        "seconds": round(seconds, 2),
        "tokens_per_s": round(steps * batch / seconds),
        "fvu": fvu(sae, acts),
    }


def sparsify(
    acts: torch.Tensor, expansion: int, k: int, steps: int, batch: int, work: Path
) -> dict[str, float]:
    from sparsify import SparseCoderConfig, Trainer
    from sparsify import TrainConfig as SparsifyConfig

    seqs = batch // SEQ
    gen = torch.Generator().manual_seed(0)
    rows = []
    while len(rows) < steps * seqs:  # shuffled epochs of SEQ-token rows, as many as the steps take
        order = torch.randperm(acts.shape[0], generator=gen)
        rows += list(order[: len(order) // SEQ * SEQ].view(-1, SEQ))
    dataset = [{"input_ids": r} for r in rows[: steps * seqs]]
    cfg = SparsifyConfig(
        SparseCoderConfig(expansion_factor=expansion, k=k),
        batch_size=seqs,
        loss_fn="fvu",
        hookpoints=["layers.0"],
        lr_warmup_steps=max(1, steps // 20),  # its default (1000) assumes far longer runs
        log_to_wandb=False,
        save_every=10**9,
        save_dir=str(work),
    )
    trainer = Trainer(cfg, dataset, Table(acts))  # type: ignore[arg-type]
    started = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - started
    sae = next(iter(trainer.saes.values()))
    return {
        "seconds": round(seconds, 2),
        "tokens_per_s": round(steps * batch / seconds),
        "fvu": fvu(lambda x: sae(x).sae_out, acts),
        "optimizer": cfg.optimizer,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=2048, help="tokens per step (a multiple of 64)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = load_recipe(ROOT / "recipes" / "demo.yaml")
    store = Run(recipe, args.out / "sae_peer_run", progress=False).collect()
    acts = torch.cat([s.float() for s in store]).contiguous()
    expansion, k = recipe.sae.expansion, recipe.sae.k
    with tempfile.TemporaryDirectory() as work:
        peer = sparsify(acts, expansion, k, args.steps, args.batch, Path(work))
    result = {
        "activations": list(acts.shape),
        "d_sae": expansion * acts.shape[1],
        "k": k,
        "steps": args.steps,
        "tokens_per_step": args.batch,
        "ours": ours(acts, expansion, k, args.steps, args.batch, TrainConfig().auxk_alpha),
        "ours_no_auxk": ours(acts, expansion, k, args.steps, args.batch, 0.0),
        "sparsify": peer,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        },
    }
    a, b, c = result["ours"], result["sparsify"], result["ours_no_auxk"]

    def verdict(ours: dict[str, float], label: str) -> str:
        met = ours["tokens_per_s"] >= b["tokens_per_s"] and ours["fvu"] <= b["fvu"]
        return (
            f"{label}: target {'met' if met else 'MISSED'} (throughput >= sparsify's at equal or lower FVU)"
        )

    result["verdict"] = {
        "same_losses": verdict(c, "Both without AuxK"),
        "defaults": verdict(a, "Ours with its default AuxK"),
    }
    (args.out / "sae_peer.json").write_text(json.dumps(result, indent=1))
    md = [
        f"# SAE trainers on the demo's activations ({acts.shape[0]} x {acts.shape[1]}, TopK d_sae "
        f"{result['d_sae']}, k {k}, {args.steps} steps of {args.batch} tokens, 1 thread)",
        "",
        "| trainer | seconds | tokens/s | FVU |",
        "|---|---|---|---|",
        f"| sauce-export (AuxK 1/32, its default) | {a['seconds']} | {a['tokens_per_s']} | {a['fvu']:.4f} |",
        f"| sauce-export, no AuxK (as sparsify's default) | {c['seconds']} | {c['tokens_per_s']} | {c['fvu']:.4f} |",
        f"| sparsify ({b['optimizer']}) | {b['seconds']} | {b['tokens_per_s']} | {b['fvu']:.4f} |",
        "",
        result["verdict"]["same_losses"] + ". " + result["verdict"]["defaults"] + ".",
    ]
    (args.out / "sae_peer.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
