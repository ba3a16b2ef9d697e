"""Stage `export`: the pipeline's components to the target format, each behind a parity gate.

A component whose output differs from PyTorch by more than its tolerance fails the stage
(`export.validate.ParityError`, exit code 1); the measured errors go into the manifest.
"""

from __future__ import annotations

from toolchain.artifact import Artifact, folder_size
from toolchain.config import ExportConfig
from toolchain.models.io import load_pipeline


def run(source: Artifact, cfg: ExportConfig, ctx) -> Artifact:
    from export.onnx import export_onnx
    from export.validate import ParityError
    from toolchain.errors import GateError
    from toolchain.models.io import component_params

    pipe = load_pipeline(source.files)
    try:
        result = export_onnx(
            pipe,
            ctx.out_dir,
            opset=cfg.opset,
            components=tuple(cfg.components),
            tolerances=dict(cfg.tolerance) or None,
            progress=ctx.progress,
        )
        del pipe
        parity = [{**row, "reference": "torch"} for row in result["parity"]]
        records = {"opset": result["opset"], "generator_schedule": result["generator_schedule"]}
        # weights as exported: folding turns shape arithmetic into constants, which are no parameters
        metrics = {"parity": parity, "files": result["files"], "params": component_params(ctx.out_dir)}
        if cfg.fixed_shapes:
            _fix_shapes(ctx.out_dir, result["generator_schedule"] is not None, records, metrics, ctx.progress)
    except ParityError as exc:
        raise GateError(str(exc)) from exc
    metrics["size_bytes"] = folder_size(ctx.out_dir)
    return Artifact(path=ctx.out_dir, kind="onnx", records=records, metrics=metrics)


def _fix_shapes(out_dir, generator: bool, records: dict, metrics: dict, progress: bool) -> None:
    """The exported graphs fixed to the app's rows and folded (export/fixed_shapes.py), with their
    parity against the dynamic graphs and ONNX Runtime's usability figures for NNAPI and the Core ML EP."""
    from export.fixed_shapes import fix_folder
    from export.ort import mobile_usability

    fixed = fix_folder(out_dir, generator, progress=progress)
    records["fixed_shapes"] = {"batches": fixed["batches"], "inputs": fixed["inputs"]}
    metrics["parity"] += fixed["parity"]
    # NNAPI and the Core ML EP; the QNN EP's row compiles on the HTP (minutes for SD-1.5): the ort and
    # qnn stages give it for the graphs they deliver
    metrics["usability"] = [
        row for c in fixed["batches"] for row in mobile_usability(out_dir / c / "model.onnx", c, qnn=False)
    ]
    for component, info in metrics["files"].items():  # folding drops the shape arithmetic: sizes change
        info["size_bytes"] = sum(p.stat().st_size for p in (out_dir / component).glob("model.onnx*"))
