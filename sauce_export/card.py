"""The model card (``README.md``) of an exported checkpoint: Hub metadata plus the run's evidence.

Whoever downloads the weights should see what was removed, how, how well it was measured and what
the edit does not guarantee (DESIGN §8, §10.10), so the card is written next to the weights by
``run_all`` and travels with them on ``push``. The YAML header links the checkpoint to its base model
in the Hub's model tree and carries a machine-readable ``sauce_export`` summary that ``inspect`` reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from sauce_export import __version__
from sauce_export.errors import InputError
from sauce_export.hf_config import code_files

TEMPLATE = Path(__file__).parent / "model_cards" / "default.md"
"""Package data: in a checkout ``sauce_export/model_cards`` is a link to the top-level ``model_cards/``
(the source users edit); a wheel holds a copy of its files at the same place (pyproject package-data)."""
TAGS = ["sauce-export", "unlearning", "concept-removal", "sae"]
Relation = Literal["finetune", "adapter"]
"""The Hub knows four relations (adapter, merge, quantized, finetune): a folded checkpoint is a
modified full copy of the base weights (finetune); a PEFT adapter needs the base (adapter)."""

_FOLDS = {
    "lora": "a low-rank delta `W += B A` on the residual writers of the site layer: `B` is the decoder "
    "rows of the selected latents, `A` is fitted by ridge regression to the reference edit's per-token "
    "coefficients on calibration rows, then refined by Adam steps on KL(hooked || folded), kept only if "
    "held-out KL drops.",
    "gated": "new SiLU-gated MLP neurons in the site layer, one per selected latent, whose gate reads the "
    "latent's pre-activation (so a neuron is off where its latent is off), then KL refinement.",
    "subspace": "a low-rank delta `W += B A` on one writer of the site layer: `B` is an orthonormal basis "
    "of the selected latents' decoder directions (so the patch writes nothing outside their span), `A` "
    "is fitted to the unlearning objective on train rows with KL to the original on the other rows "
    "(docs/subspace.md); the hooked clamp is reported beside it for contrast.",
    "projection": "`W <- (I - Q Q^T) W` on every residual writer of layers 0..L (embeddings and image "
    "projector included): the selected decoder directions are projected out of what those layers write.",
}


def hub_base_model(model: str) -> str | None:
    """The Hub id of the source model, or None when the Hub could not link to it.

    The Hub validates ``base_model`` as a model id and rejects a push whose card names a local path, so
    a local directory gives None unless it is a Hub cache snapshot (``.../models--org--name/...``).
    """
    snapshot = re.search(r"models--([\w.-]+)--([\w.-]+)", model)
    if snapshot:
        return f"{snapshot[1]}/{snapshot[2]}"
    if model.startswith((".", "/", "~")) or Path(model).exists():
        return None
    try:
        validate_repo_id(model)
    except HFValidationError:
        return None
    return model


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _round(value: Any) -> Any:
    return round(value, 6) if isinstance(value, float) else value


def _config(*dirs: Path) -> dict[str, Any]:
    for d in dirs:
        if (d / "config.json").is_file():
            return json.loads((d / "config.json").read_text())
    return {}


def _recipe_text(report: dict[str, Any]) -> str:
    """The recipe file verbatim; rebuilt from report.json (and said so) when the file is gone."""
    path = report["recipe"].get("path")
    if path and Path(path).is_file():
        return Path(path).read_text().rstrip("\n")
    fields = {k: v for k, v in report["recipe"].items() if k != "path"}
    return (
        "# recipe file not found; rebuilt from report.json\n"
        + yaml.safe_dump(fields, sort_keys=False).rstrip()
    )


def _runtime_text(report: dict[str, Any]) -> str:
    """Where the run computed (the recipe's runtime after --device/--dtype; torchrun's ranks)."""
    rt = report.get("runtime")
    if not rt:
        return ""
    where = f"device_map {rt['device_map']}" if rt["device_map"] else rt["device"]
    ranks = f", {rt['ranks']} torchrun processes" if rt["ranks"] > 1 else ""
    return f"Computed in {rt['dtype']} on {where}{ranks} (`runtime`, docs/runtime.md)."


def file_records(folder: Path) -> list[dict[str, Any]]:
    """name, bytes and sha256 of every file under ``folder`` (what an upload of it sends)."""
    records = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(16 << 20):
                sha.update(chunk)
        records.append(
            {
                "name": path.relative_to(folder).as_posix(),
                "bytes": path.stat().st_size,
                "sha256": sha.hexdigest(),
            }
        )
    return records


def _load_section(path: str, relation: Relation, vision: bool, base: str, grown: bool) -> str:
    auto = "AutoModelForImageTextToText" if vision else "AutoModelForCausalLM"
    proc = "AutoProcessor" if vision else "AutoTokenizer"
    if relation == "adapter":
        return f"""A PEFT LoRA adapter (`lora_B @ lora_A` equals the folded patch, scaling 1) for `{base}`.

