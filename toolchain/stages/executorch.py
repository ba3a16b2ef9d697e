"""Stage `executorch`: the PyTorch pipeline to ExecuTorch programs with the XNNPACK delegate
(`--target executorch`).

Input: the last PyTorch artifact (ExecuTorch lowers from PyTorch, as Core ML converts from it).
Output: one `.pte` per component, tokenizer, scheduler config and a generator's schedule
(`export.executorch`), every program run through ExecuTorch's runtime against PyTorch fp32 and,
for a guided UNet, its guidance signal against the fp32 UNet's (`export.guidance`). Calibration and
held-out feeds are the quantize stage's prompts and seeds, drawn by the PyTorch pipeline.
"""

from __future__ import annotations

from toolchain.artifact import Artifact, folder_size
from toolchain.config import ExecuTorchSettings
from toolchain.errors import GateError
from toolchain.models.io import load_pipeline


def run(source: Artifact, settings: ExecuTorchSettings, ctx) -> Artifact:
    from export.executorch import collect_torch_feeds, export_executorch
    from export.validate import ParityError
    from toolchain.runtime.schedule import read_schedule
    from toolchain.stages.quantize import calibration_prompts, held_out_feeds

    cfg, calib = settings.executorch, settings.quantize
    pipe, generator = load_pipeline(source.files), read_schedule(source.files) is not None
    prompts = calibration_prompts(calib, list(settings.erase))

    def collect(_src, texts, steps, guidance_scale, seed, n):
        return collect_torch_feeds(pipe, texts, steps, guidance_scale, seed, n)

    feeds = None
    if cfg.precision == "int8":
        feeds = collect(None, prompts, calib.calibration_steps, calib.calibration_guidance_scale,
                        calib.calibration_seed, calib.calibration_feeds)  # fmt: skip
    held_out = held_out_feeds(source.files, prompts, calib, collect=collect)
    try:
        result = export_executorch(
            pipe, ctx.out_dir, cfg.precision, feeds, held_out[len(held_out) // 2], generator,
            prompt=next((p for p in prompts if p), "a photo"), psnr_floors_db=cfg.psnr_floor_db,
            progress=ctx.progress,
        )  # fmt: skip
        guidance = [] if generator else [_guidance_gate(pipe, ctx.out_dir, held_out, cfg.precision, calib)]
    except ParityError as exc:
        raise GateError(str(exc)) from exc
    return Artifact(
        path=ctx.out_dir,
        kind="executorch",
        records=result["executorch"],
        metrics={
            "parity": result["parity"],
            "guidance": guidance,
            "files": result["files"],
            "params": dict(source.metrics.get("params", {})),
            "size_bytes": folder_size(ctx.out_dir),
        },
    )


def _guidance_gate(pipe, out_dir, feeds: list, precision: str, calib) -> dict:
    """The UNet program through ExecuTorch: its guidance signal against the PyTorch fp32 UNet's on the
    held-out feeds, one guided pair per call (its fixed batch)."""
    from export.executorch import executorch_unet_fn, torch_unet_fn
    from export.guidance import check_guidance, guidance_fidelity
    from toolchain.runtime.executorch import PROVIDER

    entry = guidance_fidelity(
        torch_unet_fn(pipe),
        executorch_unet_fn(out_dir / "unet" / "model.pte"),
        feeds,
        num_train_timesteps=pipe.scheduler.config.get("num_train_timesteps", 1000),
        cosine_floor=calib.guidance_cosine_floor,
        norm_ratio_range=tuple(calib.guidance_norm_ratio),
    )
    label = f"executorch-{precision}"
    row = {"component": "unet", "format": label, "reference": "torch-fp32", "runtime": PROVIDER, **entry}
    check_guidance(row, label=label, hint="executorch.precision=fp32 keeps it")
    return row
