"""Stage `quantize`: int8 and/or fp16 versions of the exported ONNX models, each behind a parity gate.

Input: the sealed `export` artifact (an optimum-layout ONNX folder). Output, in this stage's own
folder: the same layout with `cfg.components` int8 (ONNX Runtime quantization, gated by a PSNR
floor against the fp32 ONNX component) and, with `cfg.fp16`, the other components fp16 (gated by
`export.onnx_fp16`'s tolerance). Static int8 is calibrated on UNet inputs recorded while the fp32
ONNX pipeline draws the recipe's own prompts (its concepts' prompts, else `calibration_text`), and
gated on a feed from another seed's trajectory, which the calibration did not see. A UNet made int8
or fp16 also passes the guidance gate (`export.guidance`) on that trajectory's feeds: its
eps(x, c) - eps(x, ∅) against the fp32 model's, per timestep band.
"""

from __future__ import annotations

import shutil

from toolchain.artifact import Artifact, folder_size
from toolchain.config import QuantizeConfig, QuantizeSettings
from toolchain.errors import GateError

PARITY_PROMPTS = 2  # prompts of the held-out parity trajectory (a UNet feed of batch 4)
# Feeds kept from that trajectory for the guidance gate, evenly spaced over its steps: at 25 steps
# steps 0, 4, ..., 24, so every timestep band has two; the middle one (step 12) is the parity feed.
GUIDANCE_FEEDS = 7
# An empty prompt has no guidance signal; a recipe with no concept and no calibration_text is
# checked on these (any text conditions the UNet).
GUIDANCE_TEXT = ("a photo", "a drawing")


def run(source: Artifact, settings: QuantizeSettings, ctx) -> Artifact:
    from export.validate import ParityError

    cfg = settings.quantize
    if not (cfg.enabled or cfg.fp16):
        raise ValueError("stage quantize runs only with quantize.enabled=true or quantize.fp16=true")
    src = source.files
    exported = sorted(p.parent.name for p in src.glob("*/model.onnx"))
    int8 = _int8_components(cfg, exported)
    records = {"int8": {}, "fp16_components": []}
    metrics = {"parity": [], "files": {}, "guidance": []}
    unet_format = "onnx-int8" if "unet" in int8 else "onnx-fp16" if cfg.fp16 else None
    prompts = calibration_prompts(cfg, list(settings.erase))
    held_out = held_out_feeds(src, prompts, cfg) if unet_format else []
    try:
        if cfg.fp16:  # first, so the int8 files copied over it below are the last word
            records["fp16_components"] = _convert_fp16(src, [c for c in exported if c not in int8], metrics, ctx)
        if int8:
            records["int8"] = _quantize_int8(src, int8, settings, records["fp16_components"], held_out, metrics, ctx)
        if unet_format:
            metrics["guidance"].append(_guidance_gate(src, ctx.out_dir, unet_format, held_out, cfg))
    except ParityError as exc:
        raise GateError(str(exc)) from exc
    for name in exported:  # components neither quantized nor converted stay as exported
        metrics["files"].setdefault(
            name,
            {"path": f"{name}/model.onnx", "size_bytes": folder_size(ctx.out_dir / name), "precision": "fp32"},
        )
    return Artifact(
        path=ctx.out_dir,
        kind="onnx",
        records=records,
        metrics={**metrics, "params": dict(source.metrics.get("params", {})), "size_bytes": folder_size(ctx.out_dir)},
    )


def _int8_components(cfg: QuantizeConfig, exported: list[str]) -> list[str]:
    """The components to quantize to int8 ([] unless quantize.enabled); all must have been exported."""
    missing = sorted(set(cfg.components) - set(exported)) if cfg.enabled else []
    if missing:
        raise GateError(
            f"quantize.components {missing} were not exported (exported: {exported}); "
            "add them to export.components or drop them from quantize.components"
        )
    return list(cfg.components) if cfg.enabled else []


def _convert_fp16(src, components: list[str], metrics: dict, ctx) -> list[str]:
    """Write `components` fp16 into the stage folder, each behind its parity gate; adds their
    parity and files to `metrics` and returns the components converted."""
    from export.onnx_fp16 import convert_onnx_folder_fp16

    if not components:
        return []
    result = convert_onnx_folder_fp16(src, ctx.out_dir, components=components, progress=ctx.progress)
    metrics["parity"] += result["parity"]
    metrics["files"].update(result["files"])
    return components


