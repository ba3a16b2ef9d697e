"""Stage `qnn`: the exported ONNX models made ready for Qualcomm's NPU (`--target qnn`).

Input: the sealed `export` artifact. Output: fixed-shape graphs for ONNX Runtime's QNN execution
provider and context binaries for `qnn.soc` (`export.qnn`), every component checked on the HTP
backend against fp32 and, for a guided UNet, its guidance signal through the HTP against the fp32
model's (`export.guidance`). Calibration and held-out feeds are the quantize stage's: the recipe's
own prompts, another seed for the held-out trajectory.
"""

from __future__ import annotations

from toolchain.artifact import Artifact, folder_size
from toolchain.config import QnnSettings
from toolchain.errors import GateError


def run(source: Artifact, settings: QnnSettings, ctx) -> Artifact:
    from export.ort import mobile_usability
    from export.qnn import prepare_qnn_folder
    from export.quantize import collect_unet_calibration
    from export.validate import ParityError
    from toolchain.runtime.schedule import read_schedule
    from toolchain.stages.quantize import calibration_prompts, held_out_feeds

    cfg, calib = settings.qnn, settings.quantize
    src, generator = source.files, read_schedule(source.files) is not None
    prompts = calibration_prompts(calib, list(settings.erase))
    feeds = None
    if cfg.precision != "fp16":
        feeds = collect_unet_calibration(
            src, prompts, calib.calibration_steps, calib.calibration_guidance_scale, calib.calibration_seed,
            n=calib.calibration_feeds,
        )  # fmt: skip
    held_out = held_out_feeds(src, prompts, calib)
    try:
        result = prepare_qnn_folder(
            src, ctx.out_dir, cfg.precision, feeds, held_out[len(held_out) // 2], cfg.soc, cfg.context_binaries,
            generator, prompt=next((p for p in prompts if p), "a photo"), psnr_floors_db=cfg.psnr_floor_db,
            progress=ctx.progress,
        )  # fmt: skip
        guidance = [] if generator else [_guidance_gate(src, ctx.out_dir, held_out, result["qnn"], calib)]
        usability = [row for c in result["files"] for row in mobile_usability(ctx.out_dir / c / "model.onnx", c)]
    except ParityError as exc:
        raise GateError(str(exc)) from exc
    return Artifact(
        path=ctx.out_dir,
        kind="qnn",
        records={**result["qnn"], "htp_images": cfg.htp_images},
        metrics={
            "parity": result["parity"],
            "guidance": guidance,
            "usability": usability,  # the same fixed-shape graphs as NNAPI / the Core ML EP would take them
            "files": result["files"],
            "params": dict(source.metrics.get("params", {})),
            "size_bytes": folder_size(ctx.out_dir),
        },
    )


def _guidance_gate(src, out_dir, feeds: list, record: dict, calib) -> dict:
    """The UNet on the HTP backend: its guidance signal against the fp32 UNet's on the held-out
    feeds, one guided pair per call (its fixed batch)."""
    from export.guidance import check_guidance, guidance_fidelity, onnx_unet_fn
    from export.qnn import htp_unet_fn
    from toolchain.runtime.ort import read_config

    fp16 = "unet" in record["fp16_components"]
    entry = guidance_fidelity(
        onnx_unet_fn(src / "unet" / "model.onnx"),
        htp_unet_fn(out_dir / "unet" / "model.onnx", record["soc"], fp16),
        feeds,
        num_train_timesteps=read_config(src, "scheduler").get("num_train_timesteps", 1000),
        cosine_floor=calib.guidance_cosine_floor,
        norm_ratio_range=tuple(calib.guidance_norm_ratio),
    )
    label = f"qnn-{'fp16' if fp16 else record['precision']}"
    row = {"component": "unet", "format": label, "reference": "onnx-fp32", "runtime": "QNN HTP (simulator on x86)"}
    row.update(entry)
    check_guidance(
        row,
        label=f"{label} on the HTP backend",
        hint="qnn.precision=fp16 keeps it on the digits UNet (cosine 0.999; W8A16 0.01)",
    )
    return row
