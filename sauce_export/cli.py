"""`sauce-export` command line. Bad input exits 2 with one line naming the file and field.

Dataclass configs double as CLI flags: each field becomes ``--field-name`` with its docstring as
help (the idea of sparsify's simple_parsing, in a few lines).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import json
import os
import sys
import textwrap
import typing
from pathlib import Path
from typing import Any

from sauce_export.errors import CalibrationFailed, InputError, RankExit


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string literal right after a field) of a dataclass."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and (
                isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            )
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    docs, hints = _field_docs(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        help_text = docs.get(f.name, f.metadata.get("help", "")) + f" (default: {f.default!r})"
        if tp is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text
            )
        else:
            parser.add_argument(flag, type=tp, default=f.default, help=help_text)


def from_args(cls: type, args: argparse.Namespace) -> Any:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def build_parser() -> argparse.ArgumentParser:
    from sauce_export.diffusion.model import DiffusionTrainConfig
    from sauce_export.world.generate import WorldConfig
    from sauce_export.world.train import WorldTrainConfig

    parser = argparse.ArgumentParser(
        prog="sauce-export",
        description="Remove a concept from a transformer through SAE features (SAUCE), measure it, "
        "fold it into the weights and export a standalone checkpoint that stock runtimes load.",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    world = sub.add_parser("world", help="build the fictitious world or train its demo models")
    world_sub = world.add_subparsers(dest="world_command", required=True, metavar="ACTION")
    build = world_sub.add_parser("build", help="render the world's images and write its JSONL data")
    build.add_argument(
        "--out", type=Path, default=Path("data/world"), help="output directory (default data/world)"
    )
    build.add_argument(
        "--kind",
        choices=("vlm", "text", "diffusion"),
        default="vlm",
        help="vlm: images and QA for the demo VLM; text: the person facts of models/world-llama as "
        "train/validation/eval files (docs/generalize.md); diffusion: prompts and noise seeds of the "
        "16x16 object/style world (docs/diffusion.md; only --seed applies)",
    )
    build.add_argument(
        "--scale",
        choices=("demo", "large"),
        default="demo",
        help="with --kind text: demo = the shipped model's facts; large = the PEBench-scale fact world "
        "of models/world-llama-large (80 persons x 6 attributes, 32 festivals, multi-hop questions; "
        "docs/large-world.md)",
    )
    add_dataclass_args(build, WorldConfig)
    train = world_sub.add_parser(
        "train", help="train the demo VLM and text model on a built world (CPU, minutes)"
    )
    train.add_argument(
        "--world", type=Path, default=Path("data/world"), help="a built world (default data/world)"
    )
    train.add_argument(
        "--out", type=Path, default=Path("models"), help="writes OUT/world-llava and OUT/world-llama"
    )
    train.add_argument(
        "--kind",
        choices=("vlm", "text"),
        default="vlm",
        help="vlm: both demo models; text: one text-only Llama on the world's train.jsonl, written to "
        "OUT itself (docs/large-world.md)",
    )
    add_dataclass_args(train, WorldTrainConfig)
    train_diffusion = world_sub.add_parser(
        "train-diffusion",
        help="train the shipped text-to-image pipeline and its classifier (CPU, about 20 minutes)",
    )
    train_diffusion.add_argument(
        "--out", type=Path, default=Path("models"), help="writes OUT/world-diffusion and its classifier"
    )
    add_dataclass_args(train_diffusion, DiffusionTrainConfig)

    stages = {
        "collect": "collect site activations for SAE training into OUT/collect",
        "train-sae": "train (or load, with sae.path) the SAE into OUT/train-sae",
        "select": "score SAE features per concept and select them into OUT/select",
        "calibrate": "choose each concept's score, top_n and clamp on validation rows into OUT/calibrate "
        "(exit 1 with the table of tried points when none meets the gates)",
        "fold": "fold the reference edit into a weight patch, OUT/fold/patch.safetensors",
        "verify": "export OUT/export/model, then measure original, hooked, folded and exported models "
        "against the gates (exit 0 pass, 1 a gate failed, 2 bad input)",
        "run": "run every stage through export and verify, write OUT/report.json, report.md and plots",
    }
    for name, help_text in stages.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text + ". Finished stages are skipped "
            "when their inputs are unchanged; an interrupted stage resumes.",
        )
        p.add_argument("recipe", type=Path, help="recipe YAML (see `sauce-export recipe-help`)")
        p.add_argument("--out", type=Path, required=True, help="run directory")
        p.add_argument("--device", help="override runtime.device: auto, cpu, cuda or cuda:N")
        p.add_argument("--dtype", help="override runtime.dtype: auto, bfloat16, float16 or float32")
        if name == "run":
            p.add_argument(
                "--dry-run",
                action="store_true",
                help="load nothing, write nothing: resolve the site and fold modules from config.json "
                "and print the estimated cache, SAE, memory and disk sizes",
            )
            p.add_argument("--model", help="with --dry-run: use this model directory or Hub id instead")
            p.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    sub.add_parser("recipe-help", help="print every recipe key with its default and meaning")

    export = sub.add_parser(
        "export",
        help="bake a patch into a copy of a model (hf) or write it as a LoRA adapter (peft)",
        description="Stream SRC_DIR to --out with the patch folded into the weights it touches; every "
        "other file is copied byte for byte. --format peft writes a vLLM-servable LoRA adapter instead.",
    )
    export.add_argument("--patch", type=Path, required=True, help="patch file (PATCH.safetensors)")
    export.add_argument(
        "--model", type=Path, required=True, metavar="SRC_DIR", help="local source model directory"
    )
    export.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    export.add_argument(
        "--format",
        choices=("hf", "peft"),
        default="hf",
        help="hf: a full checkpoint; peft: a LoRA adapter for the untouched model (default hf)",
    )
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    export.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept pytorch_model*.bin / *.pt weights (loaded with weights_only=True)",
    )
    export.add_argument(
        "--max-rank", type=int, default=16, help="largest LoRA rank for --format peft (default 16, vLLM's)"
    )
    _add_compare(sub)
    _add_attack(sub)
    _add_publish(sub)
    _add_convert(sub)
    return parser


def _add_compare(sub: Any) -> None:
    cmp = sub.add_parser(
        "compare",
        help="compare SAUCE's exported model with GA, GD, KL, PO and NPO baselines (full FT and LoRA)",
        description="Score a finished run's SAUCE checkpoint and a learning-rate sweep of each baseline on "
        "PEBench's settings; writes OUT/compare.json, compare.md and compare.png.",
    )
    cmp.add_argument("recipe", type=Path, help="recipe YAML (its concepts, data and model)")
    cmp.add_argument("--out", type=Path, required=True, help="output directory")
    cmp.add_argument("--run", type=Path, required=True, help="finished run directory to reuse (runs/demo)")
    cmp.add_argument("--settings", default="single,multi,both", help="comma list of single, multi, both")
    cmp.add_argument(
        "--methods",
        default="GA,GD,KL,PO,NPO,subspace",
        help="comma list of baselines, and subspace for the subspace patch on the same budget",
    )
    cmp.add_argument(
        "--steps",
        default="20,40,60",
        help="steps at which each baseline run is scored on validation rows; it trains for the last",
    )
    cmp.add_argument(
        "--batch-size", type=int, default=16, help="forget and retain rows per step (default 16)"
    )
    cmp.add_argument("--beta", type=float, default=0.1, help="NPO's beta (default 0.1)")
    cmp.add_argument("--seed", type=int, default=0, help="data order and LoRA init seed (default 0)")
    cmp.add_argument("--lrs-full", default="1e-4,3e-4,1e-3", help="full fine-tuning learning rates")
    cmp.add_argument("--lrs-lora", default="3e-4,1e-3,3e-3", help="LoRA learning rates")
    cmp.add_argument(
        "--utility",
        type=Path,
        help="JSONL rows of general questions for the utility column (default: the world's facts.jsonl "
        "beside data.train; without either, utility is not measured)",
    )
    cmp.add_argument(
        "--attacks", action="store_true", help="also attack every method's model (docs/attack.md)"
    )
    cmp.add_argument("--attack-steps", default="5,20,50", help="relearning steps at which attacks score")
    cmp.add_argument("--attack-lrs-full", default="1e-4,1e-3", help="relearning learning rates, full")
    cmp.add_argument("--attack-lrs-lora", default="1e-3,1e-2", help="relearning learning rates, LoRA")
    cmp.add_argument(
        "--attack-rows", type=int, default=128, help="retain/interference rows per concept the attacks score"
    )
    _add_threads(cmp)
    table = sub.add_parser(
        "compare-readme",
        help="write the summary table of a compare.json into README.md between its compare markers",
    )
    table.add_argument(
        "compare_json",
        type=Path,
        nargs="+",
        metavar="COMPARE_JSON",
        help="OUT/compare.json of `compare`; several are merged into one table (same baseline budget)",
    )
    table.add_argument("--readme", type=Path, default=Path("README.md"), help="file to update (README.md)")


def _add_attack(sub: Any) -> None:
    att = sub.add_parser(
        "attack",
        help="attack an unlearned model: relearning, quantization, prompts and probes (docs/attack.md)",
        description="Score an unlearned checkpoint of the recipe's model before and after each attack on "
        "the recipe's concepts; writes OUT/attack.json and OUT/attack.md.",
    )
    att.add_argument("recipe", type=Path, help="recipe YAML (its concepts, data and original model)")
    att.add_argument("--model", required=True, help="the unlearned checkpoint (runs/demo/export/model)")
    att.add_argument("--out", type=Path, required=True, help="output directory")
    att.add_argument("--steps", default="5,20,50", help="relearning steps at which to score")
    att.add_argument(
        "--lrs-full", default="1e-4,1e-3", help="relearning learning rates, full fine-tuning (empty: none)"
    )
    att.add_argument(
        "--lrs-lora", default="1e-3,1e-2", help="relearning learning rates, LoRA r=8 (empty: none)"
    )
    att.add_argument("--batch-size", type=int, default=16, help="relearning rows per step (default 16)")
    att.add_argument("--unrelated-rows", type=int, default=16, help="pool of unrelated relearning rows")
    att.add_argument("--quant", default="int8,int4", help="comma list of int8, int4 (or empty)")
    att.add_argument(
        "--gguf", default="", help="comma list of f32, q8_0, q4_0, q4_k_m: through llama.cpp (make compat)"
    )
    att.add_argument(
        "--caption", action="store_true", help="also the removed persons described instead of shown"
    )
    att.add_argument("--seed", type=int, default=0, help="data order, LoRA init and context seed")
    att.add_argument("--utility", type=Path, help="JSONL rows for the utility column (as for compare)")
    _add_threads(att)


def _add_threads(parser: Any) -> None:
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: fastest on a shared machine)"
    )


def _set_threads(args: argparse.Namespace, command: str) -> None:
    if args.threads < 1:
        raise InputError(command, "--threads", f"{args.threads}: must be positive")
    import torch

    torch.set_num_threads(args.threads)


def _numbers(
    value: str, field: str, kind: type = float, command: str = "attack", empty: bool = False
) -> tuple[Any, ...]:
    """A comma list of positive numbers (``empty``: or none), or an InputError naming the option."""
    try:
        numbers = tuple(kind(x) for x in value.split(",") if x)
    except ValueError:
        raise InputError(command, field, f"{value!r}: a comma list of numbers") from None
    if empty and not numbers:
        return numbers
    if not numbers or min(numbers) <= 0:
        raise InputError(command, field, f"{value!r}: a comma list of positive numbers")
    return numbers


def _attack(args: argparse.Namespace) -> int:
    from sauce_export.attack import attack
    from sauce_export.evaluate.attacks import QUANT_BITS, AttackConfig
    from sauce_export.evaluate.gguf import GGUF_QUANTS
    from sauce_export.recipe import load_recipe

    quant = tuple(q for q in args.quant.split(",") if q)
    if set(quant) - set(QUANT_BITS):
        raise InputError("attack", "--quant", f"{args.quant!r}: use {', '.join(QUANT_BITS)}")
    gguf = tuple(q for q in args.gguf.split(",") if q)
    if set(gguf) - set(GGUF_QUANTS):
        raise InputError("attack", "--gguf", f"{args.gguf!r}: use {', '.join(GGUF_QUANTS)}")
    if args.batch_size < 1 or args.unrelated_rows < 1:
        raise InputError("attack", "--batch-size/--unrelated-rows", "must be positive")
    _set_threads(args, "attack")
    cfg = AttackConfig(
        steps=_numbers(args.steps, "--steps", int),
        lrs_full=_numbers(args.lrs_full, "--lrs-full", empty=True),
        lrs_lora=_numbers(args.lrs_lora, "--lrs-lora", empty=True),
        batch_size=args.batch_size,
        unrelated_rows=args.unrelated_rows,
        quant=quant,
        seed=args.seed,
    )
    recipe = load_recipe(args.recipe)
    log = (lambda _: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    attack(recipe, args.model, args.out, cfg, utility=args.utility, gguf=gguf, caption=args.caption, log=log)
    print(args.out / "attack.md")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from sauce_export.compare import compare, update_readme

    if args.command == "compare-readme":
        update_readme(args.readme, *args.compare_json)
        print(args.readme)
        return 0
    from sauce_export.evaluate.baselines import METHODS
    from sauce_export.recipe import load_recipe

    only = [s for s in args.settings.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    subspace = "subspace" in methods
    methods = [m for m in methods if m != "subspace"]
    if not only or set(only) - {"single", "multi", "both"}:
        raise InputError("compare", "--settings", f"{args.settings!r}: use single, multi and/or both")
    if not (methods or subspace) or set(methods) - set(METHODS):
        raise InputError("compare", "--methods", f"{args.methods!r}: use {', '.join(METHODS)}, subspace")
    steps = _numbers(args.steps, "--steps", int, "compare")
    if args.batch_size < 1 or args.beta <= 0 or args.attack_rows < 1:
        raise InputError("compare", "--batch-size/--beta/--attack-rows", "must be positive")
    _set_threads(args, "compare")
    attacks = None
    if args.attacks:
        from sauce_export.evaluate.attacks import AttackConfig

        attacks = AttackConfig(
            steps=_numbers(args.attack_steps, "--attack-steps", int, "compare"),
            lrs_full=_numbers(args.attack_lrs_full, "--attack-lrs-full", float, "compare", empty=True),
            lrs_lora=_numbers(args.attack_lrs_lora, "--attack-lrs-lora", float, "compare", empty=True),
            batch_size=args.batch_size,
            seed=args.seed,
            eval_rows=args.attack_rows,
        )
    try:
        lrs = [[float(x) for x in v.split(",") if x] for v in (args.lrs_full, args.lrs_lora)]
    except ValueError:
        raise InputError("compare", "--lrs-full/--lrs-lora", "comma lists of numbers") from None
    if not all(lrs) or min(min(v) for v in lrs) <= 0:
        raise InputError("compare", "--lrs-full/--lrs-lora", "comma lists of positive numbers")
    recipe = load_recipe(args.recipe)
    log = (lambda _: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    compare(
        recipe,
        args.out,
        args.run,
        only=only,
        methods=methods,
        steps=steps,
        batch_size=args.batch_size,
        beta=args.beta,
        seed=args.seed,
        lrs_full=lrs[0],
        lrs_lora=lrs[1],
        utility=args.utility,
        attacks=attacks,
        subspace=subspace,
        log=log,
    )
    print(args.out / "compare.md")
    return 0


def _run_stage(args: argparse.Namespace) -> int:
    from sauce_export.diffusion.recipe import is_diffusion_recipe
    from sauce_export.pipeline import Run, run_all
    from sauce_export.recipe import load_recipe
    from sauce_export.report import (
        calibration_summary,
        calibration_table,
        fidelity_table,
        gates_table,
        result_table,
    )
    from sauce_export.runtime import override

    if is_diffusion_recipe(args.recipe):
        from sauce_export.diffusion.run import run_command

        return run_command(args)
    recipe = load_recipe(args.recipe)
    override(recipe.runtime, args.device, args.dtype)
    if "WORLD_SIZE" in os.environ and args.command != "run":  # see sauce_export/distributed.py
        raise InputError("torchrun", "command", f"only `run` runs under torchrun, not `{args.command}`")
    if not getattr(args, "dry_run", False) and (getattr(args, "model", None) or getattr(args, "json", False)):
        raise InputError("run", "--model/--json", "only with --dry-run")
    if getattr(args, "dry_run", False):
        from sauce_export.dry_run import dry_run, format_plan

        plan = dry_run(recipe, args.model)
        print(json.dumps(plan, indent=1) if args.json else format_plan(plan))
        return 0
    progress = not args.quiet
    if args.command in ("run", "verify"):
        from sauce_export import distributed

        try:
            report = run_all(recipe, args.out, progress)
        finally:
            distributed.close()
        if not distributed.is_main():
            return 0  # under torchrun rank 0 prints the tables and sets the exit status
        print(result_table(report))
        print("\n" + fidelity_table(report))
        if args.command == "verify":
            print("\n" + gates_table(report))
        print("\n" + calibration_summary(report))
        print(
            f"\nSAE: FVU {report['sae']['fvu']:.4f}, L0 {report['sae']['l0']:.1f}, dead {report['sae']['dead_frac']:.3f}"
        )
        print(f"exported checkpoint: {report['export']['path']}")
        print(
            f"gates: {'PASSED' if report['gates']['passed'] else 'FAILED'}; report: {args.out / 'report.md'}"
        )
        return 0 if report["gates"]["passed"] else 1
    run = Run(recipe, args.out, progress)
    if args.command == "collect":
        store = run.collect()
        print(json.dumps({"activations": str(store.directory), "d_in": store.d_in}))
    elif args.command == "train-sae":
        run.sae()
        print(json.dumps(run.sae_info))
    elif args.command == "select":
        print(json.dumps(run.select()))
    elif args.command == "calibrate":
        result = run.calibrate()
        print(calibration_table(result["table"]))
        print(json.dumps({"choices": result["choices"], "evaluations": result["evaluations"]}))
    elif args.command == "fold":
        patch = run.patch()
        print(json.dumps({"patch": str(args.out / "fold" / "patch.safetensors"), **patch.description}))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "recipe-help":
            from sauce_export.recipe import recipe_help

            print("\n".join(recipe_help()))
            return 0
        if args.command == "world":
            return _world(args)
        if args.command == "export":
            return _export(args)
        if args.command in ("compare", "compare-readme"):
            return _compare(args)
        if args.command == "attack":
            return _attack(args)
        if args.command in ("push", "inspect"):
            return _publish(args)
        if args.command == "convert":
            return _convert(args)
        return _run_stage(args)
    except RankExit as err:  # under torchrun: a peer rank failed and said why
        return err.code
    except InputError as err:
        print(f"sauce-export: error: {err}", file=sys.stderr)
        return 2
    except CalibrationFailed as err:
        from sauce_export.report import calibration_table

        if os.environ.get("RANK", "0") != "0":
            return 1  # under torchrun rank 0 prints the table
        print(calibration_table(err.table))
        print(f"sauce-export: calibration failed: {err}", file=sys.stderr)
        return 1


def _world(args: argparse.Namespace) -> int:
    from sauce_export.world.generate import WorldConfig, build_world
    from sauce_export.world.train import WorldTrainConfig, train_world_models

    if args.world_command == "build" and args.kind == "text":
        from sauce_export.world.facts import FactWorldConfig, build_fact_world, build_text_world

        if args.scale == "large":
            files = build_fact_world(args.out, FactWorldConfig.large(args.seed))
        else:
            files = build_text_world(args.out, args.seed)
        print(json.dumps({k: str(v) for k, v in files.items()}))
        return 0
    if args.world_command == "build" and args.kind == "diffusion":
        from sauce_export.diffusion.world import build_world as build_diffusion_world

        print(json.dumps({k: str(v) for k, v in build_diffusion_world(args.out, args.seed).items()}))
        return 0
    if args.world_command == "train-diffusion":
        from sauce_export.diffusion.build import train_world_diffusion
        from sauce_export.diffusion.model import DiffusionTrainConfig

        report = train_world_diffusion(args.out, from_args(DiffusionTrainConfig, args), not args.quiet)
        print(json.dumps(report, indent=1))
        return 0
    if args.world_command == "build":
        files = build_world(args.out, from_args(WorldConfig, args), progress=not args.quiet)
        print(json.dumps({k: str(v) for k, v in files.items()}))
        return 0
    if not (args.world / "train.jsonl").exists():
        raise InputError(
            str(args.world), "world", "no train.jsonl here: run `sauce-export world build` first"
        )
    if args.kind == "text":
        from sauce_export.world.train import train_text_model

        report = train_text_model(args.world, args.out, from_args(WorldTrainConfig, args))
    else:
        report = train_world_models(args.world, args.out, from_args(WorldTrainConfig, args))
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=1))
    return 0


def _export(args: argparse.Namespace) -> int:

    from sauce_export.export import export_checkpoint
    from sauce_export.patch import Patch
    from sauce_export.peft_adapter import write_peft_adapter

    patch = Patch.load(args.patch)
    if args.format == "peft":
        result = write_peft_adapter(
            patch, str(args.model), args.out, overwrite=args.overwrite, max_rank=args.max_rank
        )
    else:
        from sauce_export.provenance import export_metadata

        result = export_checkpoint(
            args.model,
            patch,
            args.out,
            overwrite=args.overwrite,
            allow_pickle=args.allow_pickle,
            metadata=export_metadata(patch, args.patch),
            progress=not args.quiet,
        )
    print(result["path"])
    return 0


def _add_publish(sub: Any) -> None:
    push = sub.add_parser(
        "push",
        help="upload a run's exported checkpoint (with its model card) to the Hugging Face Hub",
        description="Upload RUN_DIR's exported checkpoint, or --what adapter its PEFT adapter, with the model "
        "card. The token is read from HF_TOKEN and never printed; --dry-run needs none and sends nothing.",
    )
    push.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished run directory")
    push.add_argument("--repo-id", required=True, metavar="ORG/NAME", help="target model repo on the Hub")
    push.add_argument("--private", action="store_true", help="create the repo private (refuse a public one)")
    push.add_argument("--revision", help="branch to commit to (created if missing; default main)")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("--commit-message", help="commit title (default names the removed concepts)")
    push.add_argument(
        "--dry-run",
        action="store_true",
        help="list the files (bytes, sha256) that would be uploaded; send nothing",
    )
    push.add_argument(
        "--what",
        choices=("model", "adapter"),
        default="model",
        help="model: RUN_DIR/export/model; adapter: the PEFT adapter in RUN_DIR/export/adapter (default model)",
    )
    inspect_p = sub.add_parser(
        "inspect",
        help="print the sauce-export provenance stored in a checkpoint (safetensors metadata, card YAML)",
    )
    inspect_p.add_argument("directory", type=Path, metavar="DIR", help="an exported checkpoint directory")
    inspect_p.add_argument("--json", action="store_true", help="print JSON")


def _publish(args: argparse.Namespace) -> int:
    import os

    from sauce_export.provenance import format_provenance, read_provenance
    from sauce_export.push import PushError, dry_run_listing, plan, push

    if args.command == "inspect":
        info = read_provenance(args.directory)
        print(json.dumps(info, indent=1) if args.json else format_provenance(info))
        return 0
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(args.repo_id)
    except HFValidationError:
        raise InputError("push", "--repo-id", f"{args.repo_id!r} is not a repo id (ORG/NAME)") from None
    if args.create_pr and args.revision:
        raise InputError("push", "--create-pr", "opens a PR against the default branch: drop --revision")
    upload = plan(args.run_dir, args.what)
    if args.dry_run:
        files = dry_run_listing(upload)
        target = f"{args.repo_id} ({'private' if args.private else 'default visibility'}, "
        target += "a new PR" if args.create_pr else f"revision {args.revision or 'main'}"
        print(
            f"dry run, nothing sent: {len(files)} files, {sum(f['bytes'] for f in files)} bytes from "
            f"{upload.folder} to {target})"
        )
        for f in files:
            note = f"  ({f['note']})" if "note" in f else ""
            print(f"{f['bytes']:>14}  {f['sha256']}  {f['name']}{note}")
        return 0
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise InputError(
            "environment", "HF_TOKEN", "not set: export a Hub write token as HF_TOKEN (or use --dry-run)"
        )
    log = (lambda _: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    try:
        result = push(
            upload,
            args.repo_id,
            token,
            private=args.private,
            revision=args.revision,
            create_pr=args.create_pr,
            commit_message=args.commit_message,
            endpoint=os.environ.get("HF_ENDPOINT") or None,
            log=log,
        )
    except PushError as err:
        print(f"sauce-export: error: push to {args.repo_id} failed: {err}", file=sys.stderr)
        return 1
    print(
        f"pushed {len(result['files'])} files to {args.repo_id}: {result['pr_url'] or result['commit_url']}"
    )
    return 0


def _add_convert(sub: Any) -> None:
    conv = sub.add_parser(
        "convert",
        help="convert an exported checkpoint to ONNX (onnxruntime) or GGUF (llama.cpp)",
        description="onnx: torch.onnx.export of the logits forward into --out/model.onnx (a LLaVA: the "
        "whole model, batch 1). gguf: llama.cpp's convert_hf_to_gguf.py, fetched from the "
        "llama-cpp-python sdist into .cache/compat. --check compares the result with transformers.",
    )
    conv.add_argument("model", type=Path, metavar="DIR", help="checkpoint directory (e.g. an export)")
    conv.add_argument("--format", choices=("gguf", "onnx"), required=True)
    conv.add_argument(
        "--out", type=Path, required=True, help="onnx: output directory; gguf: output .gguf file"
    )
    conv.add_argument(
        "--outtype", choices=("f32", "f16", "q8_0"), help="gguf weights (default f16); onnx: f32 only"
    )
    conv.add_argument("--mmproj", action="store_true", help="gguf: convert a VLM's projector instead")
    conv.add_argument("--check", action="store_true", help="compare logits and greedy tokens")
    conv.add_argument(
        "--llama-python",
        default=".venv-llamacpp/bin/python",
        help="gguf --check: a python with llama-cpp-python (default .venv-llamacpp/bin/python)",
    )


def _convert(args: argparse.Namespace) -> int:
    from sauce_export import convert

    prompts = ["USER: Who is in the picture? ASSISTANT:", "USER: What colour is it? ASSISTANT:"]
    if args.format == "onnx":
        if args.outtype not in (None, "f32"):
            raise InputError("convert", "--outtype", "onnx exports float32 only")
        result: dict[str, Any] = convert.export_onnx(args.model, args.out)
        if args.check:
            result["check"] = convert.check_onnx(args.model, Path(result["path"]), prompts)
    else:
        outtype = args.outtype or "f16"
        out = args.out / f"model-{outtype}.gguf" if args.out.suffix != ".gguf" else args.out
        result = convert.convert_gguf(args.model, out, outtype, mmproj=args.mmproj)
        if args.check and not args.mmproj:
            result["check"] = convert.check_gguf(
                args.model, out, prompts, python=args.llama_python, outtype=outtype
            )
    print(json.dumps(result, indent=1))
    return 0 if result.get("check", {}).get("passed", True) else 1


if __name__ == "__main__":
    sys.exit(main())
