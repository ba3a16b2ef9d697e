"""Stage `coreml`: the PyTorch pipeline to Core ML ML programs (`--target coreml`).

Output: TextEncoder/Unet/VAEDecoder `.mlpackage`, `vocab.json`, `merges.txt` as Apple's
StableDiffusion Swift package expects, plus reference inputs/outputs for on-device checks. On
Linux the packages are checked by their spec (names, shapes, ML program, compressed-weight ops,
weight size); prediction parity needs macOS and is recorded there.
"""

from __future__ import annotations

import sys

from toolchain.artifact import Artifact, folder_size
from toolchain.config import CoreMLConfig
from toolchain.models.io import load_pipeline


def run(source: Artifact, cfg: CoreMLConfig, ctx) -> Artifact:
    from export.coreml import export_coreml
    from export.validate import ParityError
    from toolchain.errors import GateError

    pipe = load_pipeline(source.files)
    try:
        result = export_coreml(
            pipe,
            ctx.out_dir,
            compute_precision=cfg.precision,
            compression=cfg.compression,
            attention=cfg.attention,
            minimum_deployment_target=cfg.minimum_deployment_target,
            compress_components=tuple(cfg.compress_components),
            progress=ctx.progress,
        )
    except ParityError as exc:
        raise GateError(str(exc)) from exc
    del pipe
    params = source.metrics.get("params", {})
    return Artifact(
        path=ctx.out_dir,
        kind="coreml",
        records={
            k: result[k]
            for k in ("precision", "compression", "attention", "minimum_deployment_target", "decoder_scale_factor")
        },
        metrics={
            "files": result["files"],
            "spec": result["spec"],
            "parity": [{**row, "reference": "torch"} for row in result["parity"]],
            "prediction_checked": sys.platform == "darwin",
            # conversion keeps every weight of these components (the VAE encoder is not shipped)
            "params": {k: v for k, v in params.items() if k in ("text_encoder", "unet")},
            "size_bytes": folder_size(ctx.out_dir),
        },
    )
