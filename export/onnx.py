"""Export a Stable Diffusion pipeline to optimum's ONNX layout, each component checked against PyTorch.

The output folder loads as it is in `optimum.onnxruntime.ORTStableDiffusionPipeline`:

    out_dir/
      model_index.json            the pipeline's own config (as optimum writes it)
      text_encoder/model.onnx     input_ids (int64) -> last_hidden_state, pooler_output
      unet/model.onnx             sample, timestep (float32 scalar), encoder_hidden_states -> out_sample
      vae_decoder/model.onnx      latent_sample -> sample
      vae_encoder/model.onnx      sample -> latent_parameters           (only when asked for)
      <component>/config.json     the component's config, copied as optimum does
      <component>/model.onnx_data external weights, only when the graph would pass protobuf's 2 GiB
      tokenizer/, scheduler/      save_pretrained

Input and output names and dynamic axes are optimum-onnx 0.1.0's (`exporters/onnx/model_configs.py`:
CLIPTextOnnxConfig, UNetOnnxConfig, VaeDecoderOnnxConfig, VaeEncoderOnnxConfig), so ORT-side code
written for optimum exports runs on ours unchanged. Graphs come from the TorchScript exporter
(`torch.onnx.export(..., dynamo=False)`): seconds instead of minutes, and graphs that ORT
quantization accepts.

Shapes are read from the modules and their configs' non-width fields (in_channels, sample_size,
cross_attention_dim, latent_channels), never from block widths, so channel-pruned UNets export too.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.validate import ParityError, onnx_parity, phase

logger = logging.getLogger(__name__)


VALID_COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
DEFAULT_COMPONENTS = ("text_encoder", "unet", "vae_decoder")
# 14 is the first opset with Trilu (CLIP's causal mask) and the one optimum's SD configs ask for;
# 20 is the newest the TorchScript exporter of torch 2.13 writes.
MIN_OPSET, MAX_OPSET = 14, 20

# Max abs error allowed between ONNX Runtime and PyTorch, fp32, per component. ORT and PyTorch
# sum in different orders, so fp32 rounding alone gives ~1e-6 on these outputs (3e-6 measured
# on a 35M-param UNet); the limits sit ~30-100x above that noise and far below a real defect
# (a wrong op or a baked-in shape gives errors of order 1e-1).
# - text_encoder 1e-4: outputs are LayerNorm-ed, O(1) values; a dozen transformer layers.
# - unet 1e-4: predicts unit-variance noise; the scheduler amplifies its error at every step,
#   so it gets the tightest limit the noise floor allows.
# - vae_decoder / vae_encoder 1e-3: a deep conv stack without a final norm over many pixels
#   (512x512 at SD-1.5 size) accumulates more rounding; optimum uses 3e-4 at its dummy sizes.
#   1e-3 on a [-1, 1] image is an eighth of one 8-bit level.
DEFAULT_TOLERANCES = {"text_encoder": 1e-4, "unet": 1e-4, "vae_decoder": 1e-3, "vae_encoder": 1e-3}
# Apple's ml-stable-diffusion refuses a converted component below 35 dB PSNR; so do we.
PSNR_FLOOR_DB = 35.0
# protobuf refuses messages of 2 GiB and more; leave 128 MiB for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**27
EXTERNAL_DATA_NAME = "model.onnx_data"
# A k-step generator's sampling schedule (toolchain.runtime.schedule.SCHEDULE_FILE, finetune.mode=sfd): it
# travels with the UNet so every runner samples the exported model as the generator it is.
GENERATOR_SCHEDULE = "onestep.json"
# Traced at batch 2 (one guided image: what every SD runtime feeds the UNet) and checked at
# batch 3, which proves the batch axis really is dynamic. Not batch 1: a channel-pruned UNet can
# keep one channel per GroupNorm group at its 1x1 innermost resolution, where torch refuses a
# single value per group.
EXPORT_BATCH = 2
PARITY_BATCH = 3
PARITY_SEED = 0


class TextEncoderForExport(torch.nn.Module):
    """CLIPTextModel with plain-tensor outputs: input_ids [B, L] -> ([B, L, D], [B, D])."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        outputs = self.text_encoder(input_ids, return_dict=False)
        return outputs[0], outputs[1]


