"""The ONNX Runtime backend (ONNX and ORT format): sessions, feeds cast to each graph's declared
dtypes (fp32, fp16-io and int8 folders run unchanged; optimum's UNet takes a scalar timestep),
example inputs from the component configs, and `OrtPipeline`, an exported folder loaded as a
`toolchain.runtime.sampler.Backend`: it samples through the one sampler, as PyTorch does."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from toolchain.runtime.sampler import DEFAULT_BATCH_SIZE, DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS, Generator, sample

COMPONENTS = ("text_encoder", "unet", "vae_decoder")
# beside a fixed-shape folder's graphs: the shapes the app must feed (export/fixed_shapes.py)
FIXED_SHAPES_FILE = "fixed_shapes.json"
NP_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def component_inputs(pipeline_dir: Path, component: str, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for one component, named as in optimum's ONNX layout; `pipeline_dir` is a
    diffusers folder or an exported ONNX folder (both carry the component configs).

    text_encoder: input_ids (batch, max_length) int64
    unet: sample (batch, C, h, w), timestep (batch,), encoder_hidden_states (batch, max_length, D)
    vae_decoder: latent_sample (batch // 2 or 1, C, h, w)  -- one image per guided pair
    A fixed-shape folder (`fixed_shapes.json`) gets its own UNet rows whatever `batch` says.
    """
    batch = read_fixed_rows(pipeline_dir) or batch
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


def read_fixed_rows(folder: Path) -> int | None:
    """The UNet rows per call a fixed-shape folder takes (its `fixed_shapes.json`), else None."""
    path = Path(folder) / FIXED_SHAPES_FILE
    return int(json.loads(path.read_text())["batches"]["unet"]) if path.is_file() else None


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
    feed = {}
    for spec in session.get_inputs():
        value = inputs[spec.name].astype(NP_DTYPES.get(spec.type, np.float32))
        feed[spec.name] = value.reshape(-1)[:1].reshape(()) if len(spec.shape) == 0 else value
    return feed


