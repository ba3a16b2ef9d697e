"""Convert an exported ONNX folder to ORT format for ONNX Runtime Mobile (Android, iOS).

Output: the same layout as the ONNX folder with `<component>/model.ort` in place of
`model.onnx`, plus `required_operators.config` at the top, the operator list a reduced mobile
ONNX Runtime build needs (`build.py --include_ops_by_config`). Each `.ort` model is loaded and
checked against the ONNX model it came from on the same inputs.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import time
from pathlib import Path

logger = logging.getLogger(__name__)

OPS_CONFIG = "required_operators.config"
# An ORT-format model is one FlatBuffer, whose 32-bit offsets cap it at 2 GiB and which has no
# external data (onnxruntime issues 15756, 17151): an fp32 SD-1.5 UNet (3.4 GB) cannot be one.
ORT_FORMAT_MAX_BYTES = 2**31 - 1
# ORT format replays the same kernels after offline graph optimisation; fp32 reassociation in
# fused ops gives ~1e-6. Anything near 1e-4 means the conversion changed the computation.
DEFAULT_TOLERANCE = 1e-4


def convert_to_ort(
    onnx_dir: Path,
    out_dir: Path,
    optimization_style: str = "Fixed",
    tolerance: float = DEFAULT_TOLERANCE,
    progress: bool = True,
) -> dict:
    """Write ORT-format models of every `<component>/model.onnx` under `onnx_dir` into `out_dir`.

    optimization_style: "Fixed" (optimisations baked in for the CPU provider, smallest runtime
    work; what ONNX Runtime recommends for mobile) or "Runtime" (optimisations saved for replay
    with other providers such as NNAPI / Core ML EP).
    Returns {"parity": [{"component", "format": "ort", "reference": "onnx", "max_abs_err", "psnr_db",
    "tolerance"}],
    "files": {component: {"path", "size_bytes"}}, "operators_config": OPS_CONFIG}.
    Raises export.validate.ParityError when an .ort model differs from its ONNX source.
    """
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle
    from tqdm.auto import tqdm

    from export.layout import copy_pipeline_files
    from export.validate import ParityError

    styles = {s.name: s for s in OptimizationStyle}
    if optimization_style not in styles:
        raise ValueError(f"optimization_style {optimization_style!r}: choose one of {sorted(styles)}")
    components = sorted(p.parent.name for p in onnx_dir.glob("*/model.onnx"))
    if not components:
        raise ValueError(f"{onnx_dir}: no <component>/model.onnx to convert")
    _refuse_oversized(onnx_dir, components)
    # tokenizer, scheduler, configs, model_index.json
    copy_pipeline_files(onnx_dir, out_dir, ignore=shutil.ignore_patterns("model.onnx", "model.onnx_data"))
    _convert_quietly(onnx_dir, out_dir, styles[optimization_style], len(components))

    result = {"parity": [], "files": {}, "operators_config": OPS_CONFIG}
    for name in tqdm(components, desc="check ort", unit="component", disable=not progress):
        ort_path = out_dir / name / "model.ort"
        if not ort_path.is_file():
            raise RuntimeError(f"{name}: the converter wrote no {ort_path}")
        max_err, worst_psnr = _ort_parity(onnx_dir, name, ort_path)
        result["parity"].append(
            {
                "component": name,
                "format": "ort",
                "reference": "onnx",
                "max_abs_err": max_err,
                "psnr_db": worst_psnr,
                "tolerance": tolerance,
            }
        )
        result["files"][name] = {"path": f"{name}/model.ort", "size_bytes": ort_path.stat().st_size}
        result.setdefault("usability", []).extend(mobile_usability(onnx_dir / name / "model.onnx", name))
        if not max_err <= tolerance:
            raise ParityError(
                f"{name}: the ORT-format model differs from its ONNX source by max abs error "
                f"{max_err:.3g}, over the tolerance {tolerance:.3g}"
            )
    ops_config = out_dir / OPS_CONFIG
    if not ops_config.is_file():
        raise RuntimeError(f"the converter wrote no {OPS_CONFIG}")
    # the converter names the models by absolute path; the deliverable must not carry ours
    ops_config.write_text(ops_config.read_text().replace(f"{out_dir.resolve()}/", ""))
    return result


# ONNX Runtime Mobile's accelerators and the op lists its own usability checker reads for them
USABILITY_EPS = {"NNAPI": None, "CoreML (ML Program)": "coreml_supported_mlprogram_ops.md"}


def mobile_usability(model_path: Path, component: str) -> list[dict]:
    """ONNX Runtime's own check (`onnxruntime.tools.mobile_helpers.usability_checker`, what
    `check_onnx_model_mobile_usability` prints) of how a phone accelerator would take the graph as it
    is: partitions (each a hand-over between the accelerator and the CPU) and the share of nodes it
    takes, with the ops that block it and the nodes it refuses for a dynamic shape alone."""
    from onnxruntime.tools.mobile_helpers import usability_checker as checker

    model = checker.ModelProtoWithShapeInfo(Path(model_path)).model_with_shape_info
    rows = []
    for ep, ops_file in USABILITY_EPS.items():
        if ops_file is None:
            info = checker.check_nnapi_partitions(model, True)
        else:
            info = checker.check_coreml_partitions(model, True, ops_file)
        rows.append(
            {
                "component": component,
                "execution_provider": ep,
                "partitions": info.num_partitions,
                "nodes": info.num_nodes,
                "coverage": round(info.num_supported_nodes / max(info.num_nodes, 1), 4),
                "unsupported_ops": sorted(op.split(":")[-1] for op in info.unsupported_ops),
                "nodes_blocked_by_dynamic_shapes": info.nodes_unsupported_due_to_dynamic_input,
            }
        )
    return rows


def _refuse_oversized(onnx_dir: Path, components: list[str]) -> None:
    """ValueError, before anything is written, for a component too large for one ORT-format file."""
    sizes = {c: sum(p.stat().st_size for p in (onnx_dir / c).glob("model.onnx*")) for c in components}
    too_big = {c: size for c, size in sizes.items() if size > ORT_FORMAT_MAX_BYTES}
    if too_big:
        listed = ", ".join(f"{c} {size / 2**30:.2f} GiB" for c, size in too_big.items())
        raise ValueError(
            f"{listed}: an ORT-format model is a single file of at most 2 GiB (no external data); "
            "make it smaller first: quantize.enabled=true (int8) or quantize.fp16=true, or use --target onnx"
        )


def _convert_quietly(onnx_dir: Path, out_dir: Path, style, count: int) -> None:
    """ONNX Runtime's converter over the whole folder, its step-by-step prints sent to the debug log."""
    from onnxruntime.tools.convert_onnx_models_to_ort import convert_onnx_models_to_ort

    start = time.perf_counter()
    chatty = logging.getLogger("ort_format_model.utils")
    level = chatty.level
    chatty.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as log:  # the converter prints every step
            convert_onnx_models_to_ort(onnx_dir, output_dir=out_dir, optimization_styles=[style])
    finally:
        chatty.setLevel(level)
    logger.debug(log.getvalue())
    logger.info("converted %d models to ORT format in %.1f s", count, time.perf_counter() - start)
    for stray in out_dir.rglob("*.onnx"):  # optimised ONNX copies the converter may leave
        stray.unlink()


def _ort_parity(onnx_dir: Path, name: str, ort_path: Path) -> tuple[float, float]:
    """(max abs error, lowest PSNR) of the ORT-format model against its ONNX source, batch 2."""
    import numpy as np

    from export.validate import psnr
    from toolchain.runtime.ort import component_inputs

    onnx_out, ort_out = _run_both(onnx_dir / name / "model.onnx", ort_path, component_inputs(onnx_dir, name, batch=2))
    max_err = max(float(np.max(np.abs(a - b))) for a, b in zip(onnx_out, ort_out, strict=True))
    worst_psnr = min(psnr(a, b) for a, b in zip(onnx_out, ort_out, strict=True))
    return max_err, worst_psnr


def _run_both(onnx_path: Path, ort_path: Path, inputs: dict):
    """Outputs of the ONNX and the ORT-format model on the same inputs."""
    from toolchain.runtime.ort import ort_feed, ort_session

    outputs = []
    for path in (onnx_path, ort_path):
        session, _ = ort_session(path)
        outputs.append(session.run(None, ort_feed(session, inputs)))
        del session
    return outputs
