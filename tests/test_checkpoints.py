"""Checkpoints as they really ship: no pad token, eos lists, tied embeddings, bf16, rope scaling,
sliding windows, byte-level BPE, shards - each through ``run`` end to end.

The fixtures are built here with tiny random weights (the tests are about the pipeline and the
files, not about forgetting), but their ``config.json``, ``generation_config.json``,
``tokenizer_config.json`` and ``special_tokens_map.json`` copy the fields and special-token
conventions of these public checkpoints (reconstructed from their published files, not fetched
here; sizes shrunk; the Llama-3 chat template abridged, the Mistral and Qwen2 ones as published):

- ``llama-3.2-1b``: meta-llama/Llama-3.2-1B-Instruct - byte-level BPE with its specials appended
  after the vocabulary, no pad token (``<|finetune_right_pad_id|>`` exists but is not declared),
  ``eos_token_id`` a list in both configs, tied embeddings (no ``lm_head.weight`` on disk),
  ``rope_scaling`` of type llama3, ``torch_dtype`` bfloat16;
- ``llama-3.2-3b-sharded``: the same conventions in two shards with ``model.safetensors.index.json``,
  as meta-llama/Llama-3.2-3B-Instruct ships (tied embeddings there too);
- ``mistral-7b``: mistralai/Mistral-7B-Instruct-v0.1 - Llama-2 style byte-fallback BPE, no pad token,
  ``LlamaTokenizer`` class, ``sliding_window`` 4096, a chat template that reads ``content`` as a string;
- ``qwen2-0.5b``: Qwen/Qwen2-0.5B-Instruct - byte-level BPE, no BOS, pad ``<|endoftext|>``, eos
  ``<|im_end|>``, an embedding with more rows than the tokenizer has tokens, tied embeddings.

Tokenizers are trained on the world's text rows, so every world question tokenises as it would for
a model that had learned the facts.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from sauce_export.cli import main
from sauce_export.data import Row, read_rows, write_jsonl
from sauce_export.dry_run import dry_run, format_plan
from sauce_export.edit import Edit
from sauce_export.errors import InputError
from sauce_export.export import read_layout
from sauce_export.fold import FoldConfig, projection_fold
from sauce_export.lm import encode_batch, load_model, padding_of
from sauce_export.patch import Patch
from sauce_export.recipe import load_recipe
from sauce_export.sae.model import SAE, SaeConfig

ROOT = Path(__file__).resolve().parent.parent
TINY = {  # every fixture's model: 2 layers, d_model 64, GQA 2/1, head_dim 32
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]
LLAMA3_TEMPLATE = (  # abridged: the published template also writes a system header with dates and tools
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim "
    "+ '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# --------------------------------------------------------------------------- building the fixtures


def _added(tok: Tokenizer) -> dict[str, dict[str, Any]]:
    """``added_tokens_decoder`` as transformers 4.4x writes it into tokenizer_config.json."""
    return {
        str(i): {
            "content": t.content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in sorted(tok.get_added_tokens_decoder().items())
    }


def _byte_level_bpe(texts: list[str], vocab_size: int, specials: list[str]) -> Tokenizer:
    """A GPT-2 style byte-level BPE with ``specials`` appended after the vocabulary (Llama-3, Qwen2)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        min_frequency=1,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(specials)
    return tok


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def _save_weights(out: Path, config_dir: Path, tied: bool, shards: int) -> None:
    """Random bf16 weights for the config in ``config_dir``; tied checkpoints store no lm_head."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir))
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    if tied:
        del state["lm_head.weight"]
    if shards == 1:
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
        return
    keys = sorted(
        state, key=lambda k: (int(m.group(1)) if (m := re.search(r"layers\.(\d+)\.", k)) else -1, k)
    )
    per = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i * per : (i + 1) * per]
        save_file({k: state[k] for k in part}, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    _write_json(
        out / "model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
    )


def _llama3(out: Path, texts: list[str], shards: int) -> None:
    tok = _byte_level_bpe(texts, 600, LLAMA3_SPECIALS)
    ids = {s: tok.token_to_id(s) for s in LLAMA3_SPECIALS}
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, ids[bos])]
    )
    eos = [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]
    out.mkdir(parents=True)
    tok.save(str(out / "tokenizer.json"))
    _write_json(
        out / "config.json",
        {
            "architectures": ["LlamaForCausalLM"],
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": ids[bos],
            "eos_token_id": eos,
            "head_dim": 32,
            "hidden_act": "silu",
            **TINY,
            "initializer_range": 0.02,
            "max_position_embeddings": 131072,
            "mlp_bias": False,
            "model_type": "llama",
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-05,
            "rope_scaling": {
                "factor": 32.0,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3",
            },
            "rope_theta": 500000.0,
            "tie_word_embeddings": True,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.45.0.dev0",
            "use_cache": True,
            "vocab_size": tok.get_vocab_size(),
        },
    )
    _write_json(
        out / "generation_config.json",
        {
            "bos_token_id": ids[bos],
            "do_sample": True,
            "eos_token_id": eos,
            "temperature": 0.6,
            "top_p": 0.9,
            "transformers_version": "4.45.0.dev0",
        },
    )
    _write_json(
        out / "tokenizer_config.json",
        {
            "added_tokens_decoder": _added(tok),
            "bos_token": bos,
            "chat_template": LLAMA3_TEMPLATE,
            "clean_up_tokenization_spaces": True,
            "eos_token": "<|eot_id|>",
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": 131072,
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )
    special = {"content": "", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    _write_json(
        out / "special_tokens_map.json",
        {"bos_token": {**special, "content": bos}, "eos_token": {**special, "content": "<|eot_id|>"}},
    )
    _save_weights(out, out, tied=True, shards=shards)


def _mistral(out: Path, texts: list[str]) -> None:
    from sauce_export.world.model import llama2_bpe

    tok = llama2_bpe(texts, 700)
    out.mkdir(parents=True)
    tok.save(str(out / "tokenizer.json"))
    _write_json(
        out / "config.json",
        {
            "architectures": ["MistralForCausalLM"],
            "bos_token_id": 1,
            "eos_token_id": 2,
            "hidden_act": "silu",
            **TINY,
            "initializer_range": 0.02,
            "max_position_embeddings": 32768,
            "model_type": "mistral",
            "rms_norm_eps": 1e-05,
            "rope_theta": 10000.0,
            "sliding_window": 4096,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.34.0.dev0",
            "use_cache": True,
            "vocab_size": tok.get_vocab_size(),
        },
    )
    _write_json(
        out / "generation_config.json",
        {
            "_from_model_config": True,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "transformers_version": "4.34.0.dev0",
        },
    )
    _write_json(
        out / "tokenizer_config.json",
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "added_tokens_decoder": _added(tok),
            "additional_special_tokens": [],
            "bos_token": "<s>",
            "chat_template": MISTRAL_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": "</s>",
            "legacy": True,
            "model_max_length": 1000000000000000019884624838656,
            "pad_token": None,
            "sp_model_kwargs": {},
            "spaces_between_special_tokens": False,
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": "<unk>",
            "use_default_system_prompt": False,
        },
    )
    _write_json(
        out / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    )
    _save_weights(out, out, tied=False, shards=1)


def _qwen2(out: Path, texts: list[str]) -> None:
    tok = _byte_level_bpe(texts, 600, QWEN2_SPECIALS)
    ids = {s: tok.token_to_id(s) for s in QWEN2_SPECIALS}
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    out.mkdir(parents=True)
    tok.save(str(out / "tokenizer.json"))
    _write_json(
        out / "config.json",
        {
            "architectures": ["Qwen2ForCausalLM"],
            "attention_dropout": 0.0,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "hidden_act": "silu",
            **TINY,
            "initializer_range": 0.02,
            "max_position_embeddings": 32768,
            "max_window_layers": 2,
            "model_type": "qwen2",
            "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0,
            "sliding_window": 32768,
            "tie_word_embeddings": True,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.40.1",
            "use_cache": True,
            "use_sliding_window": False,
            # Qwen2 rounds the embedding up past the tokenizer (151936 rows for 151646 tokens).
            "vocab_size": -(-tok.get_vocab_size() // 128) * 128 + 128,
        },
    )
    _write_json(
        out / "generation_config.json",
        {
            "bos_token_id": ids["<|endoftext|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "do_sample": True,
            "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
            "repetition_penalty": 1.1,
            "temperature": 0.7,
            "top_p": 0.8,
            "top_k": 20,
            "transformers_version": "4.37.0",
        },
    )
    _write_json(
        out / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "added_tokens_decoder": _added(tok),
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "bos_token": None,
            "chat_template": QWEN2_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 32768,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },
    )
    _write_json(
        out / "special_tokens_map.json",
        {
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "eos_token": {"content": "<|im_end|>", "lstrip": False, "normalized": False, "rstrip": False},
            "pad_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False},
        },
    )
    _save_weights(out, out, tied=True, shards=1)


BUILDERS: dict[str, Callable[[Path, list[str]], None]] = {
    "llama-3.2-1b": lambda out, texts: _llama3(out, texts, shards=1),
    "llama-3.2-3b-sharded": lambda out, texts: _llama3(out, texts, shards=2),
    "mistral-7b": _mistral,
    "qwen2-0.5b": _qwen2,
}
# (padding token, where it came from) each fixture's run must report
PADDING = {
    "llama-3.2-1b": ("<|eot_id|>", "eos_token"),
    "llama-3.2-3b-sharded": ("<|eot_id|>", "eos_token"),
    "mistral-7b": ("</s>", "eos_token"),
    "qwen2-0.5b": ("<|endoftext|>", "pad_token"),
}
TIED = {"llama-3.2-1b", "llama-3.2-3b-sharded", "qwen2-0.5b"}


def _about_answer(row: Row) -> dict[str, Any]:
    """A world fact row labelled by its answer, so ``hometown:<town>`` is a text concept."""
    labels = {**row.labels, row.question_kind: row.answer}
    return {
        "id": row.id,
        "prompt": row.prompt,
        "answer": row.answer,
        "labels": labels,
        "question_kind": row.question_kind,
        "split": row.split,
    }


@pytest.fixture(scope="module")
def text_world(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The world's text rows: train = its text training questions, eval = its fact questions."""
    out = tmp_path_factory.mktemp("text-world")
    train = [r for r in read_rows(tiny_world / "train.jsonl") if r.image is None]
    write_jsonl(out / "train.jsonl", [_about_answer(r) for r in train])
    write_jsonl(out / "eval.jsonl", [_about_answer(r) for r in read_rows(tiny_world / "facts.jsonl")])
    return out


