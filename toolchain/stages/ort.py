"""Stage `ort`: the exported ONNX models to ORT format for ONNX Runtime Mobile (`--target ort`).

Output: `<component>/model.ort` in optimum's folder layout plus `required_operators.config`
for a reduced mobile build; every `.ort` model is checked against its ONNX source.
"""

from __future__ import annotations

from toolchain.artifact import Artifact, folder_size


def run(source: Artifact, optimization_style: str, ctx) -> Artifact:
    from export.ort import convert_to_ort
    from export.validate import ParityError
    from toolchain.errors import GateError

    try:
        result = convert_to_ort(source.files, ctx.out_dir, optimization_style=optimization_style, progress=ctx.progress)
    except ParityError as exc:
        raise GateError(str(exc)) from exc
    return Artifact(
        path=ctx.out_dir,
        kind="ort",
        records={"optimization_style": optimization_style, "operators_config": result["operators_config"]},
        metrics={
            "parity": result["parity"],
            "usability": result["usability"],
            "files": result["files"],
            "params": dict(source.metrics.get("params", {})),  # conversion keeps every weight
            "size_bytes": folder_size(ctx.out_dir),
        },
    )
