"""QNN-ready models for Qualcomm's NPU (Hexagon HTP), run here through the HTP backend itself.

    result = prepare_qnn_folder(onnx_dir, out_dir, precision="w8a16", calibration=feeds, soc="SM8750")

From an fp32 ONNX folder (optimum's layout) to the same layout for ONNX Runtime's QNN execution
provider, what an Android app with `onnxruntime-qnn` loads:
- every graph through `qnn_preprocess_model` (Erf-GELU fused to the Gelu the HTP has) and with
  fixed shapes: the HTP compiles one graph per shape; unquantized graphs then have their shape
  arithmetic folded to constants (ONNX Runtime's basic optimisations). Batches: the UNet 2 per image with guidance
  (1 for a k-step generator), the text encoder the same, the VAE decoder 1.
- the UNet quantized to QNN's QDQ form (`get_qnn_qdq_config`): W8A16 by default (uint16
  activations, uint8 per-channel weights), W8A8, or left fp32 and run at the HTP's fp16
  precision (it has no fp32); calibrated on the pipeline's own trajectories. The text encoder and
  VAE decoder run at fp16 (digits model on the HTP: 33.5 and 72.2 dB against fp32; the UNet at
  fp16 78.8 dB, at W8A16 24 dB: benchmarks/results/phone-runtimes.md).
- `<component>/model_ctx.onnx` + `<component>/model_ctx_qnn.bin`: the graph compiled for `soc`
  (an EPContext model), which the app loads without compiling on the phone.

Every component is run on the HTP backend with CPU fallback disabled and compared with the fp32
ONNX model on the CPU (max abs error, PSNR, held to a floor); the UNet also with its own QDQ graph
on the CPU provider (simulated quantization), which is how the bulk of the benchmark's images are
drawn: `htp_vs_cpu_psnr_db` says how far that stand-in is from the NPU's numerics.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

PRECISIONS = ("w8a16", "w8a8", "fp16")
CONTEXT_SUFFIX = "_ctx"
# PSNR floors against fp32: 8-bit activations as ORT int8 (export.quantize.INT8_PSNR_FLOOR_DB);
# 16-bit activations and the HTP's fp16 (it has no fp32) sit higher. Digits model, measured: the
# text encoder at fp16 34.5 dB on a prompt's tokens, the UNet at W8A16 57 dB.
PSNR_FLOORS_DB = {"w8a16": 30.0, "w8a8": 20.0, "fp16": 30.0}


def prepare_qnn_folder(
    onnx_dir: Path,
    out_dir: Path,
    precision: str = "w8a16",
    calibration: list[dict[str, np.ndarray]] | None = None,
    parity_feed: dict[str, np.ndarray] | None = None,
    soc: str = "SM8750",
    context_binaries: bool = True,
    generator: bool = False,
    prompt: str = "a photo",
    psnr_floors_db: dict[str, float] | None = None,
    progress: bool = True,
) -> dict:
    """Write the QNN folder; returns {"parity": [...], "files": {...}, "qnn": {...}}.

    calibration: UNet feeds of the pipeline's own trajectories (`export.quantize.collect_unet_calibration`);
    needed for w8a16 / w8a8. parity_feed: a UNet feed the calibration did not see (else random);
    `prompt`: the text encoder's parity input (tokens of a real prompt: random ids are no text);
    psnr_floors_db: per precision ("w8a16", "w8a8", "fp16"), default PSNR_FLOORS_DB.
    Raises ValueError on bad arguments before anything is written, QnnUnavailable without the
    runtime, and export.validate.ParityError for a component below its floor.
    """
    from tqdm.auto import tqdm

    from export.layout import copy_pipeline_files, deploy_batches
    from export.validate import check_psnr_floor
    from toolchain.runtime.qnn import SOCS, qnn_device

    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    _check_arguments(onnx_dir, precision, calibration, soc, SOCS)
    qnn_device()  # a missing runtime fails before anything is written
    copy_pipeline_files(onnx_dir, out_dir, ignore=shutil.ignore_patterns("model.onnx", "model.onnx_data"))
    batches, fp16 = deploy_batches(generator), {"text_encoder", "vae_decoder"}
    if precision == "fp16":
        fp16.add("unet")
    result = {"parity": [], "files": {}, "qnn": _record(precision, soc, sorted(fp16), batches, context_binaries)}
    for name in tqdm(("text_encoder", "unet", "vae_decoder"), desc="qnn", unit="component", disable=not progress):
        start = time.perf_counter()
        inputs = _parity_inputs(onnx_dir, name, batches[name], parity_feed, prompt)
        target = out_dir / name / "model.onnx"
        _write_graph(
            onnx_dir / name / "model.onnx", target, inputs, calibration if name not in fp16 else None, precision
        )
        entry = _htp_parity(onnx_dir / name / "model.onnx", target, name, inputs, soc, name in fp16, precision)
        entry["psnr_floor_db"] = {**PSNR_FLOORS_DB, **(psnr_floors_db or {})}["fp16" if name in fp16 else precision]
        files = {"path": f"{name}/model.onnx", "size_bytes": _bytes(target.parent, "model.onnx*")}
        if context_binaries:
            files.update(_context_binary(target, soc, name in fp16))
        files["prepare_s"] = round(time.perf_counter() - start, 3)
        result["parity"].append(entry)
        result["files"][name] = files
        check_psnr_floor(
            entry, "on the QNN HTP backend vs fp32 ONNX", "qnn.precision=fp16 keeps the UNet closest on the HTP"
        )
    return result


def _record(precision: str, soc: str, fp16: list[str], batches: dict, context_binaries: bool) -> dict:
    from toolchain.runtime.qnn import SOCS

    return {
        "precision": precision,
        "soc": soc,
        **SOCS[soc],
        "fp16_components": fp16,
        "batches": batches,
        "context_binaries": context_binaries,
        "onnxruntime": version("onnxruntime"),
        "onnxruntime_qnn": version("onnxruntime-qnn"),
    }


def _check_arguments(onnx_dir: Path, precision: str, calibration, soc: str, socs: dict) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {list(PRECISIONS)}")
    if soc not in socs:
        raise ValueError(f"SoC {soc!r}: choose one of {sorted(socs)}")
    if precision != "fp16" and not calibration:
        raise ValueError(f"precision {precision!r} quantizes the UNet: pass its calibration feeds")
    missing = [c for c in ("text_encoder", "unet", "vae_decoder") if not (onnx_dir / c / "model.onnx").is_file()]
    if missing:
        raise ValueError(f"{onnx_dir}: no {[f'{c}/model.onnx' for c in missing]}; export those components first")


def _parity_inputs(onnx_dir: Path, name: str, batch: int, parity_feed, prompt: str) -> dict[str, np.ndarray]:
    """The component's inputs at its deploy batch: the held-out UNet feed's first guided pair, the
    tokens of ("", prompt) for the text encoder (of prompt alone for a generator)."""
    from transformers import CLIPTokenizer

    from export.layout import guided_pairs
    from toolchain.runtime.ort import component_inputs

    if name == "unet" and parity_feed is not None:
        return guided_pairs(parity_feed, batch)[0]
    if name == "text_encoder":
        tokenizer = CLIPTokenizer.from_pretrained(str(onnx_dir / "tokenizer"))
        length = component_inputs(onnx_dir, name, batch=1)["input_ids"].shape[1]
        texts = ["", prompt][-batch:]
        ids = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="np")
        return {"input_ids": ids.input_ids.astype(np.int64)}
    inputs = component_inputs(onnx_dir, name, batch=2 * batch if name == "vae_decoder" else batch)
    if name == "unet":
        inputs["timestep"] = np.array(500.0, np.float32)
    return inputs


def htp_unet_fn(path: Path, soc: str = "SM8750", fp16: bool = False):
    """The fixed-shape UNet at `path` on the HTP backend as a function of a guided feed of any
    number of prompts (N unconditional rows, then N conditional): one guided pair per call, the
    outputs back in the feed's order (what `export.guidance.guidance_fidelity` compares)."""
    from export.layout import pairwise_unet_fn
    from toolchain.runtime.qnn import htp_session

    return pairwise_unet_fn(htp_session(path, soc, fp16=fp16))


