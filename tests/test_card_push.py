"""Model card, `inspect` and `push`, on a tiny run; `push` drives the real huggingface_hub client
against a loopback HTTP server that implements the few Hub endpoints it calls (no network)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import yaml

from sauce_export.card import hub_base_model, render_card
from sauce_export.cli import main

TOKEN = "hf_testSECRETtoken0123456789"
RELATIONS = {"adapter", "merge", "quantized", "finetune"}


# --------------------------------------------------------------------------- a tiny finished run


def _report(run: Path) -> dict[str, Any]:
    return json.loads((run / "report.json").read_text())


def _front_matter(text: str) -> dict[str, Any]:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def _one_error_line(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sauce-export: error:")
    assert all(n in lines[0] for n in needles), lines[0]


# --------------------------------------------------------------------------- the card


def test_run_writes_card(tiny_run: Path) -> None:
    report = _report(tiny_run)
    card = (tiny_run / "export" / "model" / "README.md").read_text()
    meta = _front_matter(card)
    assert set(meta["tags"]) == {"sauce-export", "unlearning", "concept-removal", "sae"}
    assert "base_model" not in meta and "base_model_relation" not in meta  # a local source: no Hub link
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-text-to-text"
    prov = meta["sauce_export"]
    assert prov["site"] == "layers.1" and prov["fold"]["method"] == "lora"
    assert prov["sae"]["d_sae"] == report["sae"]["d_sae"] and prov["sae"]["k"] == 8
    assert prov["edit"]["clamp"] == 0.0 and prov["gates_passed"] == report["gates"]["passed"]
    assert [c["features"] for c in prov["concepts"]] == [c["features"] for c in report["concepts"]]
    for c in report["concepts"]:
        assert f"| {c['kind']} | {c['name']} |" in card and str(c["features"]) in card
        assert f"| {c['kind']}:{c['name']} (chance {c['chance_acc']:.3f}) | exported |" in card
    person, event = report["concepts"]
    assert (person["clamp"], event["clamp"]) == (0.0, -5.0)  # the event's own target, the recipe's default
    # the person is calibrated on validation rows (carved out of train), the event set by the recipe
    assert person["calibrated"] and not event["calibrated"] and len(event["features"]) == 2
    choice = report["calibration"]["choices"][f"person:{person['name']}"]
    assert len(person["features"]) == choice["top_n"] and "carved out of" in card
    assert f"person {person['name']} c = 0.0, event concert c = -5.0" in card
    assert event["select"] == {"method": "saeuron", "top_n": 2, "percentile": None}
    picked = f"{choice['method']} scores, top {choice['top_n']}"
    assert f"person {person['name']}: {picked}; event concert: saeuron scores, top 2" in card
    union = sorted({f for c in report["concepts"] for f in c["features"]})
    assert f"S = {union}" in card
    assert "Method `lora`" in card and "model.language_model.layers.1.mlp.down_proj" in card
    assert "kl_vs_hooked_retain" in card and "top1_agree_vs_hooked" in card
    assert ("### Gates: all passed" if report["gates"]["passed"] else "### Gates: FAILED") in card
    assert "FVU | L0 | dead fraction |" in card and f"{report['sae']['fvu']:.4f}" in card
    recipe_text = Path(report["recipe"]["path"]).read_text().rstrip("\n")
    assert f"```yaml\n{recipe_text}\n```" in card  # verbatim, comment and braces included
    assert "Computed in float32 on cpu (`runtime`" in card  # the tiny model's own dtype, one process
    assert "AutoModelForImageTextToText.from_pretrained(path)" in card and "LLM(model=path)" in card
    assert "convert_hf_to_gguf.py" in card
    assert "not a proof of erasure" in card and "fine-tuning" in card and "probes" in card
    for f in report["export"]["files"]:
        assert f"`{f['sha256']}`" in card
    assert "[export/model/README.md](export/model/README.md)" in (tiny_run / "report.md").read_text()
    assert not list((tiny_run / "export" / "model").glob(".*tmp"))


def test_card_metadata_names_hub_base_models(tiny_run: Path, tmp_path: Path) -> None:
    assert hub_base_model("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    assert hub_base_model("/root/.cache/huggingface/hub/models--org--name/snapshots/abc") == "org/name"
    assert hub_base_model(str(tmp_path)) is None  # a local directory
    assert hub_base_model("./models/x") is None and hub_base_model("a/b/c") is None
    report = _report(tiny_run) | {"model": "org/base-model"}
    folder = tiny_run / "export" / "model"
    meta = _front_matter(render_card(report, folder))
    assert meta["base_model"] == "org/base-model" and meta["base_model_relation"] == "finetune"
    meta = _front_matter(render_card(report, folder, relation="adapter"))
    assert meta["base_model_relation"] == "adapter" and meta["library_name"] == "peft"
    assert meta["base_model_relation"] in RELATIONS


# --------------------------------------------------------------------------- inspect


def test_inspect(
    tiny_run: Path, tiny_llava_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tiny_run / "export" / "model"
    assert main(["inspect", str(model)]) == 0
    out = capsys.readouterr().out
    assert "model.safetensors __metadata__" in out and '"method": "lora"' in out
    assert "README.md metadata:" in out and "- sauce-export" in out
    assert main(["inspect", str(model), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    entry = info["safetensors"]["model.safetensors"]["sauce_export"]
    assert entry["fold"]["method"] == "lora" and entry["recipe"] == _report(tiny_run)["recipe"]["path"]
    patch_bytes = (tiny_run / "fold" / "patch.safetensors").read_bytes()
    assert entry["patch_sha256"] == hashlib.sha256(patch_bytes).hexdigest()
    assert info["card"]["sauce_export"]["site"] == "layers.1"

    for bad, needle in ((tiny_llava_dir, "no sauce-export provenance"), (tmp_path / "nope", "not found")):
        assert main(["inspect", str(bad)]) == 2
        _one_error_line(capsys.readouterr().err, str(bad), needle)


# --------------------------------------------------------------------------- push: dry run and bad input


def test_push_dry_run_lists_files(
    tiny_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: a request would fail
    assert main(["push", str(tiny_run), "--repo-id", "org/name", "--dry-run", "--private"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("dry run, nothing sent:") and "org/name (private" in out[0]
    model = tiny_run / "export" / "model"
    want = [
        f"{p.stat().st_size:>14}  {hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}"
        for p in sorted(model.iterdir())
    ]
    assert out[1:] == want and any(line.endswith("README.md") for line in out)


@pytest.fixture
def bare_runs(tiny_run: Path, tmp_path: Path) -> dict[str, Path]:
    no_export = tmp_path / "no-export"
    no_export.mkdir()
    shutil.copy(tiny_run / "report.json", no_export / "report.json")
    report = _report(tiny_run)
    report["export"]["path"] = str(tmp_path / "gone")
    (no_export / "report.json").write_text(json.dumps(report))
    return {"empty": tmp_path, "no_export": no_export}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["RUN", "--repo-id", "org/name"], "HF_TOKEN"),
        (["EMPTY", "--repo-id", "org/name", "--dry-run"], "report.json"),
        (["NO_EXPORT", "--repo-id", "org/name", "--dry-run"], "no finished export"),
        (["RUN", "--repo-id", "not a/repo id!", "--dry-run"], "--repo-id"),
        (["RUN", "--repo-id", "org/name", "--create-pr", "--revision", "dev"], "--create-pr"),
        (["RUN", "--repo-id", "org/name", "--what", "adapter", "--dry-run"], "no adapter here"),
    ],
)
def test_push_bad_input_exits_2(
    tiny_run: Path,
    bare_runs: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    needle: str,
) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    dirs = {"RUN": tiny_run, "EMPTY": bare_runs["empty"], "NO_EXPORT": bare_runs["no_export"]}
    assert main(["push", *[str(dirs.get(a, a)) for a in args]]) == 2
    _one_error_line(capsys.readouterr().err, needle)


# --------------------------------------------------------------------------- push: the loopback Hub


class FakeHub(ThreadingHTTPServer):
    """Just enough of the Hub API for create_repo, create_branch, model_info, create_pull_request and
    upload_folder (preupload answers "regular" for every file, so no LFS / Xet storage is needed)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.calls: list[tuple[str, str]] = []
        self.auth: set[str | None] = set()
        self.repos: dict[str, dict[str, Any]] = {
            "org/already-public": {"private": False, "branches": {"main"}}
        }
        self.creates: list[dict[str, Any]] = []
        self.commits: list[dict[str, Any]] = []
        self.validated: list[dict[str, Any]] = []
        self.prs = 0