class UNetForExport(torch.nn.Module):
    """UNet2DConditionModel: sample [B, C, H, W], timestep [], encoder_hidden_states [B, L, D] -> [B, C, H, W]."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeDecoderForExport(torch.nn.Module):
    """AutoencoderKL.decode without scaling: latent_sample [B, 4, h, w] -> sample [B, 3, 8h, 8w] (8 = 2^(blocks-1))."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoderForExport(torch.nn.Module):
    """AutoencoderKL.encode: sample [B, 3, H, W] -> latent_parameters [B, 8, H/f, W/f] (mean and logvar)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return self.vae.encode(sample).latent_dist.parameters


def _component_spec(pipe, name: str) -> dict[str, Any]:
    """What exporting one component needs: the module, optimum's names and axes, inputs and config.

    `make_inputs(batch, rng)` returns numpy arrays in the graph's input order.
    """
    text_config = pipe.text_encoder.config
    seq_len = text_config.max_position_embeddings
    latent_size = pipe.unet.config.sample_size
    vae_scale_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)

    if name == "text_encoder":

        def make_inputs(batch, rng):
            input_ids = rng.integers(0, text_config.vocab_size, size=(batch, seq_len), dtype=np.int64)
            input_ids[:, -1] = text_config.eos_token_id  # the pooler reads the hidden state at EOS
            return {"input_ids": input_ids}

        return {
            "module": TextEncoderForExport(pipe.text_encoder),
            "make_inputs": make_inputs,
            "output_names": ["last_hidden_state", "pooler_output"],
            "dynamic_axes": {
                "input_ids": {0: "batch_size", 1: "sequence_length"},
                "last_hidden_state": {0: "batch_size", 1: "sequence_length"},
                "pooler_output": {0: "batch_size"},
            },
            "save_config": pipe.text_encoder.config.save_pretrained,
        }
    if name == "unet":
        unet_config = pipe.unet.config
        num_train_timesteps = pipe.scheduler.config.get("num_train_timesteps", 1000)

        def make_inputs(batch, rng):
            return {
                "sample": rng.standard_normal(
                    (batch, unet_config.in_channels, latent_size, latent_size), dtype=np.float32
                ),
                # optimum exports the timestep as a float32 scalar; ORT's UNet wrapper casts to it
                "timestep": np.array(rng.integers(0, num_train_timesteps), dtype=np.float32),
                "encoder_hidden_states": rng.standard_normal(
                    (batch, seq_len, unet_config.cross_attention_dim), dtype=np.float32
                ),
            }

        return {
            "module": UNetForExport(pipe.unet),
            "make_inputs": make_inputs,
            "output_names": ["out_sample"],
            "dynamic_axes": {
                "sample": {0: "batch_size", 2: "height", 3: "width"},
                "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
                "out_sample": {0: "batch_size", 2: "height", 3: "width"},
            },
            "save_config": pipe.unet.save_config,
        }
    if name == "vae_decoder":
        vae_config = pipe.vae.config

        def make_inputs(batch, rng):
            shape = (batch, vae_config.latent_channels, latent_size, latent_size)
            return {"latent_sample": rng.standard_normal(shape, dtype=np.float32)}

        return {
            "module": VaeDecoderForExport(pipe.vae),
            "make_inputs": make_inputs,
            "output_names": ["sample"],
            "dynamic_axes": {
                "latent_sample": {0: "batch_size", 2: "latent_height", 3: "latent_width"},
                "sample": {
                    0: "batch_size",
                    2: f"latent_height * {vae_scale_factor}",
                    3: f"latent_width * {vae_scale_factor}",
                },
            },
            "save_config": pipe.vae.save_config,
        }
    if name == "vae_encoder":
        vae_config = pipe.vae.config
        pixels = latent_size * vae_scale_factor

        def make_inputs(batch, rng):
            shape = (batch, vae_config.in_channels, pixels, pixels)
            return {"sample": rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)}

        return {
            "module": VaeEncoderForExport(pipe.vae),
            "make_inputs": make_inputs,
            "output_names": ["latent_parameters"],
            "dynamic_axes": {
                "sample": {0: "batch_size", 2: "sample_height", 3: "sample_width"},
                "latent_parameters": {
                    0: "batch_size",
                    2: f"sample_height / {vae_scale_factor}",
                    3: f"sample_width / {vae_scale_factor}",
                },
            },
            "save_config": pipe.vae.save_config,
        }
    raise ValueError(f"unknown component {name!r}; valid: {list(VALID_COMPONENTS)}")


def _write_onnx(
    module: torch.nn.Module,
    inputs: dict[str, np.ndarray],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int,
    component_dir: Path,
    external_data_threshold: int,
    phases_s: dict[str, float],
) -> Path | None:
    """Trace `module` to component_dir/model.onnx; weights go to model.onnx_data when the model's
    size passes `external_data_threshold` bytes. Returns the external data path or None.
    Seconds per phase ("trace", "external_data") go to `phases_s`."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors

    # Trace into a scratch folder: above 2 GB the TorchScript exporter scatters one file per
    # tensor beside its output; we gather them into the single file optimum's layout uses.
    scratch = component_dir / ".trace"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    traced = scratch / "model.onnx"
    with warnings.catch_warnings(), phase(component_dir.name, "trace", phases_s):
        # diffusers and transformers branch on shapes in Python; the tracer warns at every such
        # branch. Whether one baked a shape into the graph is settled by the parity check at a
        # different batch size, not by reading dozens of warnings.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # The TorchScript exporter is chosen on purpose (see the module docstring); its
        # deprecation notices say nothing about this graph.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        # CLIP's pooler indexes by argmax(input_ids == eos), never negative, which is the one case
        # this warning is about; strided slices that are not constant-folded only cost a node.
        warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
        torch.onnx.export(
            module,
            tuple(torch.from_numpy(v) for v in inputs.values()),
            str(traced),
            input_names=list(inputs),
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    files = [p for p in scratch.iterdir() if p.is_file()]
    total_bytes = sum(p.stat().st_size for p in files)
    target = component_dir / "model.onnx"
    external = component_dir / EXTERNAL_DATA_NAME
    for stale in (target, external):
        stale.unlink(missing_ok=True)
    if total_bytes <= external_data_threshold and files == [traced]:
        os.replace(traced, target)
        shutil.rmtree(scratch)
        return None
    # Copy file to file, one tensor at a time, never through the proto: onnx.load(load_external_data=True)
    # held every weight (3.4 GB for SD-1.5) beside the caller's PyTorch copy, and protobuf keeps a
    # cleared bytes field's memory until the whole message is freed. Measured on SD-1.5: 3.4 -> 0.16 GB.
    with phase(component_dir.name, "external_data", phases_s):
        model = onnx.load(str(traced), load_external_data=False)
        with open(external, "wb") as data_file:
            for tensor in _get_all_tensors(model):
                if tensor.data_location == onnx.TensorProto.EXTERNAL:
                    info = ExternalDataInfo(tensor)
                    with open(scratch / info.location, "rb") as source:
                        source.seek(info.offset or 0)
                        raw = source.read(info.length) if info.length else source.read()
                else:
                    raw = tensor.raw_data
                if len(raw) < 1024:  # small tensors stay inline, as optimum does
                    if tensor.data_location == onnx.TensorProto.EXTERNAL:
                        tensor.raw_data = raw
                        tensor.data_location = onnx.TensorProto.DEFAULT
                        del tensor.external_data[:]
                    continue
                offset = data_file.tell()
                data_file.write(raw)
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
                del tensor.external_data[:]
                for key, value in (("location", EXTERNAL_DATA_NAME), ("offset", offset), ("length", len(raw))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, str(value)
                del raw
        onnx.save_model(model, str(target))
        del model
    shutil.rmtree(scratch)
    return external


def copy_generator_schedule(pipe, out_dir: Path) -> list[int] | None:
    """Copy `onestep.json` from the folder `pipe` was loaded from into `out_dir`; returns its
    timesteps, or None when the pipeline is an ordinary diffusion model."""
    import json

    folder = getattr(pipe, "name_or_path", None)
    source = Path(folder) / GENERATOR_SCHEDULE if folder else None
    if source is None or not source.is_file():
        return None
    shutil.copy2(source, Path(out_dir) / GENERATOR_SCHEDULE)
    return json.loads(source.read_text())["timesteps"]


def export_onnx(
    pipe,
    out_dir: Path,
    opset: int = 17,
    components=DEFAULT_COMPONENTS,
    tolerances: dict[str, float] | None = None,
    progress: bool = True,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> dict:
    """Write `pipe` (a diffusers StableDiffusionPipeline, fp32) to `out_dir` in optimum's ONNX layout.

    Each component is traced at batch 2, then run in onnxruntime (CPUExecutionProvider) and in
    PyTorch on the same fixed random inputs at batch 3. Parity numbers: `max_abs_err`, the largest
    absolute difference over all outputs, and `psnr_db`, the lowest PSNR over all outputs, with
    each PyTorch output's peak-to-peak range as the signal range (`export.validate.psnr`).
    A component whose error passes its tolerance (DEFAULT_TOLERANCES, overridden per component by
    `tolerances`) or whose PSNR falls below PSNR_FLOOR_DB (35 dB) raises ParityError at once; the
    output folder is then incomplete and the caller discards it. `model_index.json` is written
    last, so a folder that has one is complete.

    `external_data_threshold` (bytes): a model larger than this keeps its weights in
    `<component>/model.onnx_data`; the default stays under protobuf's 2 GiB limit.

    Returns::

        {"parity": [{"component": "unet", "format": "onnx", "max_abs_err": 3e-6,
                     "psnr_db": 120.4, "tolerance": 1e-4}, ...],
         "files": {"unet": {"path": "unet/model.onnx", "size_bytes": 3401234,
                            "external_data": None, "export_s": 0.8,
                            "phases_s": {"trace": 0.6, "validate": 0.3}}, ...},
         "opset": 17, "generator_schedule": None}

    generator_schedule: the generator timesteps when the pipeline folder (`pipe.name_or_path`)
    holds a k-step generator's `onestep.json`, which is then copied beside model_index.json.
    `size_bytes` counts the graph and its external data; paths are relative to `out_dir`.
    `phases_s`: seconds of "trace", "external_data" (only when written) and "validate"; each
    phase is logged as it starts and ends (the progress display inside a long component).
    Raises ValueError on bad arguments before anything is written.
    """
    components = tuple(components) if not isinstance(components, str) else (components,)
    unknown = [c for c in components if c not in VALID_COMPONENTS]
    if unknown or not components or len(set(components)) != len(components):
        raise ValueError(
            f"components {list(components)}: each must be one of {list(VALID_COMPONENTS)}, at least one, no repeats"
        )
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset {opset!r}: must be an integer from {MIN_OPSET} to {MAX_OPSET}")
    limits = dict(DEFAULT_TOLERANCES)
    for name, value in (tolerances or {}).items():
        if name not in VALID_COMPONENTS:
            raise ValueError(f"tolerances: unknown component {name!r}; valid: {list(VALID_COMPONENTS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"tolerances[{name!r}] = {value!r}: must be a number >= 0 (max abs error)")
        limits[name] = float(value)
    if isinstance(external_data_threshold, bool) or not isinstance(external_data_threshold, int):
        raise ValueError(f"external_data_threshold {external_data_threshold!r}: must be an int (bytes)")
    needed = {"tokenizer", "scheduler", "text_encoder", "unet", "vae"}  # shapes come from all three models
    missing = sorted(a for a in needed if getattr(pipe, a, None) is None)
    if missing:
        raise ValueError(f"pipeline has no {missing}; pass a StableDiffusionPipeline with all of {sorted(needed)}")

    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.tokenizer.save_pretrained(out_dir / "tokenizer")
    pipe.scheduler.save_pretrained(out_dir / "scheduler")
    schedule = copy_generator_schedule(pipe, out_dir)

    result: dict[str, Any] = {"parity": [], "files": {}, "opset": opset, "generator_schedule": schedule}
    bar = tqdm(components, desc="export onnx", unit="component", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        start = time.perf_counter()
        spec = _component_spec(pipe, name)
        module = spec["module"]
        # Export and compare in eval mode (no dropout), then leave the caller's module as it was.
        wrapped = next(module.children())
        was_training = wrapped.training
        module.eval()
        phases_s: dict[str, float] = {}
        try:
            component_dir = out_dir / name
            component_dir.mkdir(exist_ok=True)
            external = _write_onnx(
                module,
                spec["make_inputs"](EXPORT_BATCH, np.random.default_rng(PARITY_SEED)),
                spec["output_names"],
                spec["dynamic_axes"],
                opset,
                component_dir,
                external_data_threshold,
                phases_s,
            )
            spec["save_config"](component_dir)
            export_s = time.perf_counter() - start
            onnx_path = component_dir / "model.onnx"
            with phase(name, "validate", phases_s):
                max_abs_err, psnr_db = onnx_parity(
                    onnx_path, module, spec["make_inputs"](PARITY_BATCH, np.random.default_rng(PARITY_SEED + 1))
                )
        finally:
            wrapped.train(was_training)
        del spec, module, wrapped
        gc.collect()

        tolerance = limits[name]
        logger.info(
            "%s: exported in %.1f s, max abs err %.3g (tolerance %.3g), PSNR %.1f dB",
            name,
            export_s,
            max_abs_err,
            tolerance,
            psnr_db,
        )
        # written as `not <=` so that NaN fails too
        if not max_abs_err <= tolerance:
            raise ParityError(
                f"{name}: ONNX Runtime differs from PyTorch by max abs error {max_abs_err:.3g}, "
                f"over the tolerance {tolerance:.3g}"
            )
        if not psnr_db >= PSNR_FLOOR_DB:
            raise ParityError(
                f"{name}: ONNX Runtime vs PyTorch PSNR {psnr_db:.1f} dB, below the floor {PSNR_FLOOR_DB:.0f} dB "
                f"(max abs error {max_abs_err:.3g}, tolerance {tolerance:.3g})"
            )
        result["parity"].append(
            {
                "component": name,
                "format": "onnx",
                "max_abs_err": max_abs_err,
                "psnr_db": psnr_db,
                "tolerance": tolerance,
            }
        )
        size_bytes = onnx_path.stat().st_size + (external.stat().st_size if external else 0)
        result["files"][name] = {
            "path": f"{name}/model.onnx",
            "size_bytes": size_bytes,
            "external_data": f"{name}/{EXTERNAL_DATA_NAME}" if external else None,
            "export_s": round(export_s, 3),
            "phases_s": phases_s,  # trace, external_data (when written), validate
        }

    # Last: the pipeline's own model_index.json, as optimum writes it; its presence marks a complete folder.
    pipe.save_config(out_dir)
    _drop_build_paths(out_dir)
    return result


def _drop_build_paths(out_dir: Path) -> None:
    """diffusers writes `_name_or_path` (the folder a model was loaded from) into saved configs: a
    path of the build machine that also made a resumed run's files differ from an uninterrupted
    one's. Deliverables carry none, so the same inputs give byte-identical folders."""
    for file in [out_dir / "model_index.json", *out_dir.glob("*/config.json")]:
        config = json.loads(file.read_text())
        if config.pop("_name_or_path", None) is not None:
            file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
