"""Train the digits world: a Stable-Diffusion-structured text-to-image model on sklearn digits.

    python -m benchmarks.testbed.train_digits --out toolchain/assets/digits-sd [--seed 0] [--resume]

Two phases on CPU: (1) an AutoencoderKL on 16x16 digits (latent 8x8x4), (2) a CLIP text encoder
and an SD-1.x-shaped UNet2DConditionModel, trained jointly (epsilon prediction, scaled_linear
betas, 10% empty prompts for classifier-free guidance) on cached VAE posteriors. The text encoder
trains with the UNet so that every phrasing of a digit maps to one concept. Checkpoints go to
OUT/.train-state/ (safetensors + a weights_only torch file) so --resume continues a killed run;
the folder is removed when the pipeline is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.testbed import digits

logger = logging.getLogger(__name__)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 16  # tokens incl. BOS/EOS; the longest prompt needs 8


@dataclass
class TrainConfig:
    """Sizes and schedule; the defaults produce the shipped model."""

    seed: int = 0
    vae_steps: int = 300
    vae_batch: int = 64
    vae_lr: float = 1e-3
    kl_weight: float = 1e-4
    unet_steps: int = 3000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    warmup_steps: int = 200
    ema_decay: float = 0.998
    prompt_dropout: float = 0.1
    checkpoint_every: int = 250
    threads: int = 1  # fixed so runs are bit-identical across machines; small ops gain little from 2
    block_out_channels: tuple[int, ...] = (32, 64, 64, 64)
    layers_per_block: int = 2  # 2 as in SD-1.x, so block-removal presets (BK-SDM) apply
    text_hidden: int = 64
    text_layers: int = 3


# --------------------------------------------------------------------------- model builders


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable-character table (GPT-2 byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def write_tokenizer_files(folder: str | Path, words: list[str] | None = None) -> Path:
    """Write a small CLIP BPE vocabulary (vocab.json, merges.txt) covering `words`.

    Like CLIP's: every byte character with and without the `</w>` word-end suffix (so nothing
    is ever unknown), then merges that build each prompt word left to right, then the two
    special tokens. Returns the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = words if words is not None else digits.vocabulary_words()
    chars = list(_bytes_to_unicode().values())
    vocab: list[str] = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    known = set(vocab)
    for word in words:
        if not word.isalpha():  # digits and punctuation stay single characters in CLIP
            continue
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            merged = left + right
            if merged not in known:
                merges.append((left, right))
                vocab.append(merged)
                known.add(merged)
            left = merged
    vocab += [BOS, EOS]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8"
    )
    return folder


def build_tokenizer(folder: str | Path):
    """CLIPTokenizer over the digits vocabulary, written to and loaded from `folder`."""
    from transformers import CLIPTokenizer

    write_tokenizer_files(folder)
    tok = CLIPTokenizer(str(Path(folder) / "vocab.json"), str(Path(folder) / "merges.txt"), model_max_length=MAX_LENGTH)
    tok.save_pretrained(folder)
    return CLIPTokenizer.from_pretrained(folder)


def build_text_encoder(tokenizer, hidden: int = 64, layers: int = 3):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        projection_dim=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_vae():
    """AutoencoderKL, 2 blocks: 16x16x3 pixels <-> 8x8x4 latents (vae_scale_factor 2)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=digits.IMAGE_SIZE,
    )


def build_unet(cross_attention_dim: int, block_out_channels=(32, 64, 64, 64), layers_per_block: int = 1):
    """UNet2DConditionModel in the SD-1.x block layout at 8x8 latents."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=digits.IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        attention_head_dim=4,  # SD-1.x naming: this is the number of heads
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=min(32, min(block_out_channels)),
    )


def build_noise_scheduler():
    """The training scheduler: SD's 1000 scaled_linear betas."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def build_sampling_scheduler():
    """The DDIM scheduler shipped in the pipeline folder (SD-1.x settings)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


# --------------------------------------------------------------------------- training steps


def vae_train_step(vae, optimizer, pixels: torch.Tensor, kl_weight: float, generator=None) -> float:
    """One VAE step on pixels (B, 3, H, W) in [-1, 1]: MSE reconstruction + weighted KL."""
    posterior = vae.encode(pixels).latent_dist
    z = posterior.sample(generator=generator)
    recon = vae.decode(z).sample
    loss = F.mse_loss(recon, pixels) + kl_weight * posterior.kl().mean() / z[0].numel()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def unet_train_step(
    unet, text_encoder, optimizer, noise_scheduler, latents: torch.Tensor, input_ids: torch.Tensor, generator=None
) -> float:
    """One joint UNet + text-encoder step: epsilon prediction at uniform random timesteps.

    latents (B, 4, 8, 8) already scaled by the VAE's scaling_factor; input_ids (B, MAX_LENGTH).
    """
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=generator)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    cond = text_encoder(input_ids)[0]
    pred = unet(noisy, t, encoder_hidden_states=cond).sample
    loss = F.mse_loss(pred, noise)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
    optimizer.step()
    return loss.item()


