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
import sys
import textwrap
import typing
from pathlib import Path
from typing import Any

from sauce_export.errors import InputError


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
    add_dataclass_args(train, WorldTrainConfig)

    stages = {
        "collect": "collect site activations for SAE training into OUT/collect",
        "train-sae": "train (or load, with sae.path) the SAE into OUT/train-sae",
        "select": "score SAE features per concept and select them into OUT/select",
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
    return parser


def _run_stage(args: argparse.Namespace) -> int:
    from sauce_export.pipeline import Run, run_all
    from sauce_export.recipe import load_recipe
    from sauce_export.report import fidelity_table, gates_table, result_table

    recipe = load_recipe(args.recipe)
    progress = not args.quiet
    if args.command in ("run", "verify"):
        report = run_all(recipe, args.out, progress)
        print(result_table(report))
        print("\n" + fidelity_table(report))
        if args.command == "verify":
            print("\n" + gates_table(report))
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
        return _run_stage(args)
    except InputError as err:
        print(f"sauce-export: error: {err}", file=sys.stderr)
        return 2


def _world(args: argparse.Namespace) -> int:
    from sauce_export.world.generate import WorldConfig, build_world
    from sauce_export.world.train import WorldTrainConfig, train_world_models

    if args.world_command == "build":
        files = build_world(args.out, from_args(WorldConfig, args), progress=not args.quiet)
        print(json.dumps({k: str(v) for k, v in files.items()}))
        return 0
    if not (args.world / "train.jsonl").exists():
        raise InputError(
            str(args.world), "world", "no train.jsonl here: run `sauce-export world build` first"
        )
    report = train_world_models(args.world, args.out, from_args(WorldTrainConfig, args))
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=1))
    return 0


def _export(args: argparse.Namespace) -> int:
    import hashlib

    from sauce_export import __version__
    from sauce_export.export import export_checkpoint, write_peft_adapter
    from sauce_export.patch import Patch

    patch = Patch.load(args.patch)
    if args.format == "peft":
        result = write_peft_adapter(
            patch, str(args.model), args.out, overwrite=args.overwrite, max_rank=args.max_rank
        )
    else:
        provenance = {
            "sauce_export_version": __version__,
            "sauce_export_patch_sha256": hashlib.sha256(args.patch.read_bytes()).hexdigest(),
            "sauce_export_modules": json.dumps(patch.modules),
        }
        result = export_checkpoint(
            args.model,
            patch,
            args.out,
            overwrite=args.overwrite,
            allow_pickle=args.allow_pickle,
            metadata=provenance,
            progress=not args.quiet,
        )
    print(result["path"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
