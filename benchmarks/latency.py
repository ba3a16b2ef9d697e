"""Latency: warm-up, then timed repeats; median and p90 in milliseconds.

Inputs are built from the component's own config so the same numbers can be taken for any
Stable Diffusion pipeline, pruned or not, in PyTorch and in ONNX Runtime.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def machine_info() -> dict[str, object]:
    """What latency depends on, so a gate compares latencies only between like machines."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {"cpu": cpu, "cores": os.cpu_count(), "system": platform.system()}


def time_callable(fn: Callable[[], object], warmup: int, repeats: int) -> dict[str, float]:
    """Median and p90 wall time of `fn()` in ms after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    times.sort()
    p90 = times[min(len(times) - 1, int(np.ceil(0.9 * len(times))) - 1)]
    return {"median_ms": round(statistics.median(times), 3), "p90_ms": round(p90, 3), "repeats": repeats}


def component_inputs(pipeline_dir: Path, component: str, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for one component, named as in optimum's ONNX layout; `pipeline_dir` is a
    diffusers folder or an exported ONNX folder (both carry the component configs).

    text_encoder: input_ids (batch, max_length) int64
    unet: sample (batch, C, h, w), timestep (batch,), encoder_hidden_states (batch, max_length, D)
    vae_decoder: latent_sample (batch // 2 or 1, C, h, w)  -- one image per guided pair
    """
    rng = np.random.default_rng(seed)
    unet = _read_config(pipeline_dir, "unet")
    text = _read_config(pipeline_dir, "text_encoder")
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
        vae = _read_config(pipeline_dir, "vae" if (pipeline_dir / "vae").is_dir() else "vae_decoder")
        return {
            "latent_sample": rng.standard_normal((max(1, batch // 2), vae["latent_channels"], *size)).astype(np.float32)
        }
    raise ValueError(f"no example inputs for component {component!r}")


def _read_config(pipeline_dir: Path, component: str) -> dict:
    for name in ("config.json", "scheduler_config.json"):
        path = pipeline_dir / component / name
        if path.is_file():
            return json.loads(path.read_text())
    raise FileNotFoundError(f"{pipeline_dir / component}: no config.json")


def torch_unet_latency(unet, inputs: dict[str, np.ndarray], warmup: int, repeats: int, device: str = "cpu") -> dict:
    """UNet forward latency in PyTorch under inference mode (CUDA: synchronised)."""
    import torch

    args = {k: torch.from_numpy(v).to(device) for k, v in inputs.items()}
    unet = unet.to(device).eval()

    def forward():
        with torch.inference_mode():
            unet(args["sample"], args["timestep"], encoder_hidden_states=args["encoder_hidden_states"])
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return time_callable(forward, warmup, repeats)


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


def ort_latency(session, inputs: dict[str, np.ndarray], warmup: int, repeats: int) -> dict:
    """Latency of one ONNX Runtime session."""
    feed = ort_feed(session, inputs)
    return time_callable(lambda: session.run(None, feed), warmup, repeats)


class OrtPipeline:
    """A text-to-image pipeline in ONNX Runtime: text encoder -> `steps` DDIM steps with
    classifier-free guidance (UNet at batch 2 per image) -> VAE decoder. Reads an exported
    folder (ONNX or ORT format: `files` maps component -> model path inside it) with its
    tokenizer and scheduler config, as diffusers' StableDiffusionPipeline would.

    Initial latents come from one CPU torch.Generator seeded with `seed`, in prompt order, as
    in `benchmarks.leakage.diffusers_generator`, so the images are comparable with PyTorch's.
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
        self.scheduler = DDIMScheduler.from_config(_read_config(folder, "scheduler"))
        text = _read_config(folder, "text_encoder")
        self.max_length = min(int(self.tokenizer.model_max_length), int(text.get("max_position_embeddings", 77)))
        unet = _read_config(folder, "unet")
        size = unet["sample_size"]
        self.latent_shape = (unet["in_channels"], *((size, size) if isinstance(size, int) else size))
        self.scaling_factor = float(_read_config(folder, "vae_decoder").get("scaling_factor", 0.18215))
        from toolchain.onestep import read_schedule

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
        """The k-step generator (`toolchain.onestep.generator_sample`) with the UNet in ORT."""
        import torch

        from toolchain.onestep import generator_noise, generator_sample

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


def composed_image_latency(rows: list[dict], steps: int) -> dict[str, float] | None:
    """Per-image {"median_ms", "p90_ms"} from component timings: text encoder (batch 2) + steps x
    UNet (batch 2) + VAE decoder (batch 1), each statistic summed; None unless all three were
    measured with the UNet at batch 2."""
    by_component = {row["component"]: row for row in rows}
    if not {"text_encoder", "unet", "vae_decoder"} <= set(by_component) or by_component["unet"].get("batch") != 2:
        return None
    return {
        key: round(
            by_component["text_encoder"][key] + steps * by_component["unet"][key] + by_component["vae_decoder"][key], 3
        )
        for key in ("median_ms", "p90_ms")
    }
