"""The deliverable's model card: `deploy/<target>/README.md` in the Hugging Face model-card form.

An app developer reads this, not report.json: a YAML header (base model, the source's license
carried over, tags, pipeline tag), what was done (each stage and its settings), the figures
measured on this deliverable with their image counts (speed-up and size against the source,
leakage and held-out leakage per erased concept, retain accuracy, parity), and how to load it in
the target's runtime. Every figure is read from report.json; nothing here is typed by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CARD = "README.md"  # the hub's name for a model card: the source's is read, the deliverable's written
CARD_FILE = "model_card.md"  # the benchmark stage's copy, which the runner ships as deploy/<target>/README.md
LIBRARIES = {"onnx": "onnxruntime", "ort": "onnxruntime", "coreml": "coreml"}
# stage settings worth a reader's line; the manifest has all of them
SHOWN = {
    "prune": ("method", "ratio", "importance", "scope"),
    "finetune": ("mode", "objective", "steps", "batch_size", "upper_every"),
    "concept_prune": ("ratio", "tau"),
    "export": ("opset",),
    "quantize": ("method", "components", "calibration_prompts"),
    "ort": ("optimization_style",),
    "coreml": ("precision", "compression", "attention"),
}


def source_card_header(model_dir: Path) -> dict[str, str]:
    """`license` and `base_model` from the source folder's own model card (its YAML header), if any."""
    readme = Path(model_dir) / CARD
    if not readme.is_file():
        return {}
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return {}
    import yaml

    try:
        header = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return {}
    return {k: str(header[k]) for k in ("license", "base_model") if isinstance(header, dict) and header.get(k)}


def render_card(report: dict[str, Any], stages: list[dict[str, Any]], source_header: dict[str, str]) -> str:
    """The card's text. `stages`: [{"stage", "config"}] of the chain after the source, in order."""
    model, target = report.get("model", {}), report.get("model", {}).get("target", "onnx")
    name = Path(str(model.get("source", "model"))).name
    erase = list(model.get("erase", []))
    header = {
        "base_model": source_header.get("base_model", name),
        "license": source_header.get("license", "other"),
        "library_name": LIBRARIES.get(target, target),
        "pipeline_tag": "text-to-image",
        "tags": ["diffusion-compress", "stable-diffusion", target, *(["concept-erasure"] if erase else [])],
    }
    lines = ["---", *_yaml(header), "---", "", f"# {name}, compressed for {target} by diffusion-compress", ""]
    if "license" not in source_header:
        lines += ["> The source model's folder names no license; check its terms before you ship this.", ""]
    lines += _done(stages, erase, model)
    lines += _figures(report)
    lines += _how_to_load(target, report)
    return "\n".join(lines) + "\n"


def _yaml(header: dict[str, Any]) -> list[str]:
    lines = []
    for key, value in header.items():
        if isinstance(value, list):
            lines += [f"{key}:", *(f"- {json.dumps(v)}" for v in value)]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return lines


def _done(stages: list[dict[str, Any]], erase: list[str], model: dict[str, Any]) -> list[str]:
    lines = ["## What was done", ""]
    if model.get("recipe"):
        lines += [f"Recipe: {model['recipe']}", ""]
    for stage in stages:
        config = stage.get("config") or {}
        shown = ", ".join(f"{k}={config[k]}" for k in SHOWN.get(stage["stage"], ()) if config.get(k) not in (None, ""))
        lines.append(f"- `{stage['stage']}`" + (f": {shown}" if shown else ""))
    if erase:
        lines.append(f"- erased concepts: {', '.join(erase)}")
    return lines + [
        "",
        "Every stage's full settings and fingerprint are in the run folder's `manifest.json` files.",
        "",
    ]


def _share(share: float | None, n: int | None, interval: list | None) -> str:
    if share is None:
        return "not judged"
    text = f"{100 * share:.1f}%"
    if n:
        text += f" ({round(share * n)}/{n} images"
        text += f", 95% CI {100 * interval[0]:.1f}–{100 * interval[1]:.1f}%)" if interval else ")"
    return text


def _figures(report: dict[str, Any]) -> list[str]:
    """Speed and size against the source, erasure and retain on the deliverable, parity and guidance."""
    stages = {s["name"]: s for s in report.get("stages", [])}
    final = report.get("stages", [{}])[-1] if report.get("stages") else {}
    source = stages.get("source", {})
    lines = ["## Measured on this deliverable", "", "| figure | value |", "|---|---|"]
    side = report.get("side_by_side") or {}
    for row in side.get("rows", []):
        if row["component"] in ("image", "unet") and row.get("method") in (None, "measured"):
            what = "per image" if row["component"] == "image" else "per UNet call"
            lines.append(
                f"| speed-up {what} vs the source ({side['runtime']}, timed in turns) | {row['speedup']:.2f}x "
                f"({row['source_ms']:.1f} ms → {row['deliverable_ms']:.1f} ms) |"
            )
    if final.get("size_bytes") and source.get("size_bytes"):
        ratio = final["size_bytes"] / source["size_bytes"]
        lines.append(f"| size | {final['size_bytes'] / 2**20:.1f} MiB, {100 * ratio:.0f}% of the source |")
    for label, share in (final.get("leakage") or {}).items():
        counts = ((final.get("leakage_n") or {}).get(label), (final.get("leakage_ci95") or {}).get(label))
        lines.append(f"| leakage of {label} (images judged as {label}) | {_share(share, *counts)} |")
        held = ((final.get("attack") or {}).get(label)) or {}
        if "heldout_leakage" in held:
            counts = (held.get("heldout_leakage_n"), held.get("heldout_leakage_ci95"))
            lines.append(f"| leakage of {label} on held-out phrasings | {_share(held['heldout_leakage'], *counts)} |")
    if final.get("retain_accuracy") is not None:
        shown = _share(final["retain_accuracy"], final.get("retain_n"), final.get("retain_ci95"))
        base = source.get("retain_accuracy")
        lines.append(
            f"| retain accuracy (other concepts drawn right) | {shown}"
            + (f", source {100 * base:.1f}% |" if base else " |")
        )
    for row in report.get("parity", []):
        bound = f" (tolerance {row['tolerance']:.2g})" if row.get("tolerance") is not None else ""
        psnr = f", PSNR {row['psnr_db']:.1f} dB" if row.get("psnr_db") is not None else ""
        if row.get("psnr_floor_db") is not None:  # int8: held to a PSNR floor, not an error tolerance
            psnr += f" (floor {row['psnr_floor_db']:.0f} dB)"
        lines.append(
            f"| parity {row['component']} ({row['format']} vs {row.get('reference', 'torch')}) | "
            f"max abs error {row['max_abs_err']:.2g}{bound}{psnr} |"
        )
    for row in report.get("guidance", []):
        lines.append(
            f"| guidance signal {row['component']} ({row['format']} vs {row['reference']}, worst timestep band, "
            f"{row['images']} images) | cosine {row['cosine']:.3f} (floor {row['cosine_floor']}), "
            f"norm ratio {row['norm_ratio']:.3f} |"
        )
    machine = report.get("machine", {})
    lines += [
        "",
        f"Measured by the benchmark stage on {machine.get('cpu', 'this machine')} "
        f"({machine.get('cores', '?')} cores); the full report is `report.json` / `report.md` beside this card.",
        "",
    ]
    return lines