def _validate_yaml(content: str) -> list[str]:
    """The Hub's rules that a generated card can break: base_model must be a model id, the relation
    one of four values and only with a base model, tags a list of strings."""
    meta = yaml.safe_load(content.split("---\n")[1]) if content.startswith("---\n") else {}
    errors = []
    bases = meta.get("base_model") or []
    for base in [bases] if isinstance(bases, str) else bases:
        if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", base) or base.startswith((".", "/")):
            errors.append(f'"base_model" with value "{base}" is not valid')
    relation = meta.get("base_model_relation")
    if relation is not None and (relation not in RELATIONS or not bases):
        errors.append(f'"base_model_relation" with value "{relation}" is not valid')
    if not all(isinstance(t, str) for t in meta.get("tags", [])):
        errors.append('"tags" must be a list of strings')
    return errors


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeHub

    def log_message(self, *args: Any) -> None:
        pass

    def _reply(self, status: int, payload: Any) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._route("GET", b"")

    def do_POST(self) -> None:
        self._route("POST", self.rfile.read(int(self.headers.get("Content-Length") or 0)))

    def _route(self, method: str, body: bytes) -> None:
        hub, url = self.server, urlsplit(self.path)
        hub.calls.append((method, url.path))
        hub.auth.add(self.headers.get("authorization"))
        repo = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(\w+)(?:/(.+))?)?", url.path)
        if method == "POST" and url.path == "/api/repos/create":
            data = json.loads(body)
            hub.creates.append(data)
            repo_id = f"{data['organization']}/{data['name']}"
            if data["name"] == "refuses":  # a server error that echoes the request's credentials
                return self._reply(400, {"error": f"rejected {self.headers.get('authorization')}"})
            if repo_id in hub.repos:
                # like the Hub: create_repo(exist_ok=True) reads the url from the 409 body
                return self._reply(
                    409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"}
                )
            hub.repos[repo_id] = {"private": data.get("visibility") == "private", "branches": {"main"}}
            return self._reply(200, {"url": f"{hub.url}/{repo_id}"})
        if method == "POST" and url.path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            errors = _validate_yaml(content)
            hub.validated.append({"content": content, "errors": errors})
            return self._reply(
                400 if errors else 200, {"errors": [{"message": e} for e in errors], "warnings": []}
            )
        if repo is None or repo[1] not in hub.repos:
            return self._reply(404, {"error": f"not found: {method} {url.path}"})
        repo_id, action, rest = repo[1], repo[2], unquote(repo[3] or "")
        state = hub.repos[repo_id]
        if method == "GET" and action is None:
            return self._reply(200, {"id": repo_id, "private": state["private"], "sha": "0" * 40})
        if method == "POST" and action == "branch":
            state["branches"].add(rest)
            return self._reply(200, {})
        if method == "POST" and action == "discussions":
            hub.prs += 1
            state["branches"].add(f"refs/pr/{hub.prs}")
            state["pr_title"] = json.loads(body)["title"]
            return self._reply(200, {"num": hub.prs})
        if method == "GET" and action == "discussions":
            return self._reply(
                200,
                {
                    "title": state["pr_title"],
                    "num": int(rest),
                    "author": {"name": "tester"},
                    "createdAt": "2026-01-01T00:00:00.000Z",
                    "status": "draft",
                    "repo": {"name": repo_id, "type": "model"},
                    "isPullRequest": True,
                    "events": [],
                    "changes": {"base": "refs/heads/main"},
                    "filesWithConflicts": [],
                },
            )
        if method == "POST" and action in ("preupload", "commit") and rest not in state["branches"]:
            return self._reply(404, {"error": f"Invalid rev id: {rest}"})
        if method == "POST" and action == "preupload":
            files = json.loads(body)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            return self._reply(200, {"files": modes})
        if method == "POST" and action == "commit":
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            files = {
                item["value"]["path"]: base64.b64decode(item["value"]["content"])
                for item in lines
                if item["key"] == "file"
            }
            other = [item["key"] for item in lines if item["key"] not in ("header", "file")]
            oid = hashlib.sha1(body).hexdigest()
            hub.commits.append(
                {
                    "repo": repo_id,
                    "revision": rest,
                    "header": lines[0]["value"],
                    "files": files,
                    "other": other,
                }
            )
            return self._reply(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid})
        return self._reply(404, {"error": f"not implemented: {method} {url.path}"})


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    import huggingface_hub.constants

    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # conftest turns it on
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    yield server
    server.shutdown()
    server.server_close()