class OrtPipeline:
    """An exported folder (ONNX or ORT format; `files` maps component -> model path inside it,
    default optimum's `<component>/model.onnx`) loaded in ONNX Runtime with its tokenizer and a
    DDIMScheduler from its scheduler config: the ONNX Runtime `Backend` of the sampler.

    `pipe(prompts, seed, steps, guidance_scale)` samples through `toolchain.runtime.sampler.sample`
    with classifier-free guidance always on (the UNet at batch 2 per image, whatever the scale);
    a folder with a k-step generator schedule (`onestep.json`, finetune.mode=sfd) is sampled as that
    generator. `load_ms`: session creation of the three components (tokenizer and scheduler
    excluded); `provider`: the execution provider the UNet actually runs on. `unet_hook(feed)` is
    called with every UNet feed, cast to the graph's dtypes, before it runs (int8 calibration).
    `open_session(path, component)`: another runtime's sessions (`toolchain.runtime.qnn.htp_opener`).
    A UNet exported with a fixed batch (the QNN target's) is fed that many rows per call: one prompt
    at a time for a guided batch of 2 (`max_prompts`).
    """

    def __init__(
        self,
        folder: Path,
        files: dict[str, str] | None = None,
        providers: list[str] | None = None,
        threads: int = 0,
        unet_hook: Callable[[dict[str, np.ndarray]], None] | None = None,
        open_session: Callable[[Path, str], object] | None = None,
    ):
        import onnxruntime  # noqa: F401  (imported before the clock starts: load_ms is session creation)
        import torch
        from diffusers import DDIMScheduler
        from transformers import CLIPTokenizer

        from toolchain.runtime.schedule import read_schedule

        folder, files = Path(folder), files or {c: f"{c}/model.onnx" for c in COMPONENTS}
        start = time.perf_counter()
        self.sessions, provided = {}, []
        for component in COMPONENTS:
            if open_session is None:
                self.sessions[component], provider = ort_session(folder / files[component], threads, providers)
            else:
                self.sessions[component] = open_session(folder / files[component], component)
                provider = self.sessions[component].get_providers()[0]
            provided.append(provider)
        self.load_ms = round((time.perf_counter() - start) * 1000.0, 3)
        self.provider = provided[1]  # the UNet's: where the time goes
        self.unet_hook = unet_hook
        self.tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
        text = read_config(folder, "text_encoder")
        self.max_length = min(int(self.tokenizer.model_max_length), int(text.get("max_position_embeddings", 77)))
        self.scheduler = DDIMScheduler.from_config(read_config(folder, "scheduler"))
        unet, vae = read_config(folder, "unet"), read_config(folder, "vae_decoder")
        size = unet["sample_size"]
        self.latent_shape = (unet["in_channels"], *((size, size) if isinstance(size, int) else size))
        scale = 2 ** (len(vae["block_out_channels"]) - 1)
        self.image_size = (self.latent_shape[1] * scale, self.latent_shape[2] * scale)
        self.scaling_factor = float(vae.get("scaling_factor", 0.18215))
        self.device, self.dtype = "cpu", torch.float32  # ONNX Runtime takes host arrays, whatever the provider
        self.schedule = read_schedule(folder)
        rows = self.sessions["unet"].get_inputs()[0].shape[0]
        self.max_prompts = rows // (1 if self.schedule is not None else 2) if isinstance(rows, int) else None

    def __call__(
        self,
        prompts: list[str],
        seed: int,
        steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> np.ndarray:
        """Images (N, H, W, 3) in [0, 1], one per prompt."""
        batch_size = min(batch_size, self.max_prompts or batch_size)
        return sample(self, list(prompts), seed, steps, guidance_scale, batch_size)

    def encode(self, prompts: list[str], guided: bool):
        """last_hidden_state (2N or N, L, D) float32 of [""] * N + prompts (guided) or of prompts."""
        import torch

        text = [""] * len(prompts) + list(prompts) if guided else list(prompts)
        ids = self.tokenizer(
            text, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="np"
        ).input_ids
        session = self.sessions["text_encoder"]
        hidden = session.run(["last_hidden_state"], ort_feed(session, {"input_ids": ids}))[0]
        return torch.from_numpy(np.asarray(hidden, dtype=np.float32))

    def unet(self, sample, t, embeddings):
        import torch

        session = self.sessions["unet"]
        inputs = {
            "sample": sample.numpy(),
            "timestep": np.full((len(sample),), float(t), np.float32),
            "encoder_hidden_states": embeddings.numpy(),
        }
        feed = ort_feed(session, inputs)
        if self.unet_hook is not None:
            self.unet_hook(feed)
        return torch.from_numpy(np.asarray(session.run(None, feed)[0], dtype=np.float32))

    def decode(self, latents):
        import torch

        session = self.sessions["vae_decoder"]
        image = session.run(None, ort_feed(session, {"latent_sample": latents.numpy()}))[0]
        return torch.from_numpy(np.asarray(image, dtype=np.float32))


def ort_generator(
    onnx_dir: Path,
    steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    providers: list[str] | None = None,
    threads: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    unet_hook: Callable[[dict[str, np.ndarray]], None] | None = None,
) -> Generator:
    """A `Generator` over the ONNX folder `onnx_dir` (optimum's SD layout): `OrtPipeline` sampled
    with these settings.

    providers: ONNX Runtime execution providers (default CPUExecutionProvider); threads: intra-op
    threads per session (0 = ORT's default). batch_size: prompts per UNet call group (the UNet sees
    2x that). unet_hook(feed) is called with every UNet feed before it runs (calibration capture).
    A folder with a k-step generator schedule (`onestep.json`) is sampled as that generator;
    `steps` and `guidance_scale` are then ignored.
    """
    onnx_dir = Path(onnx_dir)
    for name in COMPONENTS:
        if not (onnx_dir / name / "model.onnx").is_file():
            raise FileNotFoundError(f"{onnx_dir}: no {name}/model.onnx; pass an ONNX export folder (optimum layout)")
    pipe = OrtPipeline(onnx_dir, None, providers, threads, unet_hook)

    def generate(prompts: list[str], seed: int) -> np.ndarray:
        return pipe(prompts, seed, steps, guidance_scale, batch_size)

    return generate
