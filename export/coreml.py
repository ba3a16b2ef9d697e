"""Export a Stable Diffusion pipeline to Core ML packages laid out for Apple's `StableDiffusion` Swift package.

    out_dir/
      TextEncoder.mlpackage   input_ids float32 [1, L] (token ids as floats)
                                -> last_hidden_state [1, L, D], pooled_outputs [1, D]
      Unet.mlpackage          sample [2, C, h, w], timestep float32 [2], encoder_hidden_states [2, D, 1, L]
                                -> noise_pred [2, C, h, w]
      VAEDecoder.mlpackage    z [1, 4, h, w] (latents already divided by the VAE scaling factor)
                                -> image [1, 3, 8h, 8w] in [-1, 1]          (8 = 2^(VAE blocks - 1))
      vocab.json, merges.txt  the CLIP tokenizer, read by the Swift package's BPETokenizer
      reference/<Package>.npz fixed random inputs and the PyTorch fp32 outputs, for parity checks
                              on a Mac or a device later (keys "input:<name>", "output:<name>")

Names, shapes and dtypes are the ones the Swift package reads (apple/ml-stable-diffusion
`swift/StableDiffusion/pipeline/`): TextEncoder.swift takes the model's first input, feeds float32
ids of the model's own input shape and reads `last_hidden_state`; Unet.swift feeds `sample`,
`timestep` (float32, shape [2]) and `encoder_hidden_states` at batch 2 (classifier-free guidance)
with the embedding transposed to [B, D, 1, L] (`toHiddenStates`), and reads the first output;
Decoder.swift feeds the first input after dividing latents by the decoder scale factor and reads
the first output as a [1, 3, H, W] image. All shapes are fixed, as in Apple's conversions; the
`.mlpackage` folders are compiled to `.mlmodelc` (`xcrun coremlcompiler compile`) on a Mac.

What differs from a conversion by apple/ml-stable-diffusion's `torch2coreml.py`:
- The UNet is diffusers' own module. Apple converts its own re-implementation (`unet.py`) that
  keeps every activation 4-D [B, C, 1, S], uses 1x1 convolutions instead of Linear layers and a
  channel-dim LayerNorm, which is what the Neural Engine runs best. Our UNet only takes and
  returns Apple's 4-D encoder_hidden_states layout at its boundary (a transpose inside the
  graph); inside, tensors are diffusers' [B, S, C].
- attention="split_einsum" replaces diffusers' attention with a per-head einsum over [B, d, 1, S]
  tensors (Apple's SPLIT_EINSUM formulation, as a diffusers attention processor); Linear layers
  and norms around it stay as they are. SPLIT_EINSUM_V2 (query chunking) is not implemented.
- No UNet chunking (`--chunk-unet`, needed for ANE on iOS above ~1 GB of weights), no
  safety checker, no VAE encoder, no ControlNet inputs.
- The Swift package divides latents by 0.18215 unless told otherwise (`decoderScaleFactor`);
  a model with another `vae.config.scaling_factor` (returned as `decoder_scale_factor`) must
  pass it there.
- Apple converts the VAE decoder in fp32 for some models; here every component gets
  `compute_precision`.

Core ML cannot load or run a model on Linux. There we check what the package says about itself
(`MLModel(path, skip_model_load=True).get_spec()`): names, shapes, dtypes, ML program, spec
version, the MIL ops that hold compressed weights, and the weight file's size. On macOS each
component also runs and is compared with PyTorch (max abs error, PSNR; 35 dB floor as Apple uses).
"""

from __future__ import annotations

import gc
import logging
import shutil
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.validate import PSNR_CEILING_DB, ParityError, phase, psnr, require_pipeline
from toolchain.models.rebuild import allow_batch_one

logger = logging.getLogger(__name__)


