"""The shipped tiny text-to-image pipeline and the classifier that judges its images.

The pipeline is a diffusers ``IFPipeline`` folder (pixel space, no VAE): a tiny CLIP text encoder
and tokenizer, a ``UNet2DConditionModel`` with cross-attention and a DPM-Solver++ scheduler, so
stock ``DiffusionPipeline.from_pretrained`` loads it. ``sample`` is the same loop as IFPipeline's
(classifier-free guidance included) written out so the stages can hook the UNet and batch rows
that each carry their own noise seed.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sauce_export.diffusion import world as W

MAX_TOKENS = 77  # IFPipeline pads every prompt to 77 tokens


@dataclass
class DiffusionTrainConfig:
    seed: int = 0
    """Seed of the weights, the renders and the training noise."""
    steps: int = 3000
    """Optimizer steps of the UNet and text encoder."""
    batch_size: int = 32
    """Images per step."""
    lr: float = 1.5e-3
    """Peak AdamW learning rate (cosine decay after 100 warm-up steps)."""
    uncond_prob: float = 0.1
    """Share of captions replaced by the empty prompt (classifier-free guidance)."""
    ema: float = 0.999
    """Decay of the exponential moving average of the weights that is saved (0: the last weights).
    The last weights drew blobs between square and circle (validation objects 0.74); 1,500 more steps
    with the average gave 0.92 (docs/diffusion.md)."""
    threads: int = 1
    """torch threads (1 is fastest on a shared 2-core machine)."""
    init: str = ""
    """A pipeline folder to continue training from (its tokenizer, text encoder, UNet and scheduler)
    instead of new weights from ``seed``."""


@dataclass(frozen=True)
class Sampling:
    """How images are generated everywhere (hooked, folded, exported, stock pipeline)."""

    steps: int = 12
    guidance: float = 3.0


def make_tokenizer():  # type: ignore[no-untyped-def]
    """A CLIP BPE tokenizer whose vocabulary holds each world word as one token."""
    import tempfile

    from transformers import CLIPTokenizer

    words = sorted(
        {w for t in W.TEMPLATES for w in t.format(object="", style="").replace(",", " , ").split()}
    )
    words = sorted(set(words) | set(W.OBJECTS) | set(W.STYLES))
    vocab: dict[str, int] = {}
    chars = sorted(set("".join(words)))
    for tok in [*chars, *(c + "</w>" for c in chars)]:
        vocab[tok] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in words:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            if (parts[0], parts[1]) not in merges:
                merges.append((parts[0], parts[1]))
            parts = [parts[0] + parts[1], *parts[2:]]
            vocab.setdefault(parts[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        (directory / "vocab.json").write_text(json.dumps(vocab))
        (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))


def make_models(vocab_size: int, bos: int, eos: int, seed: int):  # type: ignore[no-untyped-def]
    from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=W.IMAGE_SIZE,
        in_channels=3,
        out_channels=6,  # IFPipeline splits a learned-variance half off; DPM-Solver++ ignores it
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 48),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    # The UNet predicts the clean image ("sample"): on these near-deterministic renders an
    # epsilon-predicting UNet of the same size and budget sampled washed-out colours (object
    # accuracy 0.38), while its x0 estimates at t <= 300 were exact. Thresholding clamps x0 to [-1, 1].
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="sample",
        thresholding=True,
    )
    return text, unet, scheduler


def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Prompt embeddings exactly as IFPipeline.encode_prompt computes them."""
    enc = tokenizer(
        prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
    )
    return text_encoder(enc.input_ids, attention_mask=enc.attention_mask)[0]


def initial_noise(seeds: list[int]) -> torch.Tensor:
    """Each row's starting noise from its own seed (IFPipeline's draw for one prompt)."""
    shape = (1, 3, W.IMAGE_SIZE, W.IMAGE_SIZE)
    return torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


@torch.no_grad()
def sample(pipe, prompts: list[str], seeds: list[int], cfg: Sampling | None = None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Images in [0, 1], shape (B, 3, H, W): IFPipeline's denoising loop, batch of rows."""
    import copy

    cfg = cfg or Sampling()
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(cfg.steps)
    cond = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts)
    uncond = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""]).expand_as(cond)
    emb = torch.cat([uncond, cond])
    x = initial_noise(seeds) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(torch.cat([x, x]), t)
        eps = pipe.unet(inp, t, encoder_hidden_states=emb).sample[:, :3]
        e_u, e_c = eps.chunk(2)
        x = scheduler.step(e_u + cfg.guidance * (e_c - e_u), t, x).prev_sample
    return (x / 2 + 0.5).clamp(0, 1)


