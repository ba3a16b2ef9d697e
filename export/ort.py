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
    "tolerance"}], "files": {component: {"path", "size_bytes"}}, "operators_config": OPS_CONFIG,
    "usability": `mobile_usability` rows of the graph each .ort holds (the converter's optimised ONNX)}.
    Either style's files are named `<component>/model.ort` and `required_operators.config`.
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

    result = {"parity": [], "files": {}, "operators_config": OPS_CONFIG, "usability": []}
    for name in tqdm(components, desc="check ort", unit="component", disable=not progress):
        ort_path = _one_file(out_dir / name, "model*.ort", "model.ort")
        # the graph the .ort file holds, as the converter optimised it: what a phone provider is offered
        optimized = _one_file(out_dir / name, "model*.optimized.onnx", "model.optimized.onnx")
        result["usability"].extend(mobile_usability(optimized, name))
        optimized.unlink()
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
        if not max_err <= tolerance:
            raise ParityError(
                f"{name}: the ORT-format model differs from its ONNX source by max abs error "
                f"{max_err:.3g}, over the tolerance {tolerance:.3g}"
            )
    ops_config = _one_file(out_dir, "required_operators*.config", OPS_CONFIG)
    # the converter names the models by absolute path; the deliverable must not carry ours
    ops_config.write_text(ops_config.read_text().replace(f"{out_dir.resolve()}/", ""))
    return result


# ONNX Runtime Mobile's accelerators and the op lists its own usability checker reads for them
USABILITY_EPS = {"NNAPI": None, "CoreML (ML Program)": "coreml_supported_mlprogram_ops.md"}


def mobile_usability(model_path: Path, component: str, qnn: bool = True) -> list[dict]:
    """ONNX Runtime's own check (`onnxruntime.tools.mobile_helpers.usability_checker`, what
    `check_onnx_model_mobile_usability` prints) of how a phone accelerator would take the graph as it
    is: partitions (each a hand-over between the accelerator and the CPU) and the share of nodes it
    takes, with the ops that block it and the nodes it refuses for a dynamic shape alone. The checker
    counts an absent optional input ("", Resize's roi) as a dynamic shape, which the providers' own
    `IsInputSupported` accepts; where that blocks nodes, `*_absent_inputs_accepted` gives the figures
    under the providers' rule. The QNN row is the session's own assignment (`qnn_usability`)."""
    import onnx

    # shapes inferred from the graph alone: its weights may be past protobuf's 2 GiB (SD-1.5 fp32)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path), load_external_data=False), strict_mode=True)
    absent = _absent_optional_only(model)
    accepting = None
    if absent:
        accepting = onnx.ModelProto()
        accepting.CopyFrom(model)
        accepting.graph.value_info.append(onnx.helper.make_tensor_value_info("", onnx.TensorProto.FLOAT, []))
    rows = []
    for ep, ops_file in USABILITY_EPS.items():
        info = _partitions(model, ops_file)
        row = {
            "component": component,
            "execution_provider": ep,
            "partitions": info.num_partitions,
            "nodes": info.num_nodes,
            "coverage": round(info.num_supported_nodes / max(info.num_nodes, 1), 4),
            "unsupported_ops": sorted(op.removeprefix("ai.onnx:") for op in info.unsupported_ops),
            "nodes_blocked_by_dynamic_shapes": info.nodes_unsupported_due_to_dynamic_input,
            "of_which_absent_optional_input": absent,
        }
        if accepting is not None:
            accepted = _partitions(accepting, ops_file)
            row["partitions_absent_inputs_accepted"] = accepted.num_partitions
            row["coverage_absent_inputs_accepted"] = round(accepted.num_supported_nodes / max(accepted.num_nodes, 1), 4)
        rows.append(row)
    if qnn:  # compiles the graph on the HTP backend: minutes for an SD-1.5 UNet
        rows.append(qnn_usability(model_path, component))
    return rows


def _partitions(model, ops_file: str | None):
    from onnxruntime.tools.mobile_helpers import usability_checker as checker

    if ops_file is None:
        return checker.check_nnapi_partitions(model, True)
    return checker.check_coreml_partitions(model, True, ops_file)


def _absent_optional_only(model) -> int:
    """Nodes with an absent optional input ("") and every present input of a fixed shape."""
    from onnxruntime.tools.onnx_model_utils import is_fixed_size_tensor

    graph = model.graph
    values = {v.name: v for v in [*graph.value_info, *graph.input, *graph.output]}
    constants = {t.name for t in graph.initializer}

    def fixed(name: str) -> bool:
        return is_fixed_size_tensor(values[name]) if name in values else name in constants

    return sum(1 for n in graph.node if "" in n.input and all(fixed(i) for i in n.input if i))


def qnn_usability(model_path: Path, component: str, soc: str = "SM8750") -> dict:
    """How ONNX Runtime's QNN EP (HTP backend, fp16 for float graphs, CPU fallback allowed) partitions
    the graph, read from the session's own node assignment, not estimated. Without onnxruntime-qnn
    the row says so instead of guessing."""
    import onnxruntime as ort

    from toolchain.runtime.qnn import EP_NAME, QnnUnavailable, provider_options, qnn_device

    row = {"component": component, "execution_provider": "QNN (HTP)"}
    try:
        device = qnn_device()
    except QnnUnavailable as exc:
        return {**row, "error": str(exc)}
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    options.add_provider_for_devices([device], provider_options(soc, fp16=True))
    subgraphs = ort.InferenceSession(str(model_path), sess_options=options).get_provider_graph_assignment_info()
    nodes = {sg.ep_name: 0 for sg in subgraphs}
    for sg in subgraphs:
        nodes[sg.ep_name] += len(sg.get_nodes())
    taken = [sg for sg in subgraphs if sg.ep_name == EP_NAME]
    refused = {f"{n.domain}:{n.op_type}" if n.domain else n.op_type for sg in subgraphs if sg.ep_name != EP_NAME
               for n in sg.get_nodes()}  # fmt: skip
    return {
        **row,
        "partitions": len(taken),
        "nodes": sum(nodes.values()),
        "coverage": round(nodes.get(EP_NAME, 0) / max(sum(nodes.values()), 1), 4),
        "unsupported_ops": sorted(refused),
        "soc": soc,
    }


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


def _one_file(folder: Path, pattern: str, name: str) -> Path:
    """The converter's one output matching `pattern` in `folder`, renamed to `name` (its "Runtime"
    style names files `*.with_runtime_opt.*`; the layout keeps one name whatever the style)."""
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise RuntimeError(f"{folder}: the converter wrote {len(found)} files matching {pattern}, expected one")
    return found[0].rename(folder / name)


def _convert_quietly(onnx_dir: Path, out_dir: Path, style, count: int) -> None:
    """ONNX Runtime's converter over the whole folder, its step-by-step prints sent to the debug log."""
    from onnxruntime.tools.convert_onnx_models_to_ort import convert_onnx_models_to_ort

    start = time.perf_counter()
    chatty = logging.getLogger("ort_format_model.utils")
    level = chatty.level
    chatty.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as log:  # the converter prints every step
            convert_onnx_models_to_ort(
                onnx_dir, output_dir=out_dir, optimization_styles=[style], save_optimized_onnx_model=True
            )
    finally:
        chatty.setLevel(level)
    logger.debug(log.getvalue())
    logger.info("converted %d models to ORT format in %.1f s", count, time.perf_counter() - start)


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
