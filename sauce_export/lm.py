"""Load a model from a local path or Hub id, turn data rows into batches, score greedy answers.

Greedy answers are scored by teacher forcing: a row is correct iff the argmax at every answer
position (answer tokens + EOS) equals the expected token. That is exactly "greedy decoding
produces the answer and stops", at the cost of one forward pass instead of a generate loop.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)
from transformers import logging as hf_logging

from sauce_export.data import Row
from sauce_export.errors import InputError, first_line, unpickling_problem
from sauce_export.hf_config import NO_REMOTE_CODE, read_config


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    processor: object | None
    path: str

    @property
    def local_dir(self) -> Path:
        """The checkpoint directory on disk (a Hub id resolves to its local cache snapshot)."""
        if Path(self.path).is_dir():
            return Path(self.path)
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(self.path, local_files_only=True))

    @property
    def dtype(self) -> torch.dtype:
        """The model's parameter dtype (``runtime.dtype``); inputs' floating tensors are cast to it."""
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        """Where inputs go: the input embeddings' device (the first one under a ``device_map``)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def is_vlm(self) -> bool:
        return self.processor is not None

    @property
    def padding(self) -> Padding:
        return padding_of(self.tokenizer)

    @property
    def image_token_id(self) -> int | None:
        return getattr(
            self.model.config, "image_token_index", getattr(self.model.config, "image_token_id", None)
        )


@dataclass(frozen=True)
class Padding:
    """The id that fills batches: always an existing token, only ever under a zero attention mask."""

    id: int
    token: str | None
    source: str
    """``pad_token``, ``eos_token``, ``unk_token`` or ``id 0`` (the tokenizer has none of them)."""


def padding_of(tokenizer: Any) -> Padding:
    """The tokenizer's own pad token, else eos, else unk, else id 0.

    Llama-2/3 and Mistral ship without a pad token. Adding one would grow the vocabulary and the
    embedding matrix of the exported checkpoint, so an existing id is reused instead: padded positions
    are masked out of attention, the loss, the activations and every metric, so which id sits there
    never matters.
    """
    for source in ("pad_token", "eos_token", "unk_token"):
        token_id = getattr(tokenizer, f"{source}_id", None)
        if isinstance(token_id, int):
            return Padding(token_id, getattr(tokenizer, source), source)
    return Padding(0, tokenizer.convert_ids_to_tokens(0), "id 0")


@contextmanager
def padding_with(tokenizer: Any) -> Iterator[Padding]:
    """While encoding, a tokenizer without a pad token pads with ``padding_of``'s existing token.

    Only the in-memory attribute is set, never the vocabulary; it is put back on exit, so the
    tokenizer (and anything saved from it) stays exactly the checkpoint's.
    """
    padding = padding_of(tokenizer)
    if padding.source == "pad_token":
        yield padding
        return
    previous, tokenizer.pad_token = tokenizer.pad_token, padding.token
    try:
        yield padding
    finally:
        tokenizer.pad_token = previous


def load_model(
    path: str,
    where: str = "model",
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
    device_map: str | None = None,
) -> LoadedModel:
    """Load with stock Auto classes, never the model's own code; a missing path, an unreachable Hub id
    or a model that needs its own code is an InputError.

    The weights are read straight into ``dtype`` on ``device`` (or spread by ``device_map``), so no
    float32 or CPU copy of the whole model is ever made first.
    """
    local = Path(path)
    if not local.exists() and (path.startswith((".", "/", "~")) or path.count("/") != 1):
        raise InputError(where, "model", f"{path!r} is neither a local directory nor a Hub id (org/name)")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # our stages show their own progress
    config = read_config(path, where)
    if local.is_dir():
        check_weight_files(local, quantized=getattr(config, "quantization_config", None) is not None)
    options: dict[str, Any] = {"config": config, "dtype": dtype, **NO_REMOTE_CODE}
    if device_map is not None or (device is not None and device.type != "cpu"):
        options["device_map"] = device_map or str(device)
    try:
        if hasattr(config, "vision_config"):
            model = AutoModelForImageTextToText.from_pretrained(path, **options)
            processor = AutoProcessor.from_pretrained(path, **NO_REMOTE_CODE)
            tokenizer = processor.tokenizer
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **options)
            processor = None
            tokenizer = AutoTokenizer.from_pretrained(path, **NO_REMOTE_CODE)
    except pickle.UnpicklingError as err:
        raise InputError(
            where,
            "model",
            f"pickle weights of {path!r} refused by weights_only loading ({unpickling_problem(err)})",
        ) from None
    except OSError as err:
        raise InputError(
            where, "model", f"cannot load {path!r} (offline or missing files: {first_line(err)})"
        ) from err
    model.eval()
    return LoadedModel(model, tokenizer, processor, path)