VALID_COMPONENTS = ("text_encoder", "unet", "vae_decoder")
DEFAULT_COMPONENTS = ("text_encoder", "unet", "vae_decoder")
PACKAGE_NAMES = {"text_encoder": "TextEncoder", "unet": "Unet", "vae_decoder": "VAEDecoder"}
PRECISIONS = ("fp16", "fp32")
COMPRESSIONS = ("none", "int8", "palettize4", "palettize6", "palettize8")
ATTENTIONS = ("original", "split_einsum")
DEPLOYMENT_TARGETS = ("iOS17", "iOS18")
# Core ML specification version written for each deployment target (coremltools 9).
SPEC_VERSIONS = {7: "iOS16", 8: "iOS17", 9: "iOS18", 10: "iOS26"}
# MIL ops that hold compressed weights. linear_quantize_weights writes constexpr_affine_dequantize
# for an iOS17 target and constexpr_blockwise_shift_scale for iOS18 (measured, coremltools 9.0).
COMPRESSED_WEIGHT_OPS = {
    "int8": ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale"),
    "palettize4": ("constexpr_lut_to_dense",),
    "palettize6": ("constexpr_lut_to_dense",),
    "palettize8": ("constexpr_lut_to_dense",),
}
# Ops worth reporting: compressed weights, and where the attention went.
INTERESTING_OPS = (
    "constexpr_affine_dequantize",
    "constexpr_blockwise_shift_scale",
    "constexpr_lut_to_dense",
    "constexpr_sparse_to_dense",
    "einsum",
    "matmul",
    "softmax",
    "scaled_dot_product_attention",
    "conv",
    "linear",
)
UNET_BATCH = 2  # the Swift package always runs the UNet on [unconditional, conditional] (a generator: 1)
REFERENCE_SEED = 0
# Apple's ml-stable-diffusion refuses a converted component below 35 dB PSNR; so do we (macOS only).
PSNR_FLOOR_DB = 35.0
# Max abs error vs PyTorch fp32 allowed on macOS, per precision and component. fp16 has a
# 2^-11 relative step, so O(1) outputs carry ~1e-3 of rounding per op and a few dozen layers
# accumulate ~1e-2; the limits are several times that. Not yet measured on a Mac: PSNR is the
# primary check, as in Apple's converter.
DEFAULT_TOLERANCES = {
    "fp16": {"text_encoder": 5e-2, "unet": 5e-2, "vae_decoder": 5e-2},
    "fp32": {"text_encoder": 1e-3, "unet": 1e-3, "vae_decoder": 1e-3},
}
WEIGHTS_FILE = Path("Data") / "com.apple.CoreML" / "weights" / "weight.bin"
_DTYPES = {65568: "float32", 65552: "float16", 131104: "int32", 65600: "float64"}


class CoreMLCheckError(ParityError):
    """A written package does not have the inputs, outputs or compressed weights it should."""


