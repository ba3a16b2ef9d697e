"""ExecuTorch programs of a diffusers pipeline for Android and iOS apps, run here through ExecuTorch's runtime.

    result = export_executorch(pipe, out_dir, precision="fp32", generator=False)

Every component is `torch.export`ed at the fixed shape the app feeds it and lowered with
`to_edge_transform_and_lower(..., partitioner=[XnnpackPartitioner()])` to one `.pte` (the XNNPACK
delegate: the CPU kernels ExecuTorch runs on both phone OSes). Layout, what an app embeds:

    out_dir/text_encoder/model.pte   input_ids int64 (rows, L)             -> last_hidden_state (rows, L, D)
    out_dir/unet/model.pte           sample (rows, C, h, w), timestep float32 (rows,),
                                     encoder_hidden_states (rows, L, D)    -> noise prediction (rows, C, h, w)
    out_dir/vae_decoder/model.pte    latent_sample (1, C, h, w), already divided by the VAE's
                                     scaling factor                        -> image (1, 3, H, W) in [-1, 1]
    out_dir/<component>/config.json  the diffusers config of the module each program came from
    out_dir/tokenizer/, scheduler/   the CLIP tokenizer and the scheduler config the app samples with
    out_dir/onestep.json             a k-step generator's schedule (finetune.mode=sfd), when there is one
    out_dir/executorch.json          inputs, shapes, dtypes and the versions an app needs

rows: 2 per UNet call for a diffusion model (the unconditional and conditional row of one image),
1 for a k-step generator, which runs unguided; the text encoder takes the same rows.

Precision: fp32, or the UNet in 8 bits (`int8`): PT2E with ExecuTorch's `XNNPACKQuantizer`
(symmetric int8, per-channel weights, static activations) calibrated on the pipeline's own
trajectories. The text encoder and VAE decoder stay fp32: on the QNN target their 16-bit forms
already cost 30-40 dB, and they are a small share of an image's time. torchao's 8-bit-dynamic /
4-bit-weight form for linear layers is not offered: the UNet's time is in its convolutions.

Every program is run through ExecuTorch's runtime against the PyTorch fp32 module (max abs error,
PSNR, held to a floor: ParityError below it), with the seconds it took to lower and a call's
milliseconds (XNNPACK on this x86 machine, not a phone's time).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

# fp32; int8: PT2E XNNPACKQuantizer (static int8 activations, per-channel weights, calibrated);
# 8da4w: torchao's dynamic int8 activations with int4 per-channel weights on the Linear layers (the
# attention and feed-forward projections), the convolutions left fp32: no calibration
PRECISIONS = ("fp32", "int8", "8da4w")
COMPONENTS = ("text_encoder", "unet", "vae_decoder")
PROGRAM = "model.pte"
MANIFEST = "executorch.json"
# PSNR floors against PyTorch fp32: the fp32 program is the same arithmetic (measured 110+ dB); the
# 8-bit UNet as ONNX Runtime's int8 (export.quantize.INT8_PSNR_FLOOR_DB).
PSNR_FLOORS_DB = {"fp32": 60.0, "int8": 20.0, "8da4w": 20.0}


def export_executorch(
    pipe,
    out_dir: Path,
    precision: str = "fp32",
    calibration: list[dict[str, np.ndarray]] | None = None,
    parity_feed: dict[str, np.ndarray] | None = None,
    generator: bool = False,
    prompt: str = "a photo",
    psnr_floors_db: dict[str, float] | None = None,
    progress: bool = True,
    components: tuple[str, ...] = COMPONENTS,
) -> dict:
    """Write the ExecuTorch folder; returns {"parity": [...], "files": {...}, "executorch": {...}}.

    calibration: guided UNet feeds of the pipeline's own trajectories (`collect_torch_feeds`),
    needed for int8. parity_feed: a UNet feed the calibration did not see (else random); `prompt`:
    the text encoder's parity input; `components`: which programs to write (an app needs all three).
    Raises ValueError on bad arguments before anything is written,
    toolchain.runtime.executorch.ExecuTorchUnavailable without ExecuTorch, and
    export.validate.ParityError for a component below its floor.
    """
    from tqdm.auto import tqdm

    from export.layout import deploy_batches
    from export.validate import check_psnr_floor
    from toolchain.runtime.executorch import require_executorch

    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {list(PRECISIONS)}")
    if precision == "int8" and not calibration:
        raise ValueError("precision 'int8' quantizes the UNet: pass its calibration feeds")
    if not components or set(components) - set(COMPONENTS):
        raise ValueError(f"components {list(components)}: choose from {list(COMPONENTS)}")
    require_executorch()
    out_dir = Path(out_dir)
    _write_shared_files(pipe, out_dir)
    batches, floors = deploy_batches(generator), {**PSNR_FLOORS_DB, **(psnr_floors_db or {})}
    result = {"parity": [], "files": {}, "executorch": _record(precision, batches)}
    modules = _modules(pipe)
    for name in tqdm(components, desc="executorch", unit="component", disable=not progress):
        inputs = _inputs(pipe, name, batches[name], parity_feed, prompt)
        form = precision if name == "unet" else "fp32"
        start = time.perf_counter()
        _lower(modules[name], inputs, calibration if form == "int8" else None, out_dir / name / PROGRAM, form)
        lower_s = time.perf_counter() - start
        entry = _parity(modules[name], out_dir / name / PROGRAM, name, inputs, form)
        entry["psnr_floor_db"] = floors[form]
        result["parity"].append(entry)
        result["files"][name] = {
            "path": f"{name}/{PROGRAM}",
            "size_bytes": (out_dir / name / PROGRAM).stat().st_size,
            "lower_s": round(lower_s, 3),
        }
        result["executorch"]["inputs"][name] = {k: [list(v.shape), str(v.dtype)] for k, v in inputs.items()}
        check_psnr_floor(
            entry, "through ExecuTorch (XNNPACK) vs PyTorch fp32", "executorch.precision=fp32 keeps the arithmetic"
        )
    (out_dir / MANIFEST).write_text(json.dumps(result["executorch"], indent=2) + "\n")
    return result


def _record(precision: str, batches: dict) -> dict:
    return {
        "precision": precision,
        "quantized_components": ["unet"] if precision != "fp32" else [],
        "delegate": "XNNPACK",
        "batches": batches,
        "inputs": {},
        "executorch": version("executorch"),
        "torch": version("torch"),
    }


def _write_shared_files(pipe, out_dir: Path) -> None:
    """tokenizer/, scheduler/, each component's config.json (as the ONNX export writes them: no build
    path) and a generator's onestep.json: the files an app reads beside the programs."""
    from export.onnx import copy_generator_schedule, drop_build_paths

    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.tokenizer.save_pretrained(str(out_dir / "tokenizer"))
    pipe.scheduler.save_pretrained(str(out_dir / "scheduler"))
    pipe.text_encoder.config.save_pretrained(str(out_dir / "text_encoder"))
    pipe.unet.save_config(str(out_dir / "unet"))
    pipe.vae.save_config(str(out_dir / "vae_decoder"))
    drop_build_paths(out_dir)
    copy_generator_schedule(pipe, out_dir)