def check_weight_files(directory: Path, quantized: bool = False) -> None:
    """Every ``*.safetensors`` file opens (a complete header and data) and stores its ``.weight``
    tensors as floating point: transformers would otherwise stop with a traceback, or silently cast
    an integer weight to float. Only headers are read, so this costs milliseconds."""
    for file in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
                    dtype = f.get_slice(key).get_dtype()
                    if key.endswith(".weight") and not quantized and not dtype.startswith(("F", "BF")):
                        raise InputError(
                            str(file),
                            key,
                            f"stored as {dtype}: weights must be floating point (refusing to cast it)",
                        )
        except SafetensorError as err:
            raise InputError(str(file), "header", f"not a complete safetensors file ({err})") from None


def chat_prompt(lm: LoadedModel, question: str, has_image: bool) -> str:
    """The model's own chat template (so real checkpoints get their real format).

    A VLM's template reads a list of typed parts; a text model's (Llama-3, Mistral, Qwen2) reads
    ``content`` as a string, so it gets one.
    """
    content: str | list[dict[str, str]] = question
    if lm.is_vlm:
        content = [{"type": "image"}] if has_image else []
        content.append({"type": "text", "text": question})
    messages = [{"role": "user", "content": content}]
    owner = lm.processor if lm.processor is not None else lm.tokenizer
    if getattr(owner, "chat_template", None):
        return owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return ("<image>\n" if has_image else "") + question


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]
    """Model inputs (input_ids, attention_mask, maybe pixel_values), right-padded."""
    answer_mask: torch.Tensor
    """[B, T] bool: positions whose *next-token prediction* is an answer token (or EOS)."""
    targets: torch.Tensor
    """[B, T] long: the expected next token where answer_mask, else -100."""
    rows: Sequence[Row]


def answer_text(lm: LoadedModel, row: Row) -> tuple[str, str]:
    """(prompt, prompt + answer + EOS) in the model's chat format: what is trained and scored."""
    prompt = chat_prompt(lm, row.prompt, row.image is not None)
    return prompt, prompt + " " + row.answer + lm.tokenizer.eos_token


def answer_length(tokenizer: Any, prompt: str, full: str) -> int:
    """Tokens the answer adds (answer + EOS), image placeholders unexpanded on both sides."""
    return len(tokenizer(full).input_ids) - len(tokenizer(prompt).input_ids)


def answer_targets(
    ids: torch.Tensor, lengths: Sequence[int], n_answer: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, targets) for right-padded rows: logits at position t predict token t+1, so the
    answer tokens ``[length - n, length)`` are targets at positions ``[length - n - 1, length - 1)``."""
    mask = torch.zeros_like(ids, dtype=torch.bool)
    targets = torch.full_like(ids, -100)
    for i, (length, n) in enumerate(zip(lengths, n_answer, strict=True)):
        mask[i, length - n - 1 : length - 1] = True
        targets[i, length - n - 1 : length - 1] = ids[i, length - n : length]
    return mask, targets


def encode_batch(lm: LoadedModel, rows: Sequence[Row]) -> Batch:
    """Prompt + answer + EOS for every row; rows must all have images or all have none."""
    has_image = rows[0].image is not None
    if any((r.image is not None) != has_image for r in rows):
        raise ValueError("encode_batch needs rows that all have, or all lack, an image")
    texts = [answer_text(lm, r) for r in rows]
    fulls = [full for _, full in texts]
    n_answer = [answer_length(lm.tokenizer, prompt, full) for prompt, full in texts]
    # A chat template that writes BOS itself (Llama-3, Mistral) must not get a second from the tokenizer.
    bos = lm.tokenizer.bos_token
    once = {"add_special_tokens": False} if bos and fulls[0].startswith(bos) else {}
    # The processor pads with its tokenizer, the same object as lm.tokenizer.
    with padding_with(lm.tokenizer):
        if has_image:
            images = [_rgb(r.image) for r in rows]  # type: ignore[arg-type]
            enc = lm.processor(
                text=fulls, images=images, padding=True, padding_side="right", return_tensors="pt", **once
            )
        else:
            enc = lm.tokenizer(fulls, padding=True, padding_side="right", return_tensors="pt", **once)
    answer_mask, targets = answer_targets(enc["input_ids"], enc["attention_mask"].sum(1).tolist(), n_answer)
    # On the model's device; pixel values in the model's dtype (the processor returns float32).
    inputs = {
        k: v.to(lm.device, lm.dtype) if v.is_floating_point() else v.to(lm.device) for k, v in enc.items()
    }
    return Batch(inputs, answer_mask.to(lm.device), targets.to(lm.device), rows)


def _rgb(path: Path) -> Image.Image:
    """The image's pixels; a file whose header read fine but whose data is broken is an InputError."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except OSError as err:
        raise InputError(str(path), "image", f"cannot decode the image ({first_line(err)})") from None


def batches(lm: LoadedModel, rows: Sequence[Row], batch_size: int) -> Iterator[Batch]:
    """Group rows by image/no-image, keep order within each group, yield encoded batches."""
    for group in ([r for r in rows if r.image is not None], [r for r in rows if r.image is None]):
        for start in range(0, len(group), batch_size):
            yield encode_batch(lm, group[start : start + batch_size])


def correct(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """[B] bool: greedy decoding reproduces the answer exactly, EOS included."""
    pred = logits.argmax(-1)
    ok = (pred == batch.targets) | ~batch.answer_mask
    return ok.all(dim=1)
