"""The ONNX Runtime backend (ONNX and ORT format): sessions, feeds cast to the graph's dtypes,
example inputs from the component configs, and text-to-image sampling over an exported folder."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from toolchain.runtime.sampler import DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS, Generator


def component_inputs(pipeline_dir: Path, component: str, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for one component, named as in optimum's ONNX layout; `pipeline_dir` is a
    diffusers folder or an exported ONNX folder (both carry the component configs).

    text_encoder: input_ids (batch, max_length) int64
    unet: sample (batch, C, h, w), timestep (batch,), encoder_hidden_states (batch, max_length, D)
    vae_decoder: latent_sample (batch // 2 or 1, C, h, w)  -- one image per guided pair
    """
    rng = np.random.default_rng(seed)
    unet = read_config(pipeline_dir, "unet")
    text = read_config(pipeline_dir, "text_encoder")
    max_len = json.loads((pipeline_dir / "tokenizer" / "tokenizer_config.json").read_text()).get(
        "model_max_length", text.get("max_position_embeddings", 77)
    )
    max_len = min(int(max_len), int(text.get("max_position_embeddings", max_len)))
    size = unet["sample_size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    latent = (unet["in_channels"], *size)
    if component == "text_encoder":
        ids = rng.integers(0, text["vocab_size"], size=(batch, max_len))
        return {"input_ids": ids.astype(np.int64)}
    if component == "unet":
        return {
            "sample": rng.standard_normal((batch, *latent)).astype(np.float32),
            "timestep": np.full((batch,), 500, dtype=np.int64),
            "encoder_hidden_states": rng.standard_normal((batch, max_len, unet["cross_attention_dim"])).astype(
                np.float32
            ),
        }
    if component == "vae_decoder":
        vae = read_config(pipeline_dir, "vae" if (pipeline_dir / "vae").is_dir() else "vae_decoder")
        return {
            "latent_sample": rng.standard_normal((max(1, batch // 2), vae["latent_channels"], *size)).astype(np.float32)
        }
    raise ValueError(f"no example inputs for component {component!r}")


def read_config(pipeline_dir: Path, component: str) -> dict:
    for name in ("config.json", "scheduler_config.json"):
        path = pipeline_dir / component / name
        if path.is_file():
            return json.loads(path.read_text())
    raise FileNotFoundError(f"{pipeline_dir / component}: no config.json")


def ort_session(onnx_path: Path, threads: int = 0, providers: list[str] | None = None):
    """An ONNX Runtime session (CPU unless `providers` says otherwise); returns (session, the
    provider that actually runs: the first one the session accepted)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_path), options, providers=providers or ["CPUExecutionProvider"])
    return session, session.get_providers()[0]


def ort_feed(session, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cast inputs to the dtypes the graph declares; a scalar input (optimum's UNet timestep)
    takes the first element."""
    dtypes = {
        "tensor(float)": np.float32,
        "tensor(float16)": np.float16,
        "tensor(int64)": np.int64,
        "tensor(int32)": np.int32,
    }
    feed = {}
    for spec in session.get_inputs():
        value = inputs[spec.name].astype(dtypes.get(spec.type, np.float32))
        feed[spec.name] = value.reshape(-1)[:1].reshape(()) if len(spec.shape) == 0 else value
    return feed


class OrtPipeline:
    """A text-to-image pipeline in ONNX Runtime: text encoder -> `steps` DDIM steps with
    classifier-free guidance (UNet at batch 2 per image) -> VAE decoder. Reads an exported
    folder (ONNX or ORT format: `files` maps component -> model path inside it) with its
    tokenizer and scheduler config, as diffusers' StableDiffusionPipeline would.

    Initial latents come from one CPU torch.Generator seeded with `seed`, in prompt order, as
    in `toolchain.runtime.pytorch.diffusers_generator`, so the images are comparable with PyTorch's.
    `load_ms`: session creation of all three components (tokenizer and scheduler excluded).

    A folder with a k-step generator schedule (`onestep.json`, finetune.mode=sfd) is sampled as
    that generator: the UNet once per step at batch N, no guidance (`self.schedule`; `steps`
    and `guidance_scale` are then ignored).
    """

    def __init__(self, folder: Path, files: dict[str, str], providers: list[str] | None = None, threads: int = 0):
        import onnxruntime  # noqa: F401  (imported before the clock starts: load_ms is session creation)
        from diffusers import DDIMScheduler
        from transformers import CLIPTokenizer

        start = time.perf_counter()
        self.sessions, provided = {}, []
        for component in ("text_encoder", "unet", "vae_decoder"):
            session, provider = ort_session(folder / files[component], threads, providers)
            self.sessions[component] = session
            provided.append(provider)
        self.load_ms = round((time.perf_counter() - start) * 1000.0, 3)
        self.provider = provided[1]  # the UNet's: where the time goes
        self.tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
        self.scheduler = DDIMScheduler.from_config(read_config(folder, "scheduler"))
        text = read_config(folder, "text_encoder")
        self.max_length = min(int(self.tokenizer.model_max_length), int(text.get("max_position_embeddings", 77)))
        unet = read_config(folder, "unet")
        size = unet["sample_size"]
        self.latent_shape = (unet["in_channels"], *((size, size) if isinstance(size, int) else size))
        self.scaling_factor = float(read_config(folder, "vae_decoder").get("scaling_factor", 0.18215))
        from toolchain.runtime.schedule import read_schedule

        self.schedule = read_schedule(folder)

    def _encode(self, prompts: list[str]) -> np.ndarray:
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="np"
        ).input_ids
        session = self.sessions["text_encoder"]
        return session.run(None, ort_feed(session, {"input_ids": ids}))[0]  # last_hidden_state (N, L, D)

    def __call__(self, prompts: list[str], seed: int, steps: int = 25, guidance_scale: float = 5.0) -> np.ndarray:
        """Images (N, H, W, 3) in [0, 1], one per prompt; the UNet runs at batch 2N (batch N,
        once per generator step, for a k-step generator)."""
        import torch

        if self.schedule is not None:
            return self._generator_images(prompts, seed)
        n = len(prompts)
        embeddings = np.concatenate([self._encode([""] * n), self._encode(prompts)])  # uncond first, as diffusers
        latents = torch.randn((n, *self.latent_shape), generator=torch.Generator("cpu").manual_seed(seed))
        latents = latents * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(steps)
        unet = self.sessions["unet"]
        for t in self.scheduler.timesteps:
            sample = self.scheduler.scale_model_input(torch.cat([latents, latents]), t).numpy()
            feed = ort_feed(
                unet,
                {
                    "sample": sample,
                    "timestep": np.full((2 * n,), float(t), np.float32),
                    "encoder_hidden_states": embeddings,
                },
            )
            uncond, cond = np.split(unet.run(None, feed)[0], 2)
            noise_pred = torch.from_numpy(uncond + guidance_scale * (cond - uncond))
            latents = self.scheduler.step(noise_pred, t, latents).prev_sample
        vae = self.sessions["vae_decoder"]
        image = vae.run(None, ort_feed(vae, {"latent_sample": (latents / self.scaling_factor).numpy()}))[0]
        return np.clip(image / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1).astype(np.float32)

    def _generator_images(self, prompts: list[str], seed: int) -> np.ndarray:
        """The k-step generator (`toolchain.runtime.schedule.generator_sample`) with the UNet in ORT."""
        import torch

        from toolchain.runtime.schedule import generator_noise, generator_sample

        timesteps = self.schedule["timesteps"]
        kind = self.schedule.get("prediction_type", self.scheduler.config.prediction_type)
        z, noises = generator_noise(len(prompts), self.latent_shape, len(timesteps), seed)
        unet = self.sessions["unet"]

        def call(x_t, t, emb):
            n = len(x_t)
            feed = {
                "sample": x_t.numpy(),
                "timestep": np.full((n,), float(t), np.float32),
                "encoder_hidden_states": emb,
            }
            return torch.from_numpy(np.asarray(unet.run(None, ort_feed(unet, feed))[0], dtype=np.float32))

        x0 = generator_sample(call, z, noises, self._encode(prompts), timesteps, self.scheduler.alphas_cumprod, kind)
        vae = self.sessions["vae_decoder"]
        image = vae.run(None, ort_feed(vae, {"latent_sample": (x0 / self.scaling_factor).numpy()}))[0]
        return np.clip(image / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1).astype(np.float32)


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
    that generator (`toolchain.runtime.schedule.generator_sample`: the UNet once per step at batch N, no
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
        name: {i.name: NP_DTYPES.get(i.type, np.float32) for i in session.get_inputs()}
        for name, session in sessions.items()
    }
    scalar_timestep = len(next(i for i in sessions["unet"].get_inputs() if i.name == "timestep").shape) == 0
    from toolchain.runtime.schedule import generator_noise, generator_sample, read_schedule

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


NP_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}