class SplitEinsumAttnProcessor:
    """diffusers attention processor computing attention head by head with einsum on [B, d, 1, S] tensors.

    The formulation of Apple's SPLIT_EINSUM attention (ml-stable-diffusion `python_coreml_stable_diffusion/attention.py`,
    "Deploying Transformers on the Apple Neural Engine"): queries, keys and values are laid out as
    [B, C, 1, S], split into `heads` chunks of d = C / heads channels, and each head does
    `einsum("bchq,bkhc->bkhq")` (scores [B, S_k, 1, S_q], softmax over keys) and
    `einsum("bkhq,bchk->bchq")`. No tensor is ever reshaped to put heads in the batch axis, which
    is what the Neural Engine handles badly. Numerically the same as diffusers' AttnProcessor.
    Supports the self- and cross-attention of Stable Diffusion's UNet: 3-D or 4-D hidden states,
    no attention mask, no q/k norms.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if attention_mask is not None:
            raise NotImplementedError("SplitEinsumAttnProcessor: attention masks are not supported")
        if getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None:
            raise NotImplementedError("SplitEinsumAttnProcessor: q/k normalisation is not supported")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        # [B, S, C] -> [B, C, 1, S]
        query = attn.to_q(hidden_states).transpose(1, 2).unsqueeze(2)
        key = attn.to_k(encoder_hidden_states).transpose(1, 2).unsqueeze(2)
        value = attn.to_v(encoder_hidden_states).transpose(1, 2).unsqueeze(2)
        head_dim = query.shape[1] // attn.heads
        heads_out = []
        for q, k, v in zip(
            query.split(head_dim, dim=1), key.split(head_dim, dim=1), value.split(head_dim, dim=1), strict=True
        ):
            # k as [B, S_k, 1, d]: scores[b, k, 0, q] = sum_c q[b, c, 0, q] * k[b, k, 0, c]
            scores = torch.einsum("bchq,bkhc->bkhq", q, k.permute(0, 3, 2, 1)) * attn.scale
            weights = scores.softmax(dim=1)
            heads_out.append(torch.einsum("bkhq,bchk->bchq", weights, v))
        hidden_states = torch.cat(heads_out, dim=1).squeeze(2).transpose(1, 2)  # [B, S_q, C]

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class TextEncoderForCoreML(torch.nn.Module):
    """CLIPTextModel as the Swift package calls it: input_ids float32 [1, L] -> ([1, L, D], [1, D])."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        outputs = self.text_encoder(input_ids.to(torch.int64), return_dict=False)
        return outputs[0], outputs[1]


