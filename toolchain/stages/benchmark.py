"""Stage `benchmark`: measure every artifact of the run and write `report.json` / `report.md`.

Per stage: parameters and file sizes (read from file headers, no model load), and, where a judge
applies, leakage of the erased concepts, retain accuracy and judge FID on images the stage's
model generates. Latency: the UNet of the source and of the last PyTorch stage in PyTorch, and
every exported component in ONNX Runtime (ONNX and ORT format), all in this one process so
ratios are comparable.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from toolchain.artifact import Artifact
from toolchain.config import BenchmarkConfig, load_concept

logger = logging.getLogger(__name__)
JUDGE_FILE = "judge.json"  # a model folder may name the judge that scores its images


def component_params(folder: Path) -> dict[str, int]:
    """Parameter count per component from safetensors or ONNX initializer headers."""
    counts = {}
    for component in sorted(p for p in folder.iterdir() if p.is_dir()):
        total = 0
        for file in component.glob("*.safetensors"):
            with open(file, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            for key, value in header.items():
                if key != "__metadata__":
                    n = 1
                    for dim in value["shape"]:
                        n *= dim
                    total += n
        for file in component.glob("*.onnx"):
            total += _onnx_params(file)
        if total:
            counts[component.name] = total
    return counts


def _onnx_params(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for init in model.graph.initializer:
        n = 1
        for dim in init.dims:
            n *= dim
        total += n if n > 1 else 0  # scalars are constants of the graph, not parameters
    return total


def run(source: Artifact, cfg: BenchmarkConfig, ctx) -> Artifact:
    import torch

    from benchmarks.latency import component_inputs, ort_latency, ort_session, torch_unet_latency
    from benchmarks.report import write_report
    from toolchain.models.io import load_unet

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    chain = ctx.chain
    torch_stages = [a for a in chain if a.kind == "diffusers"]
    exported = [a for a in chain if a.kind in ("onnx", "ort")]
    latency, warnings = [], []
    evaluation = _evaluation_plan(chain[0], ctx.config.erase, cfg.judge)
    if any(a.kind == "coreml" and not a.metrics.get("prediction_checked") for a in chain):
        warnings.append(
            "Core ML prediction needs macOS: the .mlpackage files were checked by their spec only; "
            "run device_tests/ on a Mac for parity and latency"
        )
    if ctx.config.erase:
        warnings.append("this version has no unlearning stage: the erased concepts are measured, not yet removed")

    stages, per_label = [], {}
    for artifact in chain:
        params = artifact.metrics.get("params", {})
        entry = {
            "name": artifact.stage,
            "params": int(sum(params.values())),
            "unet_params": int(params.get("unet", 0)),
            "size_bytes": int(artifact.metrics.get("size_bytes", 0)),
            "wall_s": artifact.metrics.get("wall_s"),
        }
        if evaluation and artifact.kind == "diffusers":
            scores = _evaluate(artifact, evaluation, cfg)
            entry.update(scores.to_report())
            per_label[artifact.stage] = scores.per_label_accuracy
        stages.append(entry)

    pipeline_dir = torch_stages[-1].files
    unet_inputs = component_inputs(pipeline_dir, "unet", cfg.batch, cfg.seed)
    for artifact in (torch_stages[0], torch_stages[-1]) if len(torch_stages) > 1 else torch_stages[:1]:
        unet = load_unet(artifact.files / "unet")
        timing = torch_unet_latency(unet, unet_inputs, cfg.warmup, cfg.repeats)
        latency.append(
            {
                "runtime": "torch",
                "profile": "desktop-cpu",
                "stage": artifact.stage,
                "component": "unet",
                "batch": cfg.batch,
                "provider": "cpu",
                **timing,
            }
        )
        del unet
    for artifact in exported:
        runtime = {"onnx": "onnxruntime", "ort": "ort"}[artifact.kind]
        for component, info in artifact.metrics.get("files", {}).items():
            session, provider = ort_session(artifact.path / info["path"], cfg.threads)
            inputs = component_inputs(pipeline_dir, component, cfg.batch, cfg.seed)
            timing = ort_latency(session, inputs, cfg.warmup, cfg.repeats)
            batch = next(iter(inputs.values())).shape[0]
            latency.append(
                {
                    "runtime": runtime,
                    "profile": "desktop-cpu",
                    "stage": artifact.stage,
                    "component": component,
                    "batch": int(batch),
                    "provider": provider,
                    **timing,
                }
            )
            del session

    report = {
        "model": {
            "source": str(chain[0].files),
            "target": ctx.config.target,
            "recipe": ctx.config.description,
            "erase": list(ctx.config.erase),
        },
        "stages": stages,
        "latency": latency,
        "memory": [],
        "parity": [row for artifact in exported for row in artifact.metrics.get("parity", [])],
        "warnings": warnings,
    }
    if per_label:
        report["per_label_accuracy"] = per_label
    write_report(report, ctx.out_dir)
    return Artifact(path=ctx.out_dir, kind="report", metrics={"stages": len(stages)})


def _evaluation_plan(source: Artifact, erase: list[str], judge: str) -> dict | None:
    """Which judge scores this model and with which prompts, or None when no judge applies.

    With judge "auto" it is the one named by the erased concepts' files, else the one the model
    folder names in judge.json (the embedded digits model does). Prompts per judge label come
    from every concept file of that judge.
    """
    if judge == "none":
        return None
    concepts = [load_concept(name) for name in erase]
    if judge == "auto":
        marker = source.files / JUDGE_FILE
        judge = concepts[0].judge if concepts else None
        if judge is None and marker.is_file():
            judge = json.loads(marker.read_text()).get("judge")
        if judge is None:
            return None
    from toolchain.config import CONFIG_DIR

    prompts = {}
    for path in sorted((CONFIG_DIR / "concepts").glob("*.yaml")):
        concept = load_concept(str(path))
        if concept.judge == judge:
            prompts[concept.label] = concept.erase_prompts
    erased = {c.label for c in concepts}
    return {
        "judge": judge,
        "erase": {label: p for label, p in prompts.items() if label in erased},
        "retain": {label: p for label, p in prompts.items() if label not in erased},
    }


def _evaluate(artifact: Artifact, evaluation: dict, cfg: BenchmarkConfig):
    from benchmarks.leakage import diffusers_generator, evaluate_concepts, get_judge
    from toolchain.models.io import load_pipeline

    pipe = load_pipeline(artifact.files)
    generate = diffusers_generator(pipe, steps=cfg.eval_steps, guidance_scale=cfg.guidance_scale)
    scores = evaluate_concepts(
        generate,
        get_judge(evaluation["judge"]),
        erase=evaluation["erase"],
        retain=evaluation["retain"],
        n_per_prompt=cfg.eval_images_per_prompt,
        seed=cfg.seed,
    )
    logger.info("%s: judge %s -> %s", artifact.stage, evaluation["judge"], scores.to_report())
    return scores
