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
    except ParityError as exc:
        raise GateError(str(exc)) from exc
    del pipe
    return Artifact(
        path=ctx.out_dir,
        kind="onnx",
        records={"opset": result["opset"], "generator_schedule": result["generator_schedule"]},
        metrics={
            "parity": [{**row, "reference": "torch"} for row in result["parity"]],
            "files": result["files"],
            "params": component_params(ctx.out_dir),
            "size_bytes": folder_size(ctx.out_dir),
        },
    )