class UNetForCoreML(torch.nn.Module):
    """UNet2DConditionModel in the Swift package's layout.

    sample [B, C, h, w], timestep float32 [B], encoder_hidden_states [B, D, 1, L] -> noise_pred [B, C, h, w].
    """

    def __init__(self, unet):
        super().__init__()
        self.unet = allow_batch_one(unet)  # a k-step generator's package takes batch 1

    def forward(self, sample, timestep, encoder_hidden_states):
        encoder_hidden_states = encoder_hidden_states.squeeze(2).transpose(1, 2)  # [B, D, 1, L] -> [B, L, D]
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeDecoderForCoreML(torch.nn.Module):
    """AutoencoderKL.decode without scaling: z [1, 4, h, w] -> image [1, 3, 8h, 8w] in about [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z, return_dict=False)[0]


def _text_encoder_inputs(pipe, rng) -> dict[str, np.ndarray]:
    config = pipe.text_encoder.config
    ids = rng.integers(0, config.vocab_size, size=(1, config.max_position_embeddings)).astype(np.float32)
    ids[:, -1] = config.eos_token_id  # the pooled output is read at the EOS position
    return {"input_ids": ids}


def unet_batch(pipe) -> int:
    """The UNet package's fixed batch: 2 for a diffusion model, 1 for a k-step generator (the
    folder `pipe` was loaded from has onestep.json), which runs unguided: no duplicated batch."""
    from toolchain.runtime.schedule import read_schedule

    return 1 if read_schedule(getattr(pipe, "name_or_path", None)) else UNET_BATCH


def _unet_inputs(pipe, rng) -> dict[str, np.ndarray]:
    config, batch = pipe.unet.config, unet_batch(pipe)
    size = config.sample_size
    seq_len = pipe.text_encoder.config.max_position_embeddings
    step = float(rng.integers(0, pipe.scheduler.config.get("num_train_timesteps", 1000)))
    return {
        "sample": rng.standard_normal((batch, config.in_channels, size, size), dtype=np.float32),
        "timestep": np.full((batch,), step, dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, config.cross_attention_dim, 1, seq_len), dtype=np.float32),
    }


def _vae_decoder_inputs(pipe, rng) -> dict[str, np.ndarray]:
    size = pipe.unet.config.sample_size
    return {"z": rng.standard_normal((1, pipe.vae.config.latent_channels, size, size), dtype=np.float32)}


def _convert(ct, module, inputs, output_names, precision, target, component, phases_s):
    """Trace `module` on `inputs` and convert it to an ML program with fixed input shapes.
    Seconds of "trace" and "convert" go to `phases_s`."""
    example = tuple(torch.from_numpy(v) for v in inputs.values())
    module.eval()  # the caller's module gets its mode back in _convert_component
    with warnings.catch_warnings(), torch.no_grad():
        # diffusers and transformers branch on shapes in Python; with fixed shapes that is what we want.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # coremltools 9 converts TorchScript; torch's notice that jit.trace is deprecated says nothing here.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace", category=DeprecationWarning)
        with phase(component, "trace", phases_s):
            traced = torch.jit.trace(module, example, check_trace=False)
        # coremltools shows its own progress bars for the frontend and each pass pipeline
        with phase(component, "convert", phases_s):
            mlmodel = ct.convert(
                traced,
                inputs=[
                    ct.TensorType(name=name, shape=value.shape, dtype=np.float32) for name, value in inputs.items()
                ],
                outputs=[ct.TensorType(name=name, dtype=np.float32) for name in output_names],
                convert_to="mlprogram",
                compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
                minimum_deployment_target=getattr(ct.target, target),
            )
    del traced
    return mlmodel


def convert_text_encoder(ct, pipe, inputs, precision, target, phases_s):
    module = TextEncoderForCoreML(pipe.text_encoder)
    outputs = ["last_hidden_state", "pooled_outputs"]
    return _convert(ct, module, inputs, outputs, precision, target, "text_encoder", phases_s)


def convert_unet(ct, pipe, inputs, precision, target, phases_s):
    return _convert(ct, UNetForCoreML(pipe.unet), inputs, ["noise_pred"], precision, target, "unet", phases_s)


def convert_vae_decoder(ct, pipe, inputs, precision, target, phases_s):
    return _convert(ct, VaeDecoderForCoreML(pipe.vae), inputs, ["image"], precision, target, "vae_decoder", phases_s)


CONVERTERS = {
    "text_encoder": (convert_text_encoder, _text_encoder_inputs, TextEncoderForCoreML, "text_encoder"),
    "unet": (convert_unet, _unet_inputs, UNetForCoreML, "unet"),
    "vae_decoder": (convert_vae_decoder, _vae_decoder_inputs, VaeDecoderForCoreML, "vae"),
}


def _compress(ct, mlmodel, compression: str):
    from coremltools.optimize.coreml import (
        OpLinearQuantizerConfig,
        OpPalettizerConfig,
        OptimizationConfig,
        linear_quantize_weights,
        palettize_weights,
    )

    if compression == "int8":
        config = OptimizationConfig(global_config=OpLinearQuantizerConfig(mode="linear_symmetric"))
        return linear_quantize_weights(mlmodel, config)
    nbits = int(compression.removeprefix("palettize"))
    config = OptimizationConfig(global_config=OpPalettizerConfig(mode="kmeans", nbits=nbits))
    return palettize_weights(mlmodel, config)


def _weights_bytes(package: Path) -> int:
    path = package / WEIGHTS_FILE
    return path.stat().st_size if path.is_file() else 0


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def inspect_package(package: Path) -> dict[str, Any]:
    """What a saved `.mlpackage` says about itself, read without loading it (works on Linux).

    Returns {"model_type": "mlProgram", "spec_version": 8, "deployment_target": "iOS17",
    "inputs": {name: {"shape": [...], "dtype": "float32"}}, "outputs": {...},
    "ops": {op: count} (INTERESTING_OPS only), "all_ops": {op: count}}.
    """
    import coremltools as ct

    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()

    def features(descriptions):
        return {
            d.name: {
                "shape": [int(n) for n in d.type.multiArrayType.shape],
                "dtype": _DTYPES.get(d.type.multiArrayType.dataType, str(d.type.multiArrayType.dataType)),
            }
            for d in descriptions
        }

    ops: Counter = Counter()
    if spec.WhichOneof("Type") == "mlProgram":
        for function in spec.mlProgram.functions.values():
            for block in function.block_specializations.values():
                ops.update(op.type for op in block.operations)
    return {
        "model_type": spec.WhichOneof("Type"),
        "spec_version": spec.specificationVersion,
        "deployment_target": SPEC_VERSIONS.get(spec.specificationVersion, f"spec {spec.specificationVersion}"),
        "inputs": features(spec.description.input),
        "outputs": features(spec.description.output),
        "ops": {op: ops[op] for op in INTERESTING_OPS if ops[op]},
        "all_ops": dict(sorted(ops.items())),
    }


def _predict_parity(mlmodel, inputs, reference) -> tuple[float, float]:
    """Run a loaded Core ML model (macOS only) and compare with PyTorch outputs: (max abs err, min PSNR)."""
    outputs = mlmodel.predict(inputs)
    max_abs_err, psnr_db = 0.0, PSNR_CEILING_DB
    for name, ref in reference.items():
        out = np.asarray(outputs[name], dtype=np.float32).reshape(ref.shape)
        if not (np.isfinite(ref).all() and np.isfinite(out).all()):
            return float("nan"), float("nan")
        max_abs_err = max(max_abs_err, float(np.max(np.abs(ref - out), initial=0.0)))
        psnr_db = min(psnr_db, psnr(ref, out))
    return max_abs_err, psnr_db


def _check_arguments(
    pipe, components, compress_components, compute_precision, compression, attention, minimum_deployment_target
) -> tuple[tuple, tuple]:
    """Refuse bad arguments before anything is written; returns (components, compress_components) as tuples."""
    components = (components,) if isinstance(components, str) else tuple(components)
    compress_components = (compress_components,) if isinstance(compress_components, str) else tuple(compress_components)
    if not components or len(set(components)) != len(components) or set(components) - set(VALID_COMPONENTS):
        raise ValueError(
            f"components {list(components)}: each must be one of {list(VALID_COMPONENTS)}, at least one, no repeats"
        )
    if set(compress_components) - set(VALID_COMPONENTS):
        raise ValueError(
            f"compress_components {list(compress_components)}: each must be one of {list(VALID_COMPONENTS)}"
        )
    for knob, value, valid in (
        ("compute_precision", compute_precision, PRECISIONS),
        ("compression", compression, COMPRESSIONS),
        ("attention", attention, ATTENTIONS),
        ("minimum_deployment_target", minimum_deployment_target, DEPLOYMENT_TARGETS),
    ):
        if value not in valid:
            raise ValueError(f"{knob} {value!r}: must be one of {list(valid)}")
    require_pipeline(pipe)
    return components, compress_components


def _write_shared_files(pipe, out_dir: Path) -> tuple[dict[str, Any], list[int] | None]:
    """Write what the packages share: the CLIP tokenizer the Swift package reads and a k-step
    generator's onestep.json; returns (their rows of result["files"], the generator's timesteps or None)."""
    (out_dir / "reference").mkdir(parents=True, exist_ok=True)
    vocab, merges = pipe.tokenizer.save_vocabulary(str(out_dir))
    from export.onnx import copy_generator_schedule

    generator_schedule = copy_generator_schedule(pipe, out_dir)  # a k-step generator's onestep.json
    if Path(vocab).name != "vocab.json" or Path(merges).name != "merges.txt":
        raise CoreMLCheckError(f"the tokenizer wrote {vocab}, {merges}; the Swift package needs vocab.json, merges.txt")
    files = {
        "vocab": {"path": "vocab.json", "size_bytes": (out_dir / "vocab.json").stat().st_size},
        "merges": {"path": "merges.txt", "size_bytes": (out_dir / "merges.txt").stat().st_size},
    }
    return files, generator_schedule


def _convert_component(ct, pipe, name: str, inputs, precision: str, attention: str, target: str, phases_s):
    """Run the component's PyTorch module on `inputs` (the parity reference) and convert it; returns
    (mlmodel, PyTorch outputs as a tuple). Both happen in eval mode and, for the UNet with
    attention="split_einsum", with SplitEinsumAttnProcessor; the caller's module gets its mode and
    processors back afterwards, also on error."""
    convert, _, wrapper, attribute = CONVERTERS[name]
    torch_module = getattr(pipe, attribute)
    was_training = torch_module.training
    saved_processors = pipe.unet.attn_processors if name == "unet" and attention == "split_einsum" else None
    torch_module.eval()
    try:
        if saved_processors is not None:
            pipe.unet.set_attn_processor(SplitEinsumAttnProcessor())
        with torch.no_grad(), phase(name, "reference", phases_s):
            torch_out = wrapper(torch_module)(*(torch.from_numpy(v) for v in inputs.values()))
        torch_out = (torch_out,) if isinstance(torch_out, torch.Tensor) else torch_out
        mlmodel = convert(ct, pipe, inputs, precision, target, phases_s)
    finally:
        if saved_processors is not None:
            pipe.unet.set_attn_processor(saved_processors)
        torch_module.train(was_training)
    return mlmodel, torch_out


def _save_reference(path: Path, inputs, mlmodel, torch_out) -> dict[str, np.ndarray]:
    """Write the inputs and PyTorch fp32 outputs, under the package's output names, for parity checks
    on a Mac or a device later; returns the outputs by name."""
    output_names = [o.name for o in mlmodel.get_spec().description.output]
    reference = {o: t.detach().float().numpy() for o, t in zip(output_names, torch_out, strict=True)}
    np.savez(
        path,
        **{f"input:{k}": v for k, v in inputs.items()},
        **{f"output:{k}": v for k, v in reference.items()},
    )
    return reference


def _save_package(ct, mlmodel, package: Path, name: str, compression: str, phases_s) -> tuple[int, list]:
    """Save `mlmodel` as `package`, then overwrite it with the compressed model unless `compression`
    is "none". Returns the uncompressed weight file's size (the compressed one must be smaller) and
    the (model, is_compressed) pairs that macOS runs."""
    shutil.rmtree(package, ignore_errors=True)
    with phase(name, "save", phases_s):
        mlmodel.save(str(package))
    uncompressed_weights = _weights_bytes(package)
    checks = [(mlmodel, False)]
    if compression != "none":
        with phase(name, "compress", phases_s):
            compressed_model = _compress(ct, mlmodel, compression)
            shutil.rmtree(package)
            compressed_model.save(str(package))
        checks.append((compressed_model, True))
    return uncompressed_weights, checks


def _check_package(
    package: Path, spec, inputs, reference, target: str, compression: str, uncompressed_weights: int
) -> int:
    """CoreMLCheckError unless the saved package is an ML program of `target`'s spec version with the
    reference's inputs and outputs and, when compressed, compressed-weight ops and a weight file
    smaller than the uncompressed one. Returns the weight file's size."""
    expected_version = next(v for v, t in SPEC_VERSIONS.items() if t == target)
    problems = []
    if spec["model_type"] != "mlProgram":
        problems.append(f"model type {spec['model_type']}, not mlProgram")
    if spec["spec_version"] < expected_version:
        problems.append(f"spec version {spec['spec_version']} below {expected_version} ({target})")
    for given, side in ((inputs, "inputs"), (reference, "outputs")):
        for key, array in given.items():
            found = spec[side].get(key)
            if found is None or (found["shape"] and found["shape"] != list(array.shape)):
                problems.append(f"{side[:-1]} {key} {list(array.shape)}: package has {found}")
    weights = _weights_bytes(package)
    if compression != "none":
        if not any(op in spec["ops"] for op in COMPRESSED_WEIGHT_OPS[compression]):
            problems.append(f"no {' / '.join(COMPRESSED_WEIGHT_OPS[compression])} op after {compression}")
        if not weights < uncompressed_weights:
            problems.append(f"weights {weights} B after {compression}, not below {uncompressed_weights} B")
    if problems:
        raise CoreMLCheckError(f"{package.name}: " + "; ".join(problems))
    return weights


