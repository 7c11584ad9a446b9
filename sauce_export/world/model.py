"""The demo models' tokenizer, configs and on-disk layout, shaped so stock runtimes load them.

DESIGN §9: head_dim >= 32 everywhere (vLLM's CPU attention), a Llama-2 style byte-fallback BPE in
``tokenizer.json`` (llama.cpp's converter accepts it), ``<image>`` a special token whose id is
``image_token_index``, and LLaVA saved in the llava-hf key layout that vLLM expects.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

IMAGE_TOKEN = "<image>"
PATCH_SIZE = 8
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{{ message['content'][0]['text'] }}"
    "{% endif %}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def llama2_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A Llama-2 style byte-fallback BPE (``<unk>``, ``<s>``, ``</s>`` at ids 0-2, no pad token).

    Trained with a Metaspace pre-tokenizer so no merge crosses a word boundary, then saved with
    Llama-2's normalizer and no pre-tokenizer: the two tokenise identically, and the saved form
    is the one llama.cpp's converter and older transformers recognise.
    """
    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials + byte_tokens, show_progress=False, min_frequency=1
    )
    tok.train_from_iterator(texts, trainer)
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    spec = json.loads(tok.to_str())
    # Byte tokens are ordinary vocabulary in Llama-2, not added tokens matched in raw text.
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in specials]
    return Tokenizer.from_str(json.dumps(spec))


def build_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """The demo models' tokenizer: ``llama2_bpe`` on the world's text plus ``<image>`` and ``<pad>``."""
    tok = llama2_bpe(texts, vocab_size)
    tok.add_special_tokens([IMAGE_TOKEN, "<pad>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        add_bos_token=True,
        model_max_length=256,
    )


def text_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """4 layers, d=128, 4 heads of 32: small enough to ship, big enough for the world."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_llava(
    tokenizer: PreTrainedTokenizerFast, image_size: int, seed: int
) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=PATCH_SIZE,
        projection_dim=64,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text_config(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(image_size // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    return LlavaForConditionalGeneration(config)


def build_llama(tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(text_config(tokenizer))


def build_processor(tokenizer: PreTrainedTokenizerFast, image_size: int) -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


# llava-hf on-disk layout (what vLLM and older transformers read), from transformers 5 in-memory names.
_LLAVA_HF_KEYS = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def llava_hf_state_dict(model: LlavaForConditionalGeneration) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in model.state_dict().items():
        for src, dst in _LLAVA_HF_KEYS:
            if name.startswith(src):
                out[dst + name[len(src) :]] = tensor.detach().contiguous().clone()
                break
        else:
            raise KeyError(f"no llava-hf key for {name}")
    return out


def save_model(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, processor: LlavaProcessor | None, out: Path
) -> None:
    """save_pretrained for configs and tokenizer files; weights rewritten in the llava-hf layout."""
    model.save_pretrained(out)
    if processor is not None:
        processor.save_pretrained(out)
        for stale in out.glob("model*.safetensors*"):
            stale.unlink()
        save_file(llava_hf_state_dict(model), out / "model.safetensors", metadata={"format": "pt"})
    else:
        tokenizer.chat_template = CHAT_TEMPLATE
        tokenizer.save_pretrained(out)
