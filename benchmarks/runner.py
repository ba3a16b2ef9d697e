"""Text-to-image entirely in ONNX Runtime, for an exported (or quantized, or fp16) ONNX folder.

    generate = ort_generator("out/04-export", steps=25, guidance_scale=5.0)
    images = generate(["the number 7"] * 4, seed=0)   # (4, H, W, 3) floats in [0, 1]

tokenizer -> text_encoder -> DDIM loop over the UNet with classifier-free guidance (one UNet
call per step on [unconditional; conditional], batch 2N) -> vae_decoder, all numpy in and out
of ORT sessions; diffusers' DDIMScheduler, built from the folder's scheduler config, does the
step arithmetic. The initial latents come from a CPU torch.Generator seeded with `seed`, drawn
for all prompts at once in prompt order, exactly as `benchmarks.leakage.diffusers_generator`
does, so image i from ONNX Runtime and from PyTorch start from the same noise.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.leakage import DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS, Generator


def ort_generator(
    onnx_dir: Path,
    steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    providers: list[str] | None = None,
    threads: int = 0,
    batch_size: int = 64,
    unet_hook: Callable[[dict[str, np.ndarray]], None] | None = None,
) -> Generator:
    """A `benchmarks.leakage` generator over the ONNX folder `onnx_dir` (optimum's SD layout).

    providers: ONNX Runtime execution providers (default CPUExecutionProvider); threads: intra-op
    threads per session (0 = ORT's default). batch_size: images per UNet call group (the UNet sees
    2x that). unet_hook(feed) is called with every UNet feed before it runs (calibration capture).
    Graph input dtypes are read from the sessions, so fp16-io and int8 folders run unchanged.
    A folder with a k-step generator schedule (`onestep.json`, finetune.mode=sfd) is sampled as
    that generator (`toolchain.onestep.generator_sample`: the UNet once per step at batch N, no
    guidance); `steps` and `guidance_scale` are then ignored.
    """
    import onnxruntime as ort
    import torch
    from diffusers import DDIMScheduler
    from transformers import CLIPTokenizer

    onnx_dir = Path(onnx_dir)
    for name in ("text_encoder", "unet", "vae_decoder"):
        if not (onnx_dir / name / "model.onnx").is_file():
            raise FileNotFoundError(f"{onnx_dir}: no {name}/model.onnx; pass an ONNX export folder (optimum layout)")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    providers = providers or ["CPUExecutionProvider"]
    sessions = {
        name: ort.InferenceSession(str(onnx_dir / name / "model.onnx"), options, providers=providers)
        for name in ("text_encoder", "unet", "vae_decoder")
    }
    tokenizer = CLIPTokenizer.from_pretrained(onnx_dir / "tokenizer")
    scheduler = DDIMScheduler.from_pretrained(onnx_dir / "scheduler")
    unet_config = json.loads((onnx_dir / "unet" / "config.json").read_text())
    vae_config = json.loads((onnx_dir / "vae_decoder" / "config.json").read_text())
    latent_size = unet_config["sample_size"]
    latent_hw = (latent_size, latent_size) if isinstance(latent_size, int) else tuple(latent_size)
    latent_channels = unet_config["in_channels"]
    scaling_factor = vae_config.get("scaling_factor", 0.18215)
    dtypes = {
        name: {i.name: _NP_DTYPES.get(i.type, np.float32) for i in session.get_inputs()}
        for name, session in sessions.items()
    }
    scalar_timestep = len(next(i for i in sessions["unet"].get_inputs() if i.name == "timestep").shape) == 0
    from toolchain.onestep import generator_noise, generator_sample, read_schedule

    schedule = read_schedule(onnx_dir)

    def encode(prompts: list[str]) -> np.ndarray:
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="np"
        ).input_ids
        feed = {"input_ids": ids.astype(dtypes["text_encoder"]["input_ids"])}
        return np.asarray(sessions["text_encoder"].run(["last_hidden_state"], feed)[0], dtype=np.float32)

    def draw(prompts: list[str], latents: np.ndarray) -> np.ndarray:
        n = len(prompts)
        hidden = encode([""] * n + list(prompts))  # [unconditional; conditional], as diffusers orders them
        scheduler.set_timesteps(steps)
        latents = torch.from_numpy(latents) * scheduler.init_noise_sigma
        unet_types = dtypes["unet"]
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            timestep = np.array(float(t), dtype=unet_types["timestep"])
            feed = {
                "sample": model_input.numpy().astype(unet_types["sample"]),
                "timestep": timestep if scalar_timestep else np.full((2 * n,), timestep, unet_types["timestep"]),
                "encoder_hidden_states": hidden.astype(unet_types["encoder_hidden_states"]),
            }
            if unet_hook is not None:
                unet_hook(feed)
            noise = torch.from_numpy(np.asarray(sessions["unet"].run(None, feed)[0], dtype=np.float32))
            uncond, cond = noise.chunk(2)
            guided = uncond + guidance_scale * (cond - uncond)
            latents = scheduler.step(guided, t, latents).prev_sample
        feed = {"latent_sample": (latents.numpy() / scaling_factor).astype(dtypes["vae_decoder"]["latent_sample"])}
        image = np.asarray(sessions["vae_decoder"].run(None, feed)[0], dtype=np.float32)
        return np.clip(image / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)

    def unet_call(x_t: torch.Tensor, t: int, hidden: np.ndarray) -> torch.Tensor:
        unet_types = dtypes["unet"]
        timestep = np.array(float(t), dtype=unet_types["timestep"])
        feed = {
            "sample": x_t.numpy().astype(unet_types["sample"]),
            "timestep": timestep if scalar_timestep else np.full((len(x_t),), timestep, unet_types["timestep"]),
            "encoder_hidden_states": hidden.astype(unet_types["encoder_hidden_states"]),
        }
        if unet_hook is not None:
            unet_hook(feed)
        return torch.from_numpy(np.asarray(sessions["unet"].run(None, feed)[0], dtype=np.float32))

    def draw_generator(prompts: list[str], z: torch.Tensor, noises: torch.Tensor) -> np.ndarray:
        kind = schedule.get("prediction_type", scheduler.config.prediction_type)
        x0 = generator_sample(
            unet_call, z, noises, encode(list(prompts)), schedule["timesteps"], scheduler.alphas_cumprod, kind
        )
        feed = {"latent_sample": (x0.numpy() / scaling_factor).astype(dtypes["vae_decoder"]["latent_sample"])}
        image = np.asarray(sessions["vae_decoder"].run(None, feed)[0], dtype=np.float32)
        return np.clip(image / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)

    def generate(prompts: list[str], seed: int) -> np.ndarray:
        shape = (len(prompts), latent_channels, *latent_hw)
        if schedule is not None and prompts:
            z, noises = generator_noise(len(prompts), shape[1:], len(schedule["timesteps"]), seed)
            return np.concatenate(
                [
                    draw_generator(prompts[i : i + batch_size], z[i : i + batch_size], noises[:, i : i + batch_size])
                    for i in range(0, len(prompts), batch_size)
                ]
            ).astype(np.float32)
        latents = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32).numpy()
        out = [
            draw(prompts[start : start + batch_size], latents[start : start + batch_size])
            for start in range(0, len(prompts), batch_size)
        ]
        if not out:
            scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
            return np.zeros((0, latent_hw[0] * scale, latent_hw[1] * scale, 3), np.float32)
        return np.concatenate(out).astype(np.float32)

    return generate


_NP_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}