def _mac_parity(name: str, package: Path, checks, inputs, reference, tolerance: float) -> list[dict[str, Any]]:
    """Run each model (macOS only) against the PyTorch reference; returns the parity rows. Only the
    uncompressed model is held to `tolerance` and PSNR_FLOOR_DB (ParityError otherwise): data-free
    palettes below 6 bits are expected to lose accuracy, so a compressed model's numbers are recorded."""
    rows = []
    for model, is_compressed in checks:
        max_abs_err, psnr_db = _predict_parity(model, inputs, reference)
        enforced = not is_compressed
        rows.append(
            {
                "component": name,
                "format": "coreml",
                "compressed": is_compressed,
                "max_abs_err": max_abs_err,
                "psnr_db": psnr_db,
                "tolerance": tolerance,
                "enforced": enforced,
            }
        )
        logger.info("%s: max abs err %.3g, PSNR %.1f dB", package.name, max_abs_err, psnr_db)
        # written as `not <=` so that NaN fails too
        if enforced and not (max_abs_err <= tolerance and psnr_db >= PSNR_FLOOR_DB):
            raise ParityError(
                f"{name}: Core ML vs PyTorch max abs error {max_abs_err:.3g} (tolerance {tolerance:.3g}), "
                f"PSNR {psnr_db:.1f} dB (floor {PSNR_FLOOR_DB:.0f} dB)"
            )
    return rows