```python
from peft import PeftModel
from transformers import {auto}, {proc}

path = "{path}"  # or the Hub repo id this card was pushed to
base = {auto}.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, path)
processor = {proc}.from_pretrained("{base}")
```

vLLM (LoRA on linear modules, rank <= 16 by default):

```python
from vllm import LLM
from vllm.lora.request import LoRARequest

llm = LLM(model="{base}", enable_lora=True)
outputs = llm.generate(prompts, lora_request=LoRARequest("sauce-export", 1, path))
```

llama.cpp: convert the base model with `convert_hf_to_gguf.py`, the adapter with
`convert_lora_to_gguf.py {path} --base <base model dir>`, then `llama-cli -m base.gguf --lora adapter.gguf`."""
    same = (
        "tensor names and dtypes, tokenizer, chat template and configs are the base model's; only the MLP "
        "width (`intermediate_size` in config.json) grew by the gated fold's new neurons"
        if grown
        else "tensor names, shapes, dtypes, tokenizer, chat template and configs are the base model's"
    )
    return f"""A standalone checkpoint: the base model's files with the edit baked into the weights;
{same}, so stock loaders load it unchanged.

```python
from transformers import {auto}, {proc}

path = "{path}"  # or the Hub repo id this card was pushed to
model = {auto}.from_pretrained(path)
processor = {proc}.from_pretrained(path)
```

vLLM:

```python
from vllm import LLM

llm = LLM(model=path)
```

llama.cpp, via GGUF conversion from a llama.cpp checkout:

```bash
python convert_hf_to_gguf.py {path} --outfile model.gguf
llama-cli -m model.gguf
```