# --------------------------------------------------------------------------- checkpoints


def _save_state(state_dir: Path, phase: str, step: int, modules: dict, optimizer, generator, extra=None) -> None:
    from safetensors.torch import save_file

    tmp = state_dir.with_name(state_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, module in modules.items():
        sd = module.state_dict() if hasattr(module, "state_dict") else module
        save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, str(tmp / f"{name}.safetensors"))
    torch.save(
        {"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(), "data_rng": generator.get_state()},
        tmp / "optimizer.pt",
    )
    (tmp / "state.json").write_text(json.dumps({"phase": phase, "step": step, **(extra or {})}))
    shutil.rmtree(state_dir, ignore_errors=True)
    tmp.rename(state_dir)


def _load_state(state_dir: Path) -> dict | None:
    path = state_dir / "state.json"
    return json.loads(path.read_text()) if path.exists() else None


def _restore(state_dir: Path, modules: dict, optimizer, generator) -> None:
    from safetensors.torch import load_file

    for name, module in modules.items():
        tensors = load_file(str(state_dir / f"{name}.safetensors"))
        if hasattr(module, "load_state_dict"):
            module.load_state_dict(tensors)
        else:
            for k in module:
                module[k].copy_(tensors[k])
    blob = torch.load(state_dir / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    torch.set_rng_state(blob["torch_rng"])
    generator.set_state(blob["data_rng"])


# --------------------------------------------------------------------------- phases


def _lr_lambda(cfg: TrainConfig):
    """Linear warm-up, then inverse-square-root decay. It depends on the step only, not on the
    total, so a run stopped at step N and one started with --unet-steps N are the same run."""

    def f(step: int) -> float:
        return min((step + 1) / cfg.warmup_steps, math.sqrt(cfg.warmup_steps / (step + 1)))

    return f


def _lr_schedule(optimizer, lam, start: int):
    """LambdaLR positioned at `start` (a resumed run continues the same curve)."""
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lam)
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * lam(start)
    sched.last_epoch = start
    return sched


def train_vae(cfg: TrainConfig, pixels: torch.Tensor, state_dir: Path, resume: bool):
    """Phase 1. pixels (N, 3, 16, 16) in [-1, 1]. Returns the trained VAE."""
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = 0
    state = _load_state(state_dir) if resume else None
    if state is not None and state["phase"] == "vae":
        _restore(state_dir, {"vae": vae}, opt, gen)
        start = state["step"]
        logger.info("resuming VAE at step %d", start)
    sched = _lr_schedule(opt, _lr_lambda(cfg), start)
    vae.train()
    bar = tqdm(range(start, cfg.vae_steps), initial=start, total=cfg.vae_steps, desc="vae", mininterval=5)
    for step in bar:
        idx = torch.randint(0, len(pixels), (cfg.vae_batch,), generator=gen)
        loss = vae_train_step(vae, opt, pixels[idx], cfg.kl_weight, generator=gen)
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss:.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.vae_steps:
            _save_state(state_dir, "vae", step + 1, {"vae": vae}, opt, gen)
    vae.eval()
    return vae


def train_unet(cfg: TrainConfig, vae, tokenizer, pixels, labels, state_dir: Path, resume: bool):
    """Phase 2. Returns (unet, text_encoder, scaling_factor) carrying the EMA weights."""
    from tqdm import tqdm

    # Cache posterior mean/std once; each step samples a fresh latent (as SD's training does).
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
        mean, std = dist.mean.clone(), dist.std.clone()
        sample_gen = torch.Generator().manual_seed(cfg.seed + 1)
        z = mean + std * torch.randn(mean.shape, generator=sample_gen)
        scaling_factor = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    logger.info("latent std %.4f -> scaling_factor %.4f", 1 / scaling_factor, scaling_factor)

    # Token ids for every phrasing of every digit, plus the empty prompt (index 10 * P).
    prompts = [digits.all_prompts(d) for d in range(10)]
    n_phr = len(prompts[0])
    flat = [p for ps in prompts for p in ps] + [""]
    ids = tokenizer(flat, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt").input_ids
    empty = len(flat) - 1

    torch.manual_seed(cfg.seed + 2)
    text_encoder = build_text_encoder(tokenizer, cfg.text_hidden, cfg.text_layers)
    unet = build_unet(cfg.text_hidden, cfg.block_out_channels, cfg.layers_per_block)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    ema = {f"unet.{k}": v.detach().clone() for k, v in unet.state_dict().items()}
    ema |= {f"text_encoder.{k}": v.detach().clone() for k, v in text_encoder.state_dict().items()}
    live = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    live |= {f"text_encoder.{k}": v for k, v in text_encoder.state_dict().items()}
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    noise_scheduler = build_noise_scheduler()
    start = 0
    state = _load_state(state_dir) if resume else None
    if state is not None and state["phase"] == "unet":
        _restore(state_dir, {"unet": unet, "text_encoder": text_encoder, "ema": ema}, opt, gen)
        start = state["step"]
        logger.info("resuming UNet at step %d", start)
    sched = _lr_schedule(opt, _lr_lambda(cfg), start)

    unet.train()
    text_encoder.train()
    labels_t = torch.as_tensor(labels)
    bar = tqdm(range(start, cfg.unet_steps), initial=start, total=cfg.unet_steps, desc="unet", mininterval=5)
    for step in bar:
        idx = torch.randint(0, len(mean), (cfg.unet_batch,), generator=gen)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling_factor
        phrase = torch.randint(0, n_phr, (cfg.unet_batch,), generator=gen)
        drop = torch.rand(cfg.unet_batch, generator=gen) < cfg.prompt_dropout
        rows = torch.where(drop, torch.full_like(phrase, empty), labels_t[idx] * n_phr + phrase)
        loss = unet_train_step(unet, text_encoder, opt, noise_scheduler, latents, ids[rows], generator=gen)
        sched.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            for k, v in live.items():
                if v.dtype.is_floating_point:
                    ema[k].lerp_(v, 1 - decay)
                else:
                    ema[k].copy_(v)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.unet_steps:
            _save_state(
                state_dir,
                "unet",
                step + 1,
                {"unet": unet, "text_encoder": text_encoder, "ema": ema, "vae": vae},
                opt,
                gen,
                {"scaling_factor": scaling_factor},
            )

    unet.load_state_dict({k[5:]: v for k, v in ema.items() if k.startswith("unet.")})
    text_encoder.load_state_dict({k[13:]: v for k, v in ema.items() if k.startswith("text_encoder.")})
    unet.eval()
    text_encoder.eval()
    return unet, text_encoder, scaling_factor


def train(out: str | Path, cfg: TrainConfig, resume: bool = False) -> Path:
    """Train both phases and write the StableDiffusionPipeline folder to `out`."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    torch.set_num_threads(cfg.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state_dir = out / ".train-state"
    t0 = time.time()
    split = digits.load_split()
    pixels = torch.from_numpy(digits.to_model_range(digits.upsample(split.generator_images)))
    tokenizer = build_tokenizer(out / ".train-state-tokenizer")

    state = _load_state(state_dir) if resume else None
    if state is not None and state["phase"] == "unet":
        vae = build_vae()
        vae.load_state_dict(load_file(str(state_dir / "vae.safetensors")))
        vae.eval()
    else:
        vae = train_vae(cfg, pixels, state_dir, resume)
    unet, text_encoder, _ = train_unet(cfg, vae, tokenizer, pixels, split.generator_labels, state_dir, resume)

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=build_sampling_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(out, safe_serialization=True)
    # names the judge that scores this model's images, so `compress` reports per-digit accuracy
    (out / "judge.json").write_text(json.dumps({"judge": "digits"}) + "\n")
    wall = time.time() - t0
    (out / "training.json").write_text(
        json.dumps(
            {"config": asdict(cfg), "wall_s_this_invocation": round(wall, 1), "versions": library_versions()}, indent=2
        )  # fmt: skip
    )
    shutil.rmtree(state_dir, ignore_errors=True)
    shutil.rmtree(out / ".train-state-tokenizer", ignore_errors=True)
    logger.info("wrote %s in %.0f s", out, wall)
    return out


def library_versions() -> dict[str, str]:
    import diffusers
    import sklearn
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "scikit-learn": sklearn.__version__,
            "numpy": np.__version__}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for the StableDiffusionPipeline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/.train-state/")
    parser.add_argument("--unet-steps", type=int, default=TrainConfig.unet_steps)
    parser.add_argument("--vae-steps", type=int, default=TrainConfig.vae_steps)
    parser.add_argument("--checkpoint-every", type=int, default=TrainConfig.checkpoint_every)
    parser.add_argument("--threads", type=int, default=TrainConfig.threads)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = TrainConfig(
        seed=args.seed,
        unet_steps=args.unet_steps,
        vae_steps=args.vae_steps,
        checkpoint_every=args.checkpoint_every,
        threads=args.threads,
    )
    train(args.out, cfg, resume=args.resume)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