def _export_component(ct, pipe, name: str, out_dir: Path, result: dict[str, Any]) -> None:
    """Convert, save, check and (on macOS) run one component with the settings `result` records,
    compressed when it is in result["compressed_components"], and fill in its entries of `result`.
    Everything large it holds (PyTorch outputs, one or two ML programs) is freed when it returns."""
    precision, attention, target = result["precision"], result["attention"], result["minimum_deployment_target"]
    compression = result["compression"] if name in result["compressed_components"] else "none"
    package = out_dir / f"{PACKAGE_NAMES[name]}.mlpackage"
    inputs = CONVERTERS[name][1](pipe, np.random.default_rng(REFERENCE_SEED))
    start = time.perf_counter()
    phases_s: dict[str, float] = {}
    mlmodel, torch_out = _convert_component(ct, pipe, name, inputs, precision, attention, target, phases_s)
    reference = _save_reference(out_dir / "reference" / f"{PACKAGE_NAMES[name]}.npz", inputs, mlmodel, torch_out)
    uncompressed_weights, checks = _save_package(ct, mlmodel, package, name, compression, phases_s)
    export_s = time.perf_counter() - start

    with phase(name, "check", phases_s):
        spec = inspect_package(package)
    weights = _check_package(package, spec, inputs, reference, target, compression, uncompressed_weights)
    del spec["all_ops"]
    result["spec"][name] = spec
    result["files"][name] = {
        "path": package.name,
        "size_bytes": _folder_bytes(package),
        "weights_bytes": weights,
        "uncompressed_weights_bytes": uncompressed_weights,
        "export_s": round(export_s, 3),
        "phases_s": phases_s,  # reference, trace, convert, save, compress (when asked), check
    }
    logger.info(
        "%s: converted in %.1f s, weights %d B (uncompressed %d B)",
        package.name,
        export_s,
        weights,
        uncompressed_weights,
    )
    if sys.platform == "darwin":
        tolerance = DEFAULT_TOLERANCES[precision][name]
        result["parity"].extend(_mac_parity(name, package, checks, inputs, reference, tolerance))