The converter must recognise the tokenizer (an unknown byte-level BPE stops it with "BPE
pre-tokenizer was not recognized"); for a vision-language model it converts the language model,
and the vision projector with `--mmproj` where llama.cpp supports the architecture."""


def _clamp_rule(report: dict[str, Any]) -> str:
    edit = report["recipe"]["edit"]
    union = sorted({f for c in report["concepts"] for f in c["features"]})
    names = [f"{c['kind']} {c['name']}" for c in report["concepts"]]
    picks = [
        f"{p['method']} scores, "
        + (f"top {p['top_n']}" if p["top_n"] is not None else f"percentile {p['percentile']}")
        for p in (c["select"] for c in report["concepts"])
    ]
    if len(set(picks)) == 1:
        picked = f"{picks[0]} per concept"
    else:
        picked = "; ".join(f"{name}: {p}" for name, p in zip(names, picks, strict=True))
    clamps = {name: c["clamp"] for name, c in zip(names, report["concepts"], strict=True)}
    if edit.get("multiplier") is not None:
        target = f"`target_i = {edit['multiplier']} * f_i` (a multiplier)"
    elif len(set(clamps.values())) == 1:
        target = f"`target_i = c = {next(iter(clamps.values()))}` (a value clamp)"
    else:
        per = ", ".join(f"{name} c = {c}" for name, c in clamps.items())
        target = (
            f"`target_i = c` of the concept that selected latent `i` (the most negative where several "
            f"did): {per} (value clamps)"
        )
    where = (
        "on the tokens where latent `i` fires (`f_i > 0`), so tokens where no selected latent fires are "
        "unchanged"
        if edit.get("only_where_active", True)
        else "on every token"
    )
    return (
        f"One edit removes every concept: the union `S = {union}` ({len(union)} latents) of the features "
        f"selected per concept ({picked}). At "
        f"`{report['site']}` the residual stream gets `sum_(i in S) (target_i - f_i) * W_dec[i]` with "
        f"{target}, {where}. Only the change of the selected latents is decoded, never the full "
        f"reconstruction, so the SAE's reconstruction error is kept. Tokens that may be edited: "
        f"{edit.get('scope', 'all')}."
    )


def _subspace_note(report: dict[str, Any]) -> str:
    """For a subspace run: the clamp below is the contrast, not what the weights carry."""
    if report["fold"]["description"].get("method") != "subspace":
        return ""
    return (
        "**This checkpoint carries the subspace patch, not the clamp** (`edit.method: subspace`, "
        "see Fold): a low-rank change along the decoder directions of the latents below, fitted to "
        "forget the concepts and keep the rest. The clamp of the same latents is what the report "
        "measures beside it for contrast:\n\n"
    )


def card_metadata(report: dict[str, Any], relation: Relation, config: dict[str, Any]) -> ModelCardData:
    """The YAML header: Hub fields, and the run's summary under ``sauce_export`` for ``inspect``."""
    base = hub_base_model(report["model"])
    arch = " ".join(config.get("architectures") or [])
    pipeline = "image-text-to-text" if "vision_config" in config else "text-generation" if arch else None
    edit = report["recipe"]["edit"]
    desc = report["fold"]["description"]
    return ModelCardData(
        base_model=base,
        base_model_relation=relation if base else None,
        library_name="peft" if relation == "adapter" else "transformers",
        pipeline_tag=pipeline,
        tags=TAGS,
        sauce_export={
            "version": __version__,
            "source_model": report["model"],
            "concepts": [
                {"kind": c["kind"], "name": c["name"], "features": c["features"], "clamp": c.get("clamp")}
                for c in report["concepts"]
            ],
            "site": report["site"],
            "sae": {
                k: _round(report["sae"].get(k))
                for k in ("kind", "d_sae", "k", "source", "fvu", "l0", "dead_frac")
            },
            "edit": {k: edit.get(k) for k in ("clamp", "multiplier", "only_where_active", "scope")},
            "fold": {k: desc[k] for k in ("method", "modules", "rank") if k in desc},
            "gates_passed": report["gates"]["passed"],
        },
    )


def code_note(folder: Path, relation: Relation) -> str:
    """A checkpoint that carries Python files says so: loaders with ``trust_remote_code=True`` run them."""
    found = code_files(folder) if relation == "finetune" else []
    if not found:
        return ""
    return (
        f"**Python files**: the source folder carried {', '.join(f'`{f}`' for f in found)}; they were "
        "copied unchanged and never run by sauce-export. transformers runs them only with "
        "`trust_remote_code=True`: read them before you do."
    )


def render_card(
    report: dict[str, Any],
    folder: Path,
    relation: Relation = "finetune",
    template: Path = TEMPLATE,
    model_dir: Path | None = None,
) -> str:
    """The card text for the checkpoint (or adapter) in ``folder``, from a run's ``report.json``."""
    from sauce_export.report import (
        calibration_text,
        fidelity_table,
        gates_table,
        latents_section,
        result_table,
    )

    if not template.is_file():
        raise InputError(str(template), "template", "model card template not found")
    config = _config(folder, model_dir or Path(report["export"]["path"]))
    base = hub_base_model(report["model"]) or report["model"]
    sae, desc = report["sae"], report["fold"]["description"]
    names = ", ".join(f"{c['kind']} *{c['name']}*" for c in report["concepts"])
    method = desc.get("method", "?")
    files = report["export"]["files"] if relation == "finetune" else file_records(folder)
    modules = report["fold"].get("modules", {})
    fold_rows = [[f"`{m}`", s.get("rank", "-"), s.get("norm", "-")] for m, s in modules.items()]
    kind = "PEFT adapter" if relation == "adapter" else "checkpoint"
    card = ModelCard.from_template(
        card_metadata(report, relation, config),
        template_path=str(template),
        title=f"{Path(report['model']).name} without {', '.join(c['name'] for c in report['concepts'])}",
        summary=f"A {kind} derived from `{report['model']}` with {names} removed by clamping sparse-"
        f"autoencoder features (SAUCE / SAeUron style) and folding the edit into the weights."
        + (
            ""
            if hub_base_model(report["model"])
            else " The source is a local directory, so the metadata names no `base_model`: add the Hub id "
            "by hand if it is a copy of a Hub model."
        ),
        version=__version__,
        site=report["site"],
        concepts_table=_table(
            ["kind", "name", "chance accuracy", "selected SAE features"],
            [[c["kind"], c["name"], f"{c['chance_acc']:.3f}", c["features"]] for c in report["concepts"]],
        ),
        sae_table=_table(
            ["site", "width (latents)", "kind", "k", "source", "FVU", "L0", "dead fraction"],
            [
                [
                    f"`{report['site']}`",
                    sae.get("d_sae"),
                    sae.get("kind"),
                    sae.get("k"),
                    sae.get("source"),
                    f"{sae['fvu']:.4f}",
                    f"{sae['l0']:.1f}",
                    f"{sae['dead_frac']:.3f}",
                ]
            ],
        ),
        clamp_rule=_subspace_note(report) + _clamp_rule(report),
        calibration=calibration_text(report),
        fold_text=f"Method `{method}`: {_FOLDS.get(method, 'see the description below.')}\n\n"
        + (_table(["module", "rank", "norm"], fold_rows) if fold_rows else "")
        + "".join(f"\n\n{section}" for section in latents_section(report)),
        fold_json=json.dumps(desc, indent=1),
        accuracy_table=result_table(report),
        fidelity_table=fidelity_table(report),
        gates_status="all passed" if report["gates"]["passed"] else "FAILED (see the checks below)",
        gates_table=gates_table(report),
        load_section=_load_section(str(folder), relation, "vision_config" in config, base, method == "gated"),
        upstream_note="changed only by the projection of the selected directions"
        if method == "projection"
        else "unchanged from the base model",
        undo_note="This is a separate adapter: the base model without it has the concept."
        if relation == "adapter"
        else "The weights differ from the base model by a small patch; anyone with the base model can "
        "compute the difference and revert it.",
        recipe_yaml=_recipe_text(report),
        runtime=_runtime_text(report),
        code_note=code_note(folder, relation),
        files_table=_table(
            ["file", "bytes", "sha256"], [[f"`{f['name']}`", f["bytes"], f"`{f['sha256']}`"] for f in files]
        ),
    )
    return str(card).rstrip("\n") + "\n"


def write_atomic(path: Path, text: str) -> Path:
    """Temp file + rename, so a reader (or an upload) never sees half a card."""
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_card(report: dict[str, Any], run_dir: Path) -> Path:
    """Write the card as ``README.md`` into the exported checkpoint and link it from ``report.md``."""
    card = write_atomic(
        Path(report["export"]["path"]) / "README.md", render_card(report, Path(report["export"]["path"]))
    )
    report_md = Path(run_dir) / "report.md"
    if report_md.is_file():
        link = os.path.relpath(card, run_dir)
        text = report_md.read_text()
        if link not in text:
            write_atomic(report_md, text.rstrip("\n") + f"\n\n## Model card\n\n[{link}]({link})\n")
    return card