def _push(capfd: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["--quiet", "push", *args])
    out, err = capfd.readouterr()
    assert TOKEN not in out and TOKEN not in err
    return code, out, err


def test_push_to_loopback_hub(
    tiny_run: Path, hub: FakeHub, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    model = tiny_run / "export" / "model"
    flags = ["--private", "--revision", "dev", "--commit-message", "remove two concepts"]
    code, out, _ = _push(capfd, str(tiny_run), "--repo-id", "org/unlearned", *flags)
    assert code == 0 and "pushed" in out
    assert hub.creates[0]["visibility"] == "private" and hub.creates[0]["name"] == "unlearned"
    assert "dev" in hub.repos["org/unlearned"]["branches"]
    (commit,) = hub.commits
    assert commit["revision"] == "dev" and commit["header"]["summary"] == "remove two concepts"
    assert commit["other"] == []  # every file went as a regular upload, nothing deleted
    assert sorted(commit["files"]) == sorted(p.name for p in model.iterdir())
    assert all(commit["files"][p.name] == p.read_bytes() for p in model.iterdir())
    card = commit["files"]["README.md"].decode()
    assert _front_matter(card)["sauce_export"]["site"] == "layers.1"
    assert hub.validated[0]["content"] == card and hub.validated[0]["errors"] == []
    assert hub.auth == {f"Bearer {TOKEN}"}  # the token was used ... but never shown (checked in _push)

    code, out, err = _push(capfd, str(tiny_run), "--repo-id", "org/unlearned", "--create-pr")
    assert code == 0 and out.strip().endswith("/discussions/1"), (err, hub.calls[-6:])
    assert hub.commits[-1]["revision"] == "refs/pr/1" and len(hub.commits) == 2
    assert "visibility" not in hub.creates[1]  # no --private: the account's default, not "public"

    # --private never uploads into a repo that already exists as public
    code, _, err = _push(capfd, str(tiny_run), "--repo-id", "org/already-public", "--private")
    assert code == 2 and len(hub.commits) == 2
    _one_error_line(err, "--private", "public")

    # a Hub error that echoes the credentials is reported on one line with the token scrubbed
    code, _, err = _push(capfd, str(tiny_run), "--repo-id", "org/refuses")
    assert code == 1 and "<HF_TOKEN>" in err
    _one_error_line(err, "org/refuses", "failed")
    assert TOKEN not in caplog.text


def test_push_adapter_renders_its_card(
    tiny_run: Path, tiny_llava_dir: Path, tmp_path: Path, hub: FakeHub, capfd: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"  # a copy of the run whose source is named by a Hub id
    shutil.copytree(tiny_run / "export" / "model", run / "export" / "model")
    report = _report(tiny_run) | {"model": "org/base-model"}
    (run / "report.json").write_text(json.dumps(report))
    patch = tiny_run / "fold" / "patch.safetensors"
    adapter = run / "export" / "adapter"
    export = ["export", "--patch", str(patch), "--model", str(tiny_llava_dir), "--format", "peft"]
    assert main(["--quiet", *export, "--out", str(adapter)]) == 0
    capfd.readouterr()

    code, out, _ = _push(capfd, str(run), "--repo-id", "org/adapter", "--what", "adapter", "--dry-run")
    assert code == 0 and not (adapter / "README.md").exists()  # a dry run writes nothing
    listed = [line.split()[2] for line in out.strip().splitlines()[1:]]
    assert listed == sorted([p.name for p in adapter.iterdir()] + ["README.md"])
    assert "(card, written on push)" in out

    code, out, _ = _push(capfd, str(run), "--repo-id", "org/adapter", "--what", "adapter")
    assert code == 0
    (commit,) = hub.commits
    assert sorted(commit["files"]) == listed
    meta = _front_matter(commit["files"]["README.md"].decode())
    assert meta["base_model"] == "org/base-model" and meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "peft" and hub.validated[-1]["errors"] == []
    assert (adapter / "README.md").read_bytes() == commit["files"]["README.md"]