def _how_to_load(target: str, report: dict[str, Any]) -> list[str]:
    side = (report.get("side_by_side") or {}).get("deliverable", {})
    generator = side.get("guidance_scale") is None and side.get("steps") is not None
    lines = ["## How to load", ""]
    if target == "onnx":
        lines += [
            "```python",
            "from optimum.onnxruntime import ORTStableDiffusionPipeline",
            'pipe = ORTStableDiffusionPipeline.from_pretrained("deploy/onnx")',
            'image = pipe("a prompt", num_inference_steps=25).images[0]',
            "```",
            "",
            'Or per component with `onnxruntime.InferenceSession("unet/model.onnx")` (optimum\'s layout).',
        ]
    elif target == "ort":
        lines += [
            "ONNX Runtime Mobile (Android: `com.microsoft.onnxruntime:onnxruntime-android`; iOS: the "
            "`onnxruntime-objc` pod) opens `text_encoder/model.ort`, `unet/model.ort` and `vae_decoder/model.ort` "
            "with `OrtSession`; `required_operators.config` builds a reduced runtime "
            "(`build.py --include_ops_by_config required_operators.config`; `--minimal_build extended` for "
            'graphs saved with ONNX Runtime\'s "Runtime" optimisations, which NNAPI and the Core ML EP need).',
        ]
    elif target == "coreml":
        lines += [
            "Compile on a Mac (`xcrun coremlcompiler compile Unet.mlpackage .`, likewise TextEncoder and VAEDecoder) "
            "and load the folder with Apple's StableDiffusion Swift package: "
            "`StableDiffusionPipeline(resourcesAt: url, controlNet: [], configuration: MLModelConfiguration())`.",
        ]
    elif target == "qnn":
        qnn = report.get("qnn", {})
        lines += [
            f"Android with ONNX Runtime {qnn.get('onnxruntime')} and its QNN execution provider (`onnxruntime-qnn` "
            f"{qnn.get('onnxruntime_qnn')}, QNN SDK 2.40), HTP backend. `<component>/model_ctx.onnx` (+ "
            f"`model_ctx_qnn.bin`) is compiled for the {qnn.get('name')} ({qnn.get('soc')}, Hexagon v{qnn.get('htp_arch')}) "
            "and opens without compiling on the phone; `<component>/model.onnx` is the same graph for other SoCs "
            "(compiled on first load). Session provider options: `backend_type=htp`, "
            f"`enable_htp_fp16_precision=1` for {', '.join(qnn.get('fp16_components', []))}; shapes are fixed "
            f"(rows per call: {qnn.get('batches')}).",
        ]
    elif target == "executorch":
        et = report.get("executorch", {})
        lines += [
            f"ExecuTorch {et.get('executorch')} runtime with the XNNPACK backend linked in (Android: the "
            "`executorch-android` AAR; iOS: the ExecuTorch Swift package with `backend_xnnpack`): load "
            "`text_encoder/model.pte`, `unet/model.pte` and `vae_decoder/model.pte` as `Module`s and call "
            f"`forward`. Inputs are positional and fixed in shape: {et.get('inputs')}. Tokenize with "
            "`tokenizer/` (CLIP BPE), step with the DDIM scheduler of `scheduler/scheduler_config.json`, divide "
            "latents by the VAE's `scaling_factor` (`vae_decoder/config.json`) before decoding.",
        ]
    if target in ("onnx", "ort") and report.get("fixed_shapes"):
        fixed = report["fixed_shapes"]
        lines += [
            "",
            f"Shapes are fixed (`fixed_shapes.json`), so a phone accelerator can take the graphs: rows per call "
            f"{fixed['batches']}, inputs {fixed['inputs']}. Add `NNAPI` or `CoreML` to the session's providers; "
            "report.md's accelerator table says how much of each graph each one takes.",
        ]
    if generator:
        lines += [
            "",
            f"This is a {side['steps']}-step generator: sample it with the timesteps in `onestep.json`, "
            "without classifier-free guidance (`toolchain.runtime.sampler` does).",
        ]
    return lines + [""]