def _write_graph(src: Path, target: Path, inputs: dict, calibration, precision: str) -> None:
    """`src` preprocessed for QNN, QDQ-quantized when `calibration` is given, shapes fixed to `inputs`;
    weights past protobuf's 2 GiB (an fp32 SD-1.5 UNet) stay in `model.onnx_data`."""
    import onnx
    from onnxruntime.quantization.execution_providers.qnn import qnn_preprocess_model

    from export.fixed_shapes import EXTERNAL_DATA_NAME, fix_graph, fix_shapes

    target.parent.mkdir(parents=True, exist_ok=True)
    external = (src.parent / EXTERNAL_DATA_NAME).is_file()
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".qnn-") as scratch:
        graph = Path(scratch) / "pre" / "model.onnx"
        graph.parent.mkdir()
        if not qnn_preprocess_model(str(src), str(graph), save_as_external_data=external,
                                    all_tensors_to_one_file=True, external_data_location=EXTERNAL_DATA_NAME):  # fmt: skip
            graph = src
        if not calibration:  # a float graph: its shape arithmetic folded too, which the HTP then needs not run
            fix_graph(graph, target.parent, inputs, rewrite_expand=False)
            return
        quantized = _quantize_qdq(graph, Path(scratch) / "qdq.onnx", calibration, precision)
        model = onnx.load(str(quantized))
        fix_shapes(model, inputs)
        onnx.save(model, str(target))  # a QDQ graph as quantized: ONNX Runtime's folding would dequantize its weights


