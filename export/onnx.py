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

What optimum-onnx 0.1.0 does here: every component is traced by its exporter,
`optimum.exporters.onnx.convert.export`, with its own OnnxConfig (`CLIPTextOnnxConfig`,
`UNetOnnxConfig`, `VaeDecoderOnnxConfig`, `VaeEncoderOnnxConfig`), which give the input and output
names, the dynamic axes, the trace inputs and the op patches for the TorchScript exporter
(`dynamo=False`: seconds instead of minutes, and graphs that ORT quantization accepts). It traces a
module instance, so a channel-pruned UNet (widths that no config describes) exports as it is.

What stays ours, because optimum does not do it or does it differently:
- The modules handed to optimum are thin wrappers (`UNetForExport`, ...) around the pipeline's
  modules, which also serve as the PyTorch reference of the parity check. They keep the `unet.` /
  `text_encoder.` / `vae.` prefix in node and initializer names (what `quantize.exclude_nodes`
  names) and give a graph byte-identical to the one our own tracer wrote before optimum did (measured
  on the tiny pipeline, pruned and unpruned). `get_diffusion_models_for_export` is not used: it
  writes export-only keys into the caller's module configs (they would land in config.json) and
  deep-copies the VAE twice.
- Trace shapes: batch 2, the text encoder's full sequence length and the UNet's own latent size
  (optimum's defaults are batch 2, 16 tokens, 64x64); optimum's `fix_dynamic_axes` is switched off,
  the parity check at batch 1 shows whether a shape got baked in.
- External data above 2 GB: optimum gathers the TorchScript exporter's per-tensor files through
  `onnx.load(load_external_data=True)`, holding every weight a second time (3.4 GB for SD-1.5 beside
  the caller's PyTorch copy). Its check is switched off for the call and we gather file to file
  (`_gather_external_data`, 3.4 -> 0.16 GB measured on SD-1.5), small tensors inline as optimum
  keeps them, and we also move weights out below 2 GiB when `external_data_threshold` asks.
- The parity gate: optimum's `validate_model_outputs` raises on an absolute tolerance with its own
  random inputs and returns no numbers. Ours runs fixed inputs at batch 1, enforces a per-component
  max abs error and a 35 dB PSNR floor, and returns both numbers for the manifest.
- The k-step generator's schedule file (`onestep.json`), copied beside model_index.json, and
  configs without the build machine's `_name_or_path`.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.validate import ParityError, onnx_parity, phase, require_pipeline
from toolchain.models.rebuild import allow_batch_one

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
# batch 1: not the trace batch, so a batch axis baked into the graph fails the check, and the
# batch a k-step generator runs at (no guidance duplication), where a channel-pruned UNet can keep
# one channel per GroupNorm group at its 1x1 innermost level (toolchain.models.rebuild.OneChannelGroupNorm
# runs it in torch). Checks at batch 3 and 1 on the full latent, in a session with ONNX Runtime's
# optimisations and arena, took the SD-1.5 UNet's export to 10.3 GiB; now 7.1 (export-sd15.md).
EXPORT_BATCH = 2
PARITY_BATCHES = (1,)
# The UNet's parity check runs at a latent side of at most this (SD-1.5: 32 of 64). Its exported
# attention holds (side^2)^2 scores per head: at 64 the export peaked 1.3 GiB higher (8.4 GiB). A
# side other than the trace's also proves the height and width axes are dynamic; multiples of 8
# keep every SD UNet's downsampling exact.
PARITY_MAX_LATENT = 32
PARITY_SEED = 0


class TextEncoderForExport(torch.nn.Module):
    """CLIPTextModel with plain-tensor outputs: input_ids [B, L] -> ([B, L, D], [B, D])."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder
        self.config = text_encoder.config  # read by optimum's exporter

    def forward(self, input_ids):
        outputs = self.text_encoder(input_ids, return_dict=False)
        return outputs[0], outputs[1]


class UNetForExport(torch.nn.Module):
    """UNet2DConditionModel: sample [B, C, H, W], timestep [], encoder_hidden_states [B, L, D] -> [B, C, H, W]."""

    def __init__(self, unet):
        super().__init__()
        self.unet = allow_batch_one(unet)  # checked at batch 1 too, where a generator runs
        self.config = unet.config

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeDecoderForExport(torch.nn.Module):
    """AutoencoderKL (or AutoencoderTiny) .decode without scaling: latent_sample [B, 4, h, w] -> sample [B, 3, 8h, 8w]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.config = vae.config

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoderForExport(torch.nn.Module):
    """AutoencoderKL.encode: sample [B, 3, H, W] -> latent_parameters [B, 8, H/f, W/f] (mean and logvar)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.config = vae.config

    def forward(self, sample):
        return self.vae.encode(sample).latent_dist.parameters


def _shapes(pipe) -> tuple[int, int, int]:
    """(sequence length, latent size, VAE scale factor), from config fields no pruning changes."""
    return (
        pipe.text_encoder.config.max_position_embeddings,
        pipe.unet.config.sample_size,
        2 ** (len(pipe.vae.config.block_out_channels) - 1),
    )


def _text_encoder_spec(pipe) -> dict[str, Any]:
    from optimum.exporters.onnx.model_configs import CLIPTextOnnxConfig

    text_config = pipe.text_encoder.config
    seq_len, _, _ = _shapes(pipe)

    def make_inputs(batch, rng):
        input_ids = rng.integers(0, text_config.vocab_size, size=(batch, seq_len), dtype=np.int64)
        input_ids[:, -1] = text_config.eos_token_id  # the pooler reads the hidden state at EOS
        return {"input_ids": input_ids}

    return {
        "module": TextEncoderForExport(pipe.text_encoder),
        "onnx_config": CLIPTextOnnxConfig(text_config, task="feature-extraction"),
        "trace_shapes": {"batch_size": EXPORT_BATCH, "sequence_length": seq_len},
        "make_inputs": make_inputs,
        "save_config": text_config.save_pretrained,
    }


def _unet_spec(pipe) -> dict[str, Any]:
    from optimum.exporters.onnx.model_configs import UNetOnnxConfig

    unet_config = pipe.unet.config
    seq_len, latent_size, _ = _shapes(pipe)
    num_train_timesteps = pipe.scheduler.config.get("num_train_timesteps", 1000)

    side = min(latent_size, PARITY_MAX_LATENT)

    def make_inputs(batch, rng):
        return {
            "sample": rng.standard_normal((batch, unet_config.in_channels, side, side), dtype=np.float32),
            # optimum exports the timestep as a float32 scalar; ORT's UNet wrapper casts to it
            "timestep": np.array(rng.integers(0, num_train_timesteps), dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal(
                (batch, seq_len, unet_config.cross_attention_dim), dtype=np.float32
            ),
        }

    return {
        "module": UNetForExport(pipe.unet),
        # sample's height and width: the config's sample_size (optimum reads it as image_size)
        "onnx_config": UNetOnnxConfig(unet_config, task="semantic-segmentation"),
        "trace_shapes": {"batch_size": EXPORT_BATCH, "sequence_length": seq_len},
        "make_inputs": make_inputs,
        "save_config": pipe.unet.save_config,
    }


def _vae_decoder_spec(pipe) -> dict[str, Any]:
    from optimum.exporters.onnx.model_configs import VaeDecoderOnnxConfig

    vae_config = pipe.vae.config
    _, latent_size, _ = _shapes(pipe)

    def make_inputs(batch, rng):
        shape = (batch, vae_config.latent_channels, latent_size, latent_size)
        return {"latent_sample": rng.standard_normal(shape, dtype=np.float32)}

    onnx_config = vae_config
    if "up_block_types" not in vae_config:  # AutoencoderTiny (stage decoder): optimum reads it to name output axes
        from diffusers.configuration_utils import FrozenDict

        levels = len(vae_config.block_out_channels)
        onnx_config = FrozenDict({**vae_config, "up_block_types": ["UpDecoderBlock2D"] * levels})
    return {
        "module": VaeDecoderForExport(pipe.vae),
        "onnx_config": VaeDecoderOnnxConfig(onnx_config, task="semantic-segmentation"),
        "trace_shapes": {"batch_size": EXPORT_BATCH, "height": latent_size, "width": latent_size},
        "make_inputs": make_inputs,
        "save_config": pipe.vae.save_config,
    }


def _vae_encoder_spec(pipe) -> dict[str, Any]:
    from optimum.exporters.onnx.model_configs import VaeEncoderOnnxConfig

    vae_config = pipe.vae.config
    _, latent_size, vae_scale_factor = _shapes(pipe)
    pixels = latent_size * vae_scale_factor

    def make_inputs(batch, rng):
        shape = (batch, vae_config.in_channels, pixels, pixels)
        return {"sample": rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)}

    return {
        "module": VaeEncoderForExport(pipe.vae),
        # traced at the VAE config's sample_size (optimum reads it as image_size)
        "onnx_config": VaeEncoderOnnxConfig(vae_config, task="semantic-segmentation"),
        "trace_shapes": {"batch_size": EXPORT_BATCH},
        "make_inputs": make_inputs,
        "save_config": pipe.vae.save_config,
    }


# What exporting one component needs: the wrapper module (traced, and the parity reference),
# optimum's OnnxConfig, the trace shapes, `make_inputs(batch, rng)` (numpy arrays in the graph's
# input order, for the parity check) and `save_config(folder)`.
COMPONENT_SPECS = {
    "text_encoder": _text_encoder_spec,
    "unet": _unet_spec,
    "vae_decoder": _vae_decoder_spec,
    "vae_encoder": _vae_encoder_spec,
}


@contextmanager
def _quiet_trace():
    """diffusers and transformers branch on shapes in Python; the tracer warns at every such
    branch. Whether one baked a shape into the graph is settled by the parity check at a
    different batch size, not by reading dozens of warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # The TorchScript exporter is chosen on purpose (see the module docstring); its
        # deprecation notices say nothing about this graph.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        # CLIP's pooler indexes by argmax(input_ids == eos), never negative, which is the one case
        # this warning is about; strided slices that are not constant-folded only cost a node.
        warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
        yield


def _trace(spec: dict[str, Any], opset: int, traced: Path) -> None:
    """Trace the component to `traced` with optimum's exporter. Above 2 GB the TorchScript exporter
    scatters one file per tensor beside `traced`; optimum's own gathering of them is switched off
    (see the module docstring), `_gather_external_data` does it."""
    from unittest import mock

    from optimum.exporters.onnx import convert

    with (
        _quiet_trace(),
        mock.patch.object(convert, "check_model_uses_external_data", return_value=False),
        mock.patch.dict(os.environ),
    ):
        os.environ.pop("FORCE_ONNX_EXTERNAL_DATA", None)  # optimum's switch for the same gathering
        convert.export(
            spec["module"],
            spec["onnx_config"],
            traced,
            opset=opset,
            input_shapes=spec["trace_shapes"],
            disable_dynamic_axes_fix=True,
            do_constant_folding=True,
        )


def _write_onnx(
    spec: dict[str, Any], opset: int, component_dir: Path, external_data_threshold: int, phases_s: dict[str, float]
) -> Path | None:
    """Trace the component to component_dir/model.onnx; weights go to model.onnx_data when the
    model's size passes `external_data_threshold` bytes. Returns the external data path or None.
    Seconds per phase ("trace", "external_data") go to `phases_s`."""
    # Trace into a scratch folder: above 2 GB the TorchScript exporter scatters one file per
    # tensor beside its output; we gather them into the single file optimum's layout uses.
    scratch = component_dir / ".trace"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    traced = scratch / "model.onnx"
    with phase(component_dir.name, "trace", phases_s):
        _trace(spec, opset, traced)
    files = [p for p in scratch.iterdir() if p.is_file()]
    total_bytes = sum(p.stat().st_size for p in files)
    target = component_dir / "model.onnx"
    external = component_dir / EXTERNAL_DATA_NAME
    for stale in (target, external):
        stale.unlink(missing_ok=True)
    if total_bytes <= external_data_threshold and files == [traced]:
        os.replace(traced, target)
    else:
        with phase(component_dir.name, "external_data", phases_s):
            _gather_external_data(traced, target, external)
    shutil.rmtree(scratch)
    return external if external.exists() else None


def _gather_external_data(traced: Path, target: Path, external: Path) -> None:
    """Write `traced` (its weights inline or in files beside it) as `target` with every tensor of
    1 KiB or more in the single file `external`, smaller ones inline, as optimum's layout has them.

    Copies file to file, one tensor at a time, never through the proto: onnx.load(load_external_data=True)
    held every weight (3.4 GB for SD-1.5) beside the caller's PyTorch copy, and protobuf keeps a
    cleared bytes field's memory until the whole message is freed. Measured on SD-1.5: 3.4 -> 0.16 GB.
    """
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors

    model = onnx.load(str(traced), load_external_data=False)
    with open(external, "wb") as data_file:
        for tensor in _get_all_tensors(model):
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                info = ExternalDataInfo(tensor)
                with open(traced.parent / info.location, "rb") as source:
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


def copy_generator_schedule(pipe, out_dir: Path) -> list[int] | None:
    """Copy `onestep.json` from the folder `pipe` was loaded from into `out_dir`; returns its
    timesteps, or None when the pipeline is an ordinary diffusion model."""
    folder = getattr(pipe, "name_or_path", None)
    source = Path(folder) / GENERATOR_SCHEDULE if folder else None
    if source is None or not source.is_file():
        return None
    shutil.copy2(source, Path(out_dir) / GENERATOR_SCHEDULE)
    return json.loads(source.read_text())["timesteps"]


def _check_arguments(pipe, components, opset, tolerances, external_data_threshold) -> tuple[tuple, dict[str, float]]:
    """Refuse bad arguments before anything is written; returns (components, tolerance per component)."""
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
    require_pipeline(pipe)
    return components, limits


def _export_component(pipe, name: str, out_dir: Path, opset: int, external_data_threshold: int) -> dict[str, Any]:
    """Write one component's graph and config.json, then measure it against PyTorch.

    Returns {"max_abs_err", "psnr_db", "export_s", "phases_s", "external"} (external: Path or None).
    """
    start = time.perf_counter()
    spec = COMPONENT_SPECS[name](pipe)
    module = spec["module"]
    # Export and compare in eval mode (no dropout), then leave the caller's module as it was.
    wrapped = next(module.children())
    was_training = wrapped.training
    module.eval()
    phases_s: dict[str, float] = {}
    try:
        component_dir = out_dir / name
        component_dir.mkdir(exist_ok=True)
        external = _write_onnx(spec, opset, component_dir, external_data_threshold, phases_s)
        spec["save_config"](component_dir)
        export_s = time.perf_counter() - start
        with phase(name, "validate", phases_s):
            checks = [
                onnx_parity(
                    component_dir / "model.onnx", module, spec["make_inputs"](b, np.random.default_rng(PARITY_SEED + 1))
                )
                for b in PARITY_BATCHES
            ]
            max_abs_err, psnr_db = max(c[0] for c in checks), min(c[1] for c in checks)
    finally:
        wrapped.train(was_training)
    del spec, module, wrapped
    gc.collect()
    return {
        "max_abs_err": max_abs_err,
        "psnr_db": psnr_db,
        "export_s": export_s,
        "phases_s": phases_s,
        "external": external,
    }


def _check_parity(name: str, max_abs_err: float, psnr_db: float, tolerance: float) -> None:
    """ParityError when the error passes `tolerance` or the PSNR falls below PSNR_FLOOR_DB (NaN fails both)."""
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


def _gate_component(name: str, done: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """Log one exported component's numbers, then hold them to `tolerance` and the PSNR floor
    (ParityError); returns its row of the result's "parity"."""
    max_abs_err, psnr_db = done["max_abs_err"], done["psnr_db"]
    logger.info(
        "%s: exported in %.1f s, max abs err %.3g (tolerance %.3g), PSNR %.1f dB",
        name,
        done["export_s"],
        max_abs_err,
        tolerance,
        psnr_db,
    )
    _check_parity(name, max_abs_err, psnr_db, tolerance)
    return {
        "component": name,
        "format": "onnx",
        "max_abs_err": max_abs_err,
        "psnr_db": psnr_db,
        "tolerance": tolerance,
    }


def _file_entry(out_dir: Path, name: str, done: dict[str, Any]) -> dict[str, Any]:
    """One component's row of the result's "files": the graph and its external data, paths relative to `out_dir`."""
    external = done["external"]
    onnx_path = out_dir / name / "model.onnx"
    return {
        "path": f"{name}/model.onnx",
        "size_bytes": onnx_path.stat().st_size + (external.stat().st_size if external else 0),
        "external_data": f"{name}/{EXTERNAL_DATA_NAME}" if external else None,
        "export_s": round(done["export_s"], 3),
        "phases_s": done["phases_s"],  # trace, external_data (when written), validate
    }


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

    Each component is traced at batch 2 by optimum's exporter, then run in onnxruntime
    (CPUExecutionProvider) and in PyTorch on the same fixed random inputs at batch 1. Parity
    numbers: `max_abs_err`, the largest absolute difference over all outputs, and `psnr_db`, the
    lowest PSNR over all outputs, with each PyTorch output's peak-to-peak range as the signal range
    (`export.validate.psnr`). A component whose error passes its tolerance (DEFAULT_TOLERANCES,
    overridden per component by `tolerances`) or whose PSNR falls below PSNR_FLOOR_DB (35 dB) raises
    ParityError at once; the output folder is then incomplete and the caller discards it.
    `model_index.json` is written last, so a folder that has one is complete.

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
    components, limits = _check_arguments(pipe, components, opset, tolerances, external_data_threshold)
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
        done = _export_component(pipe, name, out_dir, opset, external_data_threshold)
        result["parity"].append(_gate_component(name, done, limits[name]))
        result["files"][name] = _file_entry(out_dir, name, done)

    # Last: the pipeline's own model_index.json, as optimum writes it; its presence marks a complete folder.
    pipe.save_config(out_dir)
    drop_build_paths(out_dir)
    return result


def drop_build_paths(out_dir: Path) -> None:
    """diffusers writes `_name_or_path` (the folder a model was loaded from) into saved configs: a
    path of the build machine that also made a resumed run's files differ from an uninterrupted
    one's. Deliverables carry none, so the same inputs give byte-identical folders."""
    for file in [*out_dir.glob("model_index.json"), *out_dir.glob("*/config.json")]:
        config = json.loads(file.read_text())
        if config.pop("_name_or_path", None) is not None:
            file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