@pytest.fixture(scope="module")
def shipped(text_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Fixture name -> its checkpoint directory, built on first use."""
    rows = read_rows(text_world / "train.jsonl") + read_rows(text_world / "eval.jsonl")
    texts = [f"{r.prompt} {r.answer}" for r in rows]
    root = tmp_path_factory.mktemp("shipped")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            BUILDERS[name](root / name, texts)
            built[name] = root / name
        return built[name]

    return get


def _recipe(path: Path, model: Path, world: Path, **fold: Any) -> Path:
    town = next(r for r in read_rows(world / "train.jsonl") if r.question_kind == "hometown").answer
    recipe = {
        "model": str(model),
        "site": "layers.1",
        "concepts": [{"kind": "hometown", "name": town}],
        "data": {"train": str(world / "train.jsonl"), "eval": str(world / "eval.jsonl")},
        "collect": {"max_rows": 96, "batch_size": 16},
        "sae": {"expansion": 2, "k": 8, "epochs": 2},
        "select": {"top_n": 3},
        "eval": {
            "batch_size": 64,
            "fidelity_rows": 8,
            "forget_split": "facts",
            "generality_split": "facts_paraphrase",
        },
        "fold": {"calib_rows": 48, "refine_steps": 5, **fold},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def shipped_run(
    shipped: Callable[[str], Path], text_world: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], Path]:
    """Fixture name -> the output directory of a finished ``run`` on it (run once per module)."""
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            tmp = tmp_path_factory.mktemp(f"run-{name}")
            recipe = _recipe(tmp / "recipe.yaml", shipped(name), text_world)
            assert main(["--quiet", "run", str(recipe), "--out", str(tmp / "run")]) in (0, 1)
            done[name] = tmp / "run"
        return done[name]

    return get


def _hashes(directory: Path) -> dict[str, str]:
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(BUILDERS))
def test_shipped_checkpoint_runs_end_to_end(
    name: str, shipped: Callable[[str], Path], shipped_run: Callable[[str], Path]
) -> None:
    source, out = shipped(name), shipped_run(name)
    report = json.loads((out / "report.json").read_text())
    token, where = PADDING[name]
    tokenizer = load_model(str(source)).tokenizer
    assert report["padding"] == {
        "id": tokenizer.convert_tokens_to_ids(token),
        "token": token,
        "source": where,
    }
    assert f"padded with id {report['padding']['id']}" in (out / "report.md").read_text()
    assert report["concepts"][0]["counts"]["forget_acc"] > 0  # the fact questions were scored
    for variant in ("original", "hooked", "folded", "exported"):
        assert report["concepts"][0]["metrics"][variant]["forget_acc"] is not None

    exported = Path(report["export"]["path"])
    src, dst = _hashes(source), _hashes(exported)
    weights = {n for n in src if n.endswith(".safetensors")}
    assert src.keys() == dst.keys() - {"README.md"}  # the card is the one file an export adds
    assert {n: src[n] for n in src.keys() - weights} == {n: dst[n] for n in src.keys() - weights}
    layout_src, layout_dst = read_layout(source), read_layout(exported)
    patched = {"model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    assert {n for n in weights if src[n] != dst[n]} == {layout_src.tensors[k].file for k in patched}
    assert layout_dst.tensors == layout_src.tensors  # names, shapes, dtypes and files: nothing added
    assert {t.dtype for t in layout_dst.tensors.values()} == {"BF16"}
    assert ("lm_head.weight" in layout_dst.tensors) == (name not in TIED)
    vocab_rows = layout_src.tensors["model.embed_tokens.weight"].shape[0]
    assert vocab_rows == json.loads((source / "config.json").read_text())["vocab_size"] >= len(tokenizer)


def test_tied_lora_export_equals_patched_model(
    shipped: Callable[[str], Path], shipped_run: Callable[[str], Path]
) -> None:
    """The exported tied checkpoint, reloaded, is the in-memory patched model, bit for bit (both bf16:
    the export adds the delta in float32 and rounds once, as ``Patch.apply`` does)."""
    source, out = shipped("llama-3.2-1b"), shipped_run("llama-3.2-1b")
    patch = Patch.load(out / "fold" / "patch.safetensors")
    assert patch.description["method"] == "lora"
    assert not any("embed" in m or "lm_head" in m for m in patch.modules)
    exported = out / "export" / "model"
    with (
        safe_open(str(exported / "model.safetensors"), "pt") as f,
        safe_open(str(source / "model.safetensors"), "pt") as g,
    ):
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118
        assert torch.equal(
            f.get_tensor("model.embed_tokens.weight"), g.get_tensor("model.embed_tokens.weight")
        )
    ids = torch.tensor([[3, 50, 120, 7, 301, 42, 9]])
    model = load_model(str(source), dtype=torch.bfloat16).model
    reloaded = load_model(str(exported), dtype=torch.bfloat16).model
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight  # still tied after loading
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with patch.apply(model):
            want = model(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    assert (want - before).abs().max() > 0
    assert torch.equal(got, want)


def test_padding_with_eos_is_masked(shipped: Callable[[str], Path], text_world: Path) -> None:
    """Rows padded with the eos id give the logits they give alone, and the tokenizer is left as it was."""
    lm = load_model(str(shipped("llama-3.2-1b")))
    vocab = len(lm.tokenizer)
    rows = read_rows(text_world / "eval.jsonl")[:4]
    batch = encode_batch(lm, rows)
    mask = batch.inputs["attention_mask"].bool()
    assert not mask.all()  # the rows differ in length, so some are padded
    assert (batch.inputs["input_ids"][~mask] == lm.tokenizer.convert_tokens_to_ids("<|eot_id|>")).all()
    assert lm.tokenizer.pad_token is None and len(lm.tokenizer) == vocab
    with torch.no_grad():
        together = lm.model(**batch.inputs).logits
        for i, row in enumerate(rows):
            alone = lm.model(**encode_batch(lm, [row]).inputs).logits[0]
            n = alone.shape[0]
            assert int(mask[i].sum()) == n
            assert (together[i, :n] - alone).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["llama-3.2-1b", "mistral-7b"])
def test_one_bos_when_the_template_writes_it(
    name: str, shipped: Callable[[str], Path], text_world: Path
) -> None:
    """Llama-3's and Mistral's chat templates start with BOS; the tokenizer must not add a second."""
    lm = load_model(str(shipped(name)))
    batch = encode_batch(lm, read_rows(text_world / "eval.jsonl")[:3])
    ids = batch.inputs["input_ids"]
    assert (ids[:, 0] == lm.tokenizer.bos_token_id).all()
    assert ((ids == lm.tokenizer.bos_token_id).sum(1) == 1).all()


def test_vlm_processor_pads_without_a_pad_token(
    tiny_llava_dir: Path, tiny_world: Path, tmp_path: Path
) -> None:
    """The processor path: the tiny LLaVA with its tokenizer's pad token undeclared (``<pad>`` stays
    in the vocabulary, as ``<|finetune_right_pad_id|>`` does in Llama-3) pads with eos."""
    source = tmp_path / "llava-no-pad"
    shutil.copytree(tiny_llava_dir, source)
    config = json.loads((source / "tokenizer_config.json").read_text())
    del config["pad_token"]
    _write_json(source / "tokenizer_config.json", config)
    lm = load_model(str(source))
    assert lm.is_vlm and lm.tokenizer.pad_token is None
    assert lm.padding.source == "eos_token"
    rows = [r for r in read_rows(tiny_world / "eval.jsonl") if r.image is not None]
    rows = sorted(rows, key=lambda r: len(r.prompt + r.answer))[::8][:3]  # different lengths
    batch = encode_batch(lm, rows)
    mask = batch.inputs["attention_mask"].bool()
    assert not mask.all()
    assert (batch.inputs["input_ids"][~mask] == lm.tokenizer.eos_token_id).all()
    assert lm.tokenizer.pad_token is None
    with torch.no_grad():
        together = lm.model(**batch.inputs).logits
        for i, row in enumerate(rows):
            alone = lm.model(**encode_batch(lm, [row]).inputs).logits[0]
            assert (together[i, : alone.shape[0]] - alone).abs().max() < 1e-4


def test_padding_fallbacks() -> None:
    """pad, else eos, else unk, else id 0 - always an id the vocabulary already has."""
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "<e>": 1, "<p>": 2, "a": 3}, unk_token="[UNK]"))
    cases = [
        ({"pad_token": "<p>", "eos_token": "<e>", "unk_token": "[UNK]"}, (2, "<p>", "pad_token")),
        ({"eos_token": "<e>", "unk_token": "[UNK]"}, (1, "<e>", "eos_token")),
        ({"unk_token": "[UNK]"}, (0, "[UNK]", "unk_token")),
        ({}, (0, "[UNK]", "id 0")),
    ]
    for specials, (token_id, token, source) in cases:
        padding = padding_of(PreTrainedTokenizerFast(tokenizer_object=tok, **specials))
        assert (padding.id, padding.token, padding.source) == (token_id, token, source)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_dry_run_reports_conventions(
    name: str, shipped: Callable[[str], Path], text_world: Path, tmp_path: Path
) -> None:
    source = shipped(name)
    plan = dry_run(load_recipe(_recipe(tmp_path / "recipe.yaml", source, text_world)))
    conv = plan["conventions"]
    token, where = PADDING[name]
    assert (conv["padding"]["token"], conv["padding"]["source"]) == (token, where)
    assert conv["tied_embeddings"] == (name in TIED)
    assert plan["source_dtype"] == "bfloat16"
    config = json.loads((source / "config.json").read_text())
    assert conv["eos_token_id"] == config["eos_token_id"]
    if name.startswith("llama"):
        assert isinstance(conv["eos_token_id"], list) and conv["rope_scaling"]["rope_type"] == "llama3"
        assert conv["rope_scaling"]["factor"] == 32.0
    else:
        assert conv["rope_scaling"] is None
    assert conv["sliding_window"] == (4096 if name == "mistral-7b" else None)  # Qwen2: use_sliding_window off
    table = format_plan(plan)
    assert f"id {conv['padding']['id']} {token!r} ({where})" in table
    assert ("lm_head is tied" in table) == (name in TIED)


def test_projection_refuses_tied_embeddings(shipped: Callable[[str], Path]) -> None:
    """Projection would also edit the output vocabulary through the tie; without the embedding it
    writes only the layers' writers, and never lm_head."""
    lm = load_model(str(shipped("llama-3.2-1b")))
    sae = SAE(SaeConfig(d_in=64, d_sae=128, site="layers.1"))
    edit = Edit(sae=sae, features=(3, 7), site="layers.1")
    with pytest.raises(InputError, match="tied to lm_head"):
        projection_fold(lm.model, edit, FoldConfig(method="projection"))
    patch = projection_fold(lm.model, edit, FoldConfig(method="projection", include_embed=False))
    assert not any("embed" in m or "lm_head" in m for m in patch.modules)


def test_no_code_path_grows_the_vocabulary() -> None:
    """Adding tokens or resizing embeddings would change an exported checkpoint's embedding matrix;
    only the world builder (which makes its own tokenizer from scratch) may add tokens."""
    pattern = re.compile(r"\b(add_tokens|add_special_tokens|resize_token_embeddings)\s*\(")
    offenders = [
        str(p.relative_to(ROOT))
        for p in sorted((ROOT / "sauce_export").rglob("*.py"))
        if "world" not in p.parts and pattern.search(p.read_text())
    ]
    assert offenders == []