def export_coreml(
    pipe,
    out_dir: Path,
    compute_precision: str = "fp16",
    compression: str = "none",
    attention: str = "original",
    minimum_deployment_target: str = "iOS17",
    components=DEFAULT_COMPONENTS,
    progress: bool = True,
    compress_components=("unet",),
) -> dict:
    """Write `pipe` (a diffusers StableDiffusionPipeline, fp32) to `out_dir` as Core ML ML programs.

    Layout, names and shapes: see the module docstring. Each component in `components` is traced
    (torch.jit.trace) on fixed random inputs, converted with `compute_precision` ("fp16" or
    "fp32") for `minimum_deployment_target` ("iOS17" or "iOS18"), and saved as
    `<Package>.mlpackage`; those inputs and the PyTorch fp32 outputs go to
    `reference/<Package>.npz`. `compression` ("none", "int8": per-channel linear_symmetric int8;
    "palettize4/6/8": k-means palettes) is applied after conversion to the components in
    `compress_components` (default the UNet, which holds most weights). `attention`:
    "original" converts diffusers' attention as it is; "split_einsum" converts with
    SplitEinsumAttnProcessor set on the UNet for the trace (the caller's UNet gets its own
    processors back afterwards).

    Every saved package is re-read and checked: it is an ML program of the asked spec version,
    with the expected inputs and outputs, and (when compressed) holds compressed-weight ops and a
    weight file smaller than the uncompressed one; otherwise CoreMLCheckError. On macOS each
    component is also run: the uncompressed model must match PyTorch within DEFAULT_TOLERANCES
    and PSNR_FLOOR_DB (ParityError otherwise); a compressed model's numbers are recorded with
    `"enforced": False`, since data-free palettes below 6 bits are expected to lose accuracy.

    Returns::

        {"files": {"unet": {"path": "Unet.mlpackage", "size_bytes": 1804372,
                            "weights_bytes": 1603000, "uncompressed_weights_bytes": 1603000,
                            "export_s": 8.0, "phases_s": {"reference": 0.4, "trace": 1.2,
                            "convert": 6.1, "save": 0.2, "check": 0.1}}, ...,
                   "vocab": {"path": "vocab.json", ...}, "merges": {"path": "merges.txt", ...}},
         "spec": {"unet": {"inputs": {"sample": {"shape": [2, 4, 64, 64], "dtype": "float32"}, ...},
                           "outputs": {"noise_pred": {...}}, "ops": {"constexpr_lut_to_dense": 47, ...},
                           "deployment_target": "iOS17", "spec_version": 8, "model_type": "mlProgram"}},
         "parity": [] off macOS, else [{"component", "format": "coreml", "compressed", "max_abs_err",
                    "psnr_db", "tolerance", "enforced"}, ...],
         "compression": "none", "compressed_components": ["unet"], "precision": "fp16",
         "attention": "original", "minimum_deployment_target": "iOS17",
         "decoder_scale_factor": 0.18215}

    Paths are relative to `out_dir`. `phases_s`: seconds per phase ("compress" only when asked);
    each phase is logged as it starts and ends, the progress display inside a long component
    (an SD-1.5 UNet converts for minutes; coremltools adds its own bars for the convert phase).
    Raises ValueError on bad arguments before anything is written.
    """
    components, compress_components = _check_arguments(
        pipe, components, compress_components, compute_precision, compression, attention, minimum_deployment_target
    )
    import coremltools as ct
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    files, generator_schedule = _write_shared_files(pipe, out_dir)
    result: dict[str, Any] = {
        "files": files,
        "spec": {},
        "parity": [],
        "compression": compression,
        "generator_schedule": generator_schedule,
        "compressed_components": [c for c in components if c in compress_components and compression != "none"],
        "precision": compute_precision,
        "attention": attention,
        "minimum_deployment_target": minimum_deployment_target,
        "decoder_scale_factor": float(pipe.vae.config.get("scaling_factor", 0.18215)),
    }
    bar = tqdm(components, desc="export coreml", unit="component", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        _export_component(ct, pipe, name, out_dir, result)
        gc.collect()
    return result
