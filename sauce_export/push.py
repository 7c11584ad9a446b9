"""`sauce-export push RUN_DIR --repo-id ORG/NAME`: publish a run's exported checkpoint with its card.

Only a finished export goes out, and only as it was verified: every file ``report.json`` recorded
must be present with its recorded size (``--dry-run`` also checks the sha256), so weights changed
after verify are never published under the run's card. The token is read from ``HF_TOKEN`` only and
handed to ``huggingface_hub`` explicitly (no cached login is used by surprise); every message that
leaves this module has it scrubbed, because Hub errors can echo request details.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sauce_export.card import Relation, file_records, render_card, write_atomic
from sauce_export.errors import InputError

What = Literal["model", "adapter"]
ADAPTER_DIR = Path("export") / "adapter"
IGNORE = [".*.tmp", "*/.*.tmp"]  # our own temp files, should a crash leave one; the library adds .git etc.


class PushError(RuntimeError):
    """The Hub refused or failed the upload (not bad input): one scrubbed line, exit 1."""


@dataclass
class Upload:
    """What a push sends: ``folder``'s files, plus a card written into it first when it has none."""

    folder: Path
    relation: Relation
    card: str | None
    report: dict[str, Any]

    def names(self) -> list[str]:
        from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

        names = [
            p.relative_to(self.folder).as_posix() for p in sorted(self.folder.glob("**/*")) if p.is_file()
        ]
        names += ["README.md"] if self.card is not None else []
        return sorted(filter_repo_objects(names, ignore_patterns=IGNORE + DEFAULT_IGNORE_PATTERNS))


def _model_dir(run_dir: Path, report: dict[str, Any]) -> Path:
    """The run's own export (``run`` writes it there), else report.json's path (relative to where it ran)."""
    recorded = report.get("export", {}).get("path")
    for candidate in [run_dir / "export" / "model"] + ([Path(recorded)] if recorded else []):
        if (candidate / "config.json").is_file():
            return candidate
    raise InputError(
        str(run_dir), "export", "no finished export here (run `sauce-export run RECIPE --out DIR` first)"
    )


def plan(run_dir: Path, what: What = "model") -> Upload:
    """Check that ``run_dir`` holds a finished run and decide what a push of it uploads."""
    run_dir = Path(run_dir)
    try:
        report = json.loads((run_dir / "report.json").read_text())
    except FileNotFoundError:
        raise InputError(
            str(run_dir),
            "report.json",
            "no finished run here (run `sauce-export run RECIPE --out DIR` first)",
        ) from None
    except (OSError, ValueError) as err:
        raise InputError(str(run_dir / "report.json"), "report.json", f"unreadable ({err})") from None
    model_dir = _model_dir(run_dir, report)
    for record in report["export"]["files"]:
        path = model_dir / record["name"]
        if not path.is_file() or path.stat().st_size != record["bytes"]:
            raise InputError(
                str(path), "export", "missing or changed since verify: rerun `sauce-export run` to re-export"
            )
    if what == "adapter":
        folder, relation = run_dir / ADAPTER_DIR, "adapter"
        if not (folder / "adapter_config.json").is_file():
            raise InputError(
                str(folder),
                "--what adapter",
                "no adapter here: write one with `sauce-export export --format peft --patch "
                f"{run_dir}/fold/patch.safetensors --model SRC --out {folder}`",
            )
    else:
        folder, relation = model_dir, "finetune"
    card = None
    if not (folder / "README.md").is_file():
        card = render_card(report, folder, relation, model_dir=model_dir)  # type: ignore[arg-type]
    return Upload(folder, relation, card, report)  # type: ignore[arg-type]


def dry_run_listing(upload: Upload) -> list[dict[str, Any]]:
    """Exactly the files a push would send, with bytes and sha256; recorded weights are checked too."""
    import hashlib

    records = {r["name"]: r for r in file_records(upload.folder)}
    if upload.card is not None:
        data = upload.card.encode()
        records["README.md"] = {
            "name": "README.md",
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "note": "card, written on push",
        }
    if upload.relation == "finetune":
        for want in upload.report["export"]["files"]:
            got = records.get(want["name"])
            if got is None or got["sha256"] != want["sha256"]:
                raise InputError(
                    str(upload.folder / want["name"]),
                    "export",
                    "sha256 differs from report.json: changed since verify; rerun `sauce-export run`",
                )
    return [records[name] for name in upload.names()]


def _scrub(text: str, token: str | None) -> str:
    text = " ".join(text.split())  # one line
    return text.replace(token, "<HF_TOKEN>") if token else text


def push(
    upload: Upload,
    repo_id: str,
    token: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    endpoint: str | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """create_repo + upload_folder; returns the commit (and PR) URL. Never lets the token out."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    if constants.is_offline_mode():
        raise InputError("environment", "HF_HUB_OFFLINE", "is set: unset it to push (or use --dry-run)")
    concepts = ", ".join(f"{c['kind']}:{c['name']}" for c in upload.report["concepts"])
    message = commit_message or f"sauce-export: {concepts} removed ({upload.relation})"
    api = HfApi(endpoint=endpoint, token=token)
    try:
        url = api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        log(f"repo {url}")
        if private and api.model_info(repo_id).private is False:
            raise InputError(repo_id, "--private", "the repo already exists and is public: nothing uploaded")
        if revision and not revision.startswith("refs/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        if upload.card is not None:
            write_atomic(upload.folder / "README.md", upload.card)
            upload.card = None
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=upload.folder,
            revision=revision,
            create_pr=create_pr,
            commit_message=message,
            ignore_patterns=list(IGNORE),
        )
    except InputError:
        raise
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status in (401, 403):
            raise InputError(
                "environment", "HF_TOKEN", f"the Hub refused the token for {repo_id} (HTTP {status})"
            ) from None
        raise PushError(_scrub(f"{type(err).__name__}: {err}", token)) from None
    except Exception as err:  # a secret is in scope: nothing unscrubbed may propagate
        raise PushError(_scrub(f"{type(err).__name__}: {err}", token)) from None
    return {"repo_id": repo_id, "commit_url": info.commit_url, "pr_url": info.pr_url, "files": upload.names()}