def _quantize_int8(src, int8, settings: QuantizeSettings, fp16_written: list[str], held_out: list, metrics: dict, ctx):
    """Quantize `int8` behind the PSNR gate in a scratch folder, then move them into the stage
    folder (the whole folder when no fp16 component was written there first, else only `int8`).
    Adds their parity and files to `metrics`; returns the quantization record."""
    from export.quantize import quantize_onnx_folder

    cfg = settings.quantize
    calibration, parity_inputs = None, {}
    if cfg.mode == "static":
        calibration, parity_inputs = _static_calibration(src, int8, cfg, list(settings.erase), held_out)
    scratch = ctx.out_dir / ".int8"
    result = quantize_onnx_folder(
        src,
        scratch,
        mode=cfg.mode,
        components=int8,
        per_channel=cfg.per_channel,
        op_types=list(cfg.op_types) or None,
        weight_type=cfg.weight_type,
        quant_format=cfg.quant_format if cfg.mode == "static" else "QOperator",
        calibration=calibration,
        nodes_to_exclude=tuple(cfg.exclude_nodes),
        activation_type=cfg.activation_type,
        psnr_floor_db=cfg.psnr_floor_db,
        parity_inputs=parity_inputs or None,
        progress=ctx.progress,
    )
    if not fp16_written:  # nothing written yet: take the whole folder
        shutil.copytree(scratch, ctx.out_dir, dirs_exist_ok=True)
    else:
        for name in int8:
            shutil.copytree(scratch / name, ctx.out_dir / name, dirs_exist_ok=True)
    shutil.rmtree(scratch)
    metrics["parity"] += result["parity"]
    metrics["files"].update(result["files"])
    return result["quantization"]


def _static_calibration(src, int8: list[str], cfg: QuantizeConfig, erase: list[str], held_out) -> tuple[dict, dict]:
    """Static int8's calibration feeds and held-out parity feed per component (the UNet only)."""
    from export.quantize import collect_unet_calibration

    calibration, parity_inputs = {}, {}
    prompts = calibration_prompts(cfg, erase)
    for name in int8:
        if name != "unet":
            raise GateError(
                f"quantize.mode=static calibrates the UNet only; {name!r} needs quantize.mode=dynamic "
                "or quantize.components=[unet]"
            )
        calibration["unet"] = collect_unet_calibration(
            src,
            prompts,
            steps=cfg.calibration_steps,
            guidance_scale=cfg.calibration_guidance_scale,
            seed=cfg.calibration_seed,
            n=cfg.calibration_feeds,
        )
        parity_inputs["unet"] = held_out[len(held_out) // 2]
    return calibration, parity_inputs


def held_out_feeds(src, prompts: list[str], cfg: QuantizeConfig, collect=None) -> list:
    """GUIDANCE_FEEDS UNet feeds of a trajectory of the first PARITY_PROMPTS non-empty calibration
    prompts (GUIDANCE_TEXT when there are none) under the next seed, which no calibration feed came
    from: the guidance gate's feeds and, the middle one, the int8 parity feed. `collect(src, prompts,
    steps, guidance_scale, seed, n)` draws them (default: the ONNX folder `src` through ONNX Runtime)."""
    from export.quantize import collect_unet_calibration

    prompts = [p for p in prompts if p][:PARITY_PROMPTS] or list(GUIDANCE_TEXT)
    collect = collect or collect_unet_calibration
    steps, scale = cfg.calibration_steps, cfg.calibration_guidance_scale
    return collect(src, prompts, steps, scale, cfg.calibration_seed + 1, GUIDANCE_FEEDS)


def held_out_feed(src, prompts: list[str], cfg: QuantizeConfig):
    """The UNet feed the int8 gate compares on: the middle of `held_out_feeds`."""
    feeds = held_out_feeds(src, prompts, cfg)
    return feeds[len(feeds) // 2]


def _guidance_gate(src, out_dir, unet_format: str, feeds: list, cfg: QuantizeConfig) -> dict:
    """The written UNet's guidance signal against the fp32 one's on `feeds` (export.guidance);
    ParityError under the floors. Returns the report's row."""
    from export.guidance import check_guidance, guidance_fidelity, onnx_unet_fn
    from toolchain.runtime.ort import read_config

    entry = guidance_fidelity(
        onnx_unet_fn(src / "unet" / "model.onnx"),
        onnx_unet_fn(out_dir / "unet" / "model.onnx"),
        feeds,
        num_train_timesteps=read_config(src, "scheduler").get("num_train_timesteps", 1000),
        cosine_floor=cfg.guidance_cosine_floor,
        norm_ratio_range=tuple(cfg.guidance_norm_ratio),
    )
    row = {"component": "unet", "format": unet_format, "reference": "onnx-fp32", **entry}
    check_guidance(
        row,
        label=unet_format,
        hint="16-bit activations keep it (quantize.activation_type=QUInt16, W8A16), or accept it with a stated "
        "floor (quantize.guidance_cosine_floor, quantize.guidance_norm_ratio)",
    )
    return row


def calibration_prompts(cfg: QuantizeConfig, erase: list[str]) -> list[str]:
    """`cfg.calibration_prompts` prompts: the erased concepts' retain, erase and held-out prompts, then
    `cfg.calibration_text`, repeated in turn when there are fewer; "" when the recipe has none."""
    from toolchain.config import load_concept

    pool: list[str] = []
    for name in erase:
        concept = load_concept(name)
        for prompts in concept.retain_prompts.values():
            pool += prompts
        pool += list(concept.erase_prompts) + list(concept.heldout_prompts)
    pool += list(cfg.calibration_text)
    pool = list(dict.fromkeys(pool)) or [""]
    return [pool[i % len(pool)] for i in range(cfg.calibration_prompts)]