def _quantize_qdq(graph: Path, target: Path, calibration, precision: str) -> Path:
    """QNN's QDQ form of `graph` (`get_qnn_qdq_config`): uint8 per-channel weights, uint16 (w8a16)
    or uint8 activations, calibrated on `calibration`."""
    from onnxruntime.quantization import QuantType, quantize_static
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    from export.quantize import _FeedReader

    activations = QuantType.QUInt16 if precision == "w8a16" else QuantType.QUInt8
    config = get_qnn_qdq_config(
        str(graph), _FeedReader(calibration), activation_type=activations, weight_type=QuantType.QUInt8,
        per_channel=True,
    )  # fmt: skip
    quantize_static(str(graph), str(target), **_static_kwargs(config))
    return target


def _static_kwargs(config) -> dict:
    """A StaticQuantConfig as quantize_static's keyword arguments."""
    import inspect

    from onnxruntime.quantization import quantize_static

    accepted = set(inspect.signature(quantize_static).parameters) - {"model_input", "model_output"}
    return {k: v for k, v in vars(config).items() if k in accepted}


def _htp_parity(reference: Path, target: Path, name: str, inputs: dict, soc: str, fp16: bool, precision: str) -> dict:
    """The component on the HTP backend against the fp32 graph on the CPU; the UNet also against its
    own QDQ graph on the CPU (the stand-in the benchmark draws most images with)."""
    from export.validate import psnr
    from toolchain.runtime.ort import ort_session
    from toolchain.runtime.qnn import htp_session

    start = time.perf_counter()
    session = htp_session(target, soc, fp16=fp16)
    open_s = time.perf_counter() - start
    start = time.perf_counter()
    htp = _run(session, inputs)
    call_ms = (time.perf_counter() - start) * 1000.0
    cpu, _ = ort_session(reference)
    ref = _run(cpu, inputs)
    err = float(np.max(np.abs(ref - htp))) if np.isfinite(htp).all() else float("nan")
    entry = {
        "component": name,
        "format": f"qnn-{'fp16' if fp16 else precision}",
        "reference": "onnx-fp32",
        "runtime": "QNN HTP (simulator on x86)",
        "max_abs_err": err,
        "psnr_db": psnr(ref, htp) if np.isfinite(err) else float("nan"),
        "htp_open_s": round(open_s, 3),
        "htp_call_ms": round(call_ms, 3),
    }
    if not fp16:
        qdq, _ = ort_session(target)
        entry["htp_vs_cpu_psnr_db"] = psnr(_run(qdq, inputs), htp)
    return entry


def _run(session, inputs: dict) -> np.ndarray:
    from toolchain.runtime.ort import ort_feed

    return np.asarray(session.run(None, ort_feed(session, inputs))[0], dtype=np.float32)


def _context_binary(target: Path, soc: str, fp16: bool) -> dict:
    """Compile `target` for `soc` into an EPContext model beside it; returns its files' row."""
    from toolchain.runtime.qnn import htp_session

    context = target.with_name(f"model{CONTEXT_SUFFIX}.onnx")
    start = time.perf_counter()
    htp_session(target, soc, fp16=fp16, context_file=context)
    if not context.is_file():
        raise RuntimeError(f"{target}: the QNN execution provider wrote no context model")
    return {
        "context_path": f"{target.parent.name}/{context.name}",
        "context_bytes": _bytes(target.parent, f"model{CONTEXT_SUFFIX}*"),
        "context_s": round(time.perf_counter() - start, 3),
    }


def _bytes(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern) if p.is_file())