def quiet_loading() -> None:
    """No loading bars or type warnings from diffusers/transformers (IFPipeline names T5 as its text
    encoder type; ours is CLIP, which its code path handles): stage logs stay one line each."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    for log in (dlog, tlog):
        log.disable_progress_bar()
        log.set_verbosity_error()


def load_pipeline(path: str | Path):  # type: ignore[no-untyped-def]
    from diffusers import DiffusionPipeline

    quiet_loading()
    pipe = DiffusionPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.unet, pipe.text_encoder):
        m.eval().requires_grad_(False)
    return pipe


class Classifier(nn.Module):
    """A small CNN with an object head and a style head (UnlearnCanvas judges with a classifier)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        width = 64 * (W.IMAGE_SIZE // 4) ** 2
        self.object_head = nn.Linear(width, len(W.OBJECTS))
        self.style_head = nn.Linear(width, len(W.STYLES))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images`` in [0, 1]; returns (object logits, style logits)."""
        h = self.body(images * 2 - 1)
        return self.object_head(h), self.style_head(h)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[list[str], list[str]]:
        o, s = self(images)
        styles = list(W.STYLES)
        return [W.OBJECTS[i] for i in o.argmax(-1).tolist()], [styles[i] for i in s.argmax(-1).tolist()]


def renders(n_per_pair: int, seed: int) -> tuple[list[W.DiffusionRow], torch.Tensor]:
    """``n_per_pair`` jittered renders of every (object, style), as rows and images in [-1, 1]."""
    rows = [
        W.DiffusionRow(W.caption(obj, style), obj, style, seed * 100_000 + k)
        for obj in W.OBJECTS
        for style in W.STYLES
        for k in range(n_per_pair)
    ]
    return rows, torch.from_numpy(np.stack([W.render(r.object, r.style, r.seed) for r in rows]))


def _label_ids(rows: list[W.DiffusionRow]) -> tuple[torch.Tensor, torch.Tensor]:
    styles = list(W.STYLES)
    return torch.tensor([W.OBJECTS.index(r.object) for r in rows]), torch.tensor(
        [styles.index(r.style) for r in rows]
    )


def train_classifier(seed: int = 0, steps: int = 600) -> Classifier:
    """Trained on renders with noise, blur-free colour jitter and pixel dropout, so it stays sure on
    generated images, which are never exactly a render."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    rows, x = renders(96, seed + 7)
    yo, ys = _label_ids(rows)
    clf = Classifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(len(x), (64,), generator=g)
        img = (x[idx] / 2 + 0.5) * (1 + 0.2 * (torch.rand(64, 3, 1, 1, generator=g) - 0.5))
        img = img + 0.12 * torch.rand(64, 1, 1, 1, generator=g) * torch.randn(img.shape, generator=g)
        o, s = clf(img.clamp(0, 1))
        loss = nn.functional.cross_entropy(o, yo[idx]) + nn.functional.cross_entropy(s, ys[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return clf.eval().requires_grad_(False)


def save_classifier(clf: Classifier, directory: Path) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, directory / "classifier.safetensors")
    labels = {"objects": list(W.OBJECTS), "styles": list(W.STYLES), "image_size": W.IMAGE_SIZE}
    (directory / "classifier.json").write_text(json.dumps(labels, indent=1) + "\n")


def load_classifier(directory: Path) -> Classifier:
    from safetensors.torch import load_file

    from sauce_export.errors import InputError

    path = directory / "classifier.safetensors"
    if not path.is_file():
        raise InputError(
            str(path), "path", "no classifier here: run `sauce-export world train --kind diffusion`"
        )
    clf = Classifier()
    clf.load_state_dict(load_file(path))
    return clf.eval().requires_grad_(False)


def train_pipeline(out: Path, cfg: DiffusionTrainConfig, progress: bool = True) -> dict[str, object]:
    """Train tokenizer + text encoder + UNet on renders and save the IFPipeline folder to ``out``."""
    from diffusers import IFPipeline

    from sauce_export.progress import bar

    torch.set_num_threads(cfg.threads)
    start = time.time()
    tokenizer = make_tokenizer()
    if cfg.init:
        base = load_pipeline(cfg.init)
        text, scheduler = base.text_encoder, base.scheduler
        # a new UNet from the config, so the saved folder does not record the init folder's path
        unet = type(base.unet).from_config(
            {k: v for k, v in base.unet.config.items() if not k.startswith("_")}
        )
        unet.load_state_dict(base.unet.state_dict())
        for m in (text, unet):
            m.train().requires_grad_(True)
    else:
        text, unet, scheduler = make_models(
            len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, cfg.seed
        )
    rows, x = renders(27, cfg.seed)
    yo, ys = _label_ids(rows)
    g = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    params = [*unet.parameters(), *text.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    warm = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / cfg.steps))),
    )
    ema = [p.detach().clone() for p in params]
    alphas = scheduler.alphas_cumprod
    styles = list(W.STYLES)
    losses = []
    with bar(cfg.steps, "train diffusion", enabled=progress) as pbar:
        for _ in range(cfg.steps):
            idx = torch.randint(len(x), (cfg.batch_size,), generator=g)
            prompts = [
                ""
                if rng.random() < cfg.uncond_prob
                else W.caption(W.OBJECTS[yo[i]], styles[ys[i]], int(rng.integers(len(W.TEMPLATES))))
                for i in idx.tolist()
            ]
            x0 = x[idx]
            noise = torch.randn(x0.shape, generator=g)
            t = torch.randint(0, len(alphas), (cfg.batch_size,), generator=g)
            a = alphas[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            emb = encode_prompts(tokenizer, text, prompts)
            loss = nn.functional.mse_loss(unet(xt, t, encoder_hidden_states=emb).sample[:, :3], x0)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                for average, p in zip(ema, params, strict=True):
                    average.lerp_(p, 1 - cfg.ema)
            losses.append(loss.item())
            pbar.update(1)
            if len(losses) % 50 == 0:
                pbar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    with torch.no_grad():
        for average, p in zip(ema, params, strict=True):
            p.copy_(average)
    pipe = IFPipeline(
        tokenizer=tokenizer,
        text_encoder=text.eval(),
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(out))
    return {
        "config": asdict(cfg),
        "seconds": round(time.time() - start, 1),
        "final_loss": float(np.mean(losses[-100:])),
    }