def _modules(pipe) -> dict:
    """The three modules in the layout's signatures (the ONNX exporter's wrappers for the UNet, at batch
    1 where a generator needs it, and the VAE decoder; the text encoder's last hidden state alone), in eval mode."""
    import torch

    from export.onnx import UNetForExport, VaeDecoderForExport

    class TextEncoder(torch.nn.Module):
        def __init__(self, text_encoder):
            super().__init__()
            self.text_encoder = text_encoder

        def forward(self, input_ids):
            return self.text_encoder(input_ids, return_dict=False)[0]

    modules = {
        "text_encoder": TextEncoder(pipe.text_encoder),
        "unet": UNetForExport(pipe.unet),
        "vae_decoder": VaeDecoderForExport(pipe.vae),
    }
    return {name: module.float().eval() for name, module in modules.items()}


def _inputs(pipe, name: str, rows: int, parity_feed, prompt: str) -> dict[str, np.ndarray]:
    """The component's example and parity inputs at its deploy rows: the held-out feed's first
    guided pair for the UNet, the tokens of ("", prompt) for the text encoder (of prompt alone at 1 row)."""
    from export.layout import guided_pairs

    rng = np.random.default_rng(0)
    config, length = pipe.unet.config, pipe.text_encoder.config.max_position_embeddings
    length = min(length, int(pipe.tokenizer.model_max_length))
    size = (config.sample_size,) * 2 if isinstance(config.sample_size, int) else tuple(config.sample_size)
    if name == "text_encoder":
        ids = pipe.tokenizer(["", prompt][-rows:], padding="max_length", max_length=length, truncation=True).input_ids
        return {"input_ids": np.asarray(ids, dtype=np.int64)}
    if name == "unet":
        if parity_feed is not None:
            pair = guided_pairs(parity_feed, rows)[0]
            t = float(np.asarray(pair["timestep"]).reshape(-1)[0])
            return {
                "sample": pair["sample"].astype(np.float32),
                "timestep": np.full((rows,), t, np.float32),
                "encoder_hidden_states": pair["encoder_hidden_states"].astype(np.float32),
            }
        return {
            "sample": rng.standard_normal((rows, config.in_channels, *size), dtype=np.float32),
            "timestep": np.full((rows,), 500.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((rows, length, config.cross_attention_dim), dtype=np.float32),
        }
    return {"latent_sample": rng.standard_normal((1, pipe.vae.config.latent_channels, *size), dtype=np.float32)}


def _lower(module, inputs: dict[str, np.ndarray], calibration, target: Path, form: str = "fp32") -> None:
    """`module` exported at the shapes of `inputs`, PT2E-quantized for XNNPACK when `calibration` is
    given (int8) or its Linear layers 8da4w-quantized by torchao (on a copy), lowered to the XNNPACK
    delegate and written to `target` (through a temporary file)."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    args = tuple(torch.from_numpy(v) for v in inputs.values())
    if form == "8da4w":
        module = _dynamic_int4(module)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", FutureWarning
        )  # torch's pytree deprecations, once per node, inside the lowering
        program = torch.export.export(module, args)
        if calibration:
            program = torch.export.export(_quantize(program, calibration, inputs), args)
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.with_name(f".{target.name}.tmp")
    scratch.write_bytes(lowered.buffer)
    scratch.replace(target)


def _dynamic_int4(module):
    """A copy of `module` with torchao's 8da4w on every Linear XNNPACK can take: int8 activations
    quantized per token at run time, int4 weights per output channel (XNNPACK's qd8-f32-qc4w
    kernels, which need an input width that is a multiple of 32: a pruned layer's odd width stays fp32)."""
    import copy

    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis

    quantized = copy.deepcopy(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchao's tensor-subclass notices, one per layer
        quantize_(
            quantized,
            Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerAxis(0)),
            filter_fn=lambda m, _name: isinstance(m, torch.nn.Linear) and m.in_features % 32 == 0,
        )
    return quantized


def _quantize(program, calibration: list[dict[str, np.ndarray]], inputs: dict[str, np.ndarray]):
    """The exported UNet with XNNPACK's symmetric int8 (per-channel weights) inserted and its
    activation ranges observed on every guided pair of the calibration feeds."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from export.layout import guided_pairs

    rows = len(inputs["sample"])
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(program.module(), quantizer)
    with torch.no_grad():
        for feed in calibration:
            for pair in guided_pairs(feed, rows):
                t = float(np.asarray(pair["timestep"]).reshape(-1)[0])
                prepared(
                    torch.from_numpy(pair["sample"].astype(np.float32)),
                    torch.full((rows,), t),
                    torch.from_numpy(pair["encoder_hidden_states"].astype(np.float32)),
                )
    return convert_pt2e(prepared)


def _parity(module, program: Path, name: str, inputs: dict[str, np.ndarray], precision: str) -> dict:
    """The program through ExecuTorch's runtime against the PyTorch fp32 module on `inputs`."""
    import torch

    from export.validate import psnr
    from toolchain.runtime.executorch import PROVIDER, ExecuTorchSession

    with torch.no_grad():
        reference = module(*(torch.from_numpy(v) for v in inputs.values())).float().numpy()
    session = ExecuTorchSession(program, name)
    session.run(None, inputs)  # the first call allocates: time the second
    start = time.perf_counter()
    output = np.asarray(session.run(None, inputs)[0], dtype=np.float32)
    call_ms = (time.perf_counter() - start) * 1000.0
    err = float(np.max(np.abs(reference - output))) if np.isfinite(output).all() else float("nan")
    return {
        "component": name,
        "format": f"executorch-{precision}",
        "reference": "torch-fp32",
        "runtime": PROVIDER,
        "max_abs_err": err,
        "psnr_db": psnr(reference, output) if np.isfinite(err) else float("nan"),
        "call_ms": round(call_ms, 3),
        "rows": int(next(iter(inputs.values())).shape[0]),
    }


def executorch_unet_fn(path: Path):
    """The fixed-shape UNet program at `path` as a function of a guided feed of any number of prompts
    (N unconditional rows, then N conditional): one guided pair per call, outputs back in the feed's
    order (what `export.guidance.guidance_fidelity` compares)."""
    from export.layout import pairwise_unet_fn
    from toolchain.runtime.executorch import ExecuTorchSession

    return pairwise_unet_fn(ExecuTorchSession(path, "unet"))


def torch_unet_fn(pipe):
    """The pipeline's PyTorch UNet in fp32 as a function of a guided feed (the guidance gate's reference)."""
    import torch

    unet = _modules(pipe)["unet"]

    def run(feed: dict[str, np.ndarray]) -> np.ndarray:
        sample = torch.from_numpy(feed["sample"].astype(np.float32))
        t = torch.full((len(sample),), float(np.asarray(feed["timestep"]).reshape(-1)[0]))
        with torch.no_grad():
            out = unet(sample, t, torch.from_numpy(feed["encoder_hidden_states"].astype(np.float32)))
        return out.float().numpy()

    return run


def collect_torch_feeds(pipe, prompts: list[str], steps: int, guidance_scale: float, seed: int, n: int) -> list[dict]:
    """UNet feeds recorded while the PyTorch pipeline draws one image per prompt through the runtime's
    sampler, in `export.quantize.collect_unet_calibration`'s form ({"sample": (2N, C, h, w),
    "timestep": () float32, "encoder_hidden_states": (2N, L, D)}), `n` of them evenly spaced."""
    from export.quantize import evenly_spaced
    from toolchain.runtime.pytorch import DiffusersBackend
    from toolchain.runtime.sampler import sample

    backend, recorded = DiffusersBackend(pipe), []
    unet = backend.unet

    def recording_unet(latents, t, embeddings):
        recorded.append(
            {
                "sample": latents.float().cpu().numpy().copy(),
                "timestep": np.asarray(float(t), dtype=np.float32),
                "encoder_hidden_states": embeddings.float().cpu().numpy().copy(),
            }
        )
        return unet(latents, t, embeddings)

    backend.unet = recording_unet
    sample(backend, list(prompts), seed, steps, guidance_scale)
    return evenly_spaced(recorded, n)
