"""Stage `benchmark`: measure every artifact of the run and write `report.json` / `report.md`.

Per stage: parameters and file sizes (read from file headers, no model load), and, where a judge
applies, leakage of the erased concepts, retain accuracy and judge FID on images the stage's
model generates (every exported or quantized model through ONNX Runtime, as an app runs it),
each share with its image count (`<key>_n`) and 95% Wilson interval (`<key>_ci95`).
Latency: the UNet of
the source and of the last PyTorch stage in PyTorch, and every exported component in ONNX
Runtime (ONNX and ORT format), all in this one process so ratios are comparable; per image
(text encoder + steps x UNet at batch 2 + VAE decoder) composed from those and measured end to
end for every exported pipeline; load time apart. Peak RSS of the deliverable per component and
per image in a fresh child process (benchmarks/memory.py). Everything under one device profile
(configs/devices/*.yaml: threads, providers, memory budget). Plots (PNG) beside report.json.
Every image is drawn by the runtime's sampler (toolchain/runtime/); this stage only times and judges.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import dataclass

from toolchain.artifact import Artifact
from toolchain.config import AttackConfig, BenchmarkConfig, BenchmarkSettings, load_concept

logger = logging.getLogger(__name__)
JUDGE_FILE = "judge.json"  # a model folder may name the judge that scores its images


RUNTIMES = {
    "diffusers": "torch",
    "onnx": "onnxruntime",
    "ort": "ort",
    "coreml": "coreml",
    "qnn": "qnn",
    "executorch": "executorch",
}  # kind -> runtime
PIPELINE_KINDS = ("onnx", "ort", "qnn", "executorch")  # exported folders holding a whole pipeline


@dataclass(frozen=True)
class _Bench:
    """Where and how this run measures: the benchmark config and the device profile resolved."""

    cfg: BenchmarkConfig
    device: object  # toolchain.device_config.DeviceProfile
    providers: list[str]
    threads: int
    torch_device: str
    runtimes: set[str] | None

    @property
    def tag(self) -> dict:
        return {"profile": self.device.name, "emulated": self.device.emulated}

    def measured(self, artifact: Artifact) -> bool:
        return self.runtimes is None or RUNTIMES.get(artifact.kind) in self.runtimes


def run(
    source: Artifact,
    settings: BenchmarkSettings,
    ctx,
    profile: str | None = None,
    runtimes: set[str] | None = None,
) -> Artifact:
    """Measure the chain under a device profile: `profile` (a shipped name or a YAML path), else
    `cfg.profile` where the config has it, else $COMPRESS_DEVICE_PROFILE, else desktop-cpu.
    `runtimes` (torch, onnxruntime, ort): run only the models of those runtimes (default: all)."""
    from toolchain.device_config import load_device_profile

    cfg, erase = settings.benchmark, list(settings.erase)
    device = load_device_profile(profile or getattr(cfg, "profile", None))  # a bad profile fails before any work
    device.check_deliverable(ctx.chain[-1].kind)
    import torch

    threads = device.threads or cfg.threads
    if threads:
        torch.set_num_threads(threads)
    providers, missing = device.resolve_providers()
    torch_device = "cuda" if device.torch_device == "cuda" and torch.cuda.is_available() else "cpu"
    bench = _Bench(cfg, device, providers, threads, torch_device, runtimes)
    chain = ctx.chain
    timed = ("onnx", "ort", "executorch", *(("qnn",) if device.runtime == "qnn-htp" else ()))
    exported = [a for a in chain if a.kind in timed]
    warnings = _warnings(chain, erase, bench, missing)
    evaluation = _evaluation_plan(chain[0], erase, cfg)
    stages, per_label, per_label_n, samples = _judge_stages(chain, evaluation, bench)
    _attack_stages(chain, stages, evaluation, settings.attack, cfg, providers, threads)

    pipeline_dir = [a for a in chain if a.kind == "diffusers"][-1].files
    from benchmarks.latency import speed_probe

    probes = [speed_probe()]  # the machine's speed around the latency rows (the gate scales by it)
    latency, memory = _torch_latency(chain, pipeline_dir, bench)
    probes.append(speed_probe())
    memory_rows, memory_specs = [], []
    for artifact in [a for a in exported if bench.measured(a)]:
        rows, mem_rows, specs = _exported_latency(artifact, artifact is exported[-1], pipeline_dir, bench)
        latency += rows
        memory_rows += mem_rows
        memory_specs += specs
    side = _side_by_side(chain, pipeline_dir, bench, ctx, warnings)
    probes.append(speed_probe())
    memory += _peak_memory(memory_rows, memory_specs, device, warnings)

    report = _report(settings, chain, bench, stages, latency, memory, warnings, evaluation)
    report["machine"]["speed_probe_ms"] = round(statistics.median(probes), 3)
    if side:
        report["side_by_side"] = side
    if per_label:
        report["per_label_accuracy"] = per_label
        report["per_label_n"] = per_label_n
    from benchmarks.plots import write_plots
    from benchmarks.report import write_report

    report["plots"] = write_plots(report, samples, ctx.out_dir)
    report["cache"] = _cache_summary(ctx.cache_dir)
    write_report(report, ctx.out_dir)
    _write_model_card(report, chain, ctx.out_dir)
    return Artifact(path=ctx.out_dir, kind="report", metrics={"stages": len(stages)})


def _write_model_card(report: dict, chain: list[Artifact], out_dir) -> None:
    """The deliverable's model card (benchmarks/model_card.py), from the report just written."""
    from benchmarks.model_card import CARD_FILE, render_card, source_card_header

    stages = [{"stage": a.stage, "config": a.config} for a in chain[1:]]
    (out_dir / CARD_FILE).write_text(render_card(report, stages, source_card_header(chain[0].files)))


def _cache_summary(cache_dir) -> dict:
    """Where the cross-run cache is and how much it holds (source exports, teacher samples)."""
    from toolchain.cache import folder_bytes

    kinds = sorted(p for p in cache_dir.iterdir() if p.is_dir()) if cache_dir.is_dir() else []
    return {"dir": str(cache_dir), "bytes": {p.name: folder_bytes(p) for p in kinds}}


def _warnings(chain: list[Artifact], erase: list[str], bench: _Bench, missing: list[str]) -> list[str]:
    """What the reader must know before trusting the numbers: a fallback provider or device, a
    format measured by its spec only, erased concepts no stage removed."""
    device, warnings = bench.device, []
    if missing:
        warnings.append(
            f"device profile {device.name} wants {', '.join(missing)}, which this onnxruntime build lacks; "
            f"ONNX Runtime ran on {bench.providers[0]} (fallback {device.fallback_provider})"
        )
    if device.torch_device == "cuda" and bench.torch_device == "cpu":
        warnings.append(f"device profile {device.name} wants CUDA but torch sees no GPU; the PyTorch rows ran on CPU")
    if any(a.kind == "coreml" and not a.metrics.get("prediction_checked") for a in chain):
        warnings.append(
            "Core ML prediction needs macOS: the .mlpackage files were checked by their spec only; "
            "run device_tests/ on a Mac for parity and latency"
        )
    unlearned = any(a.stage == "concept_prune" for a in chain) or any(
        a.stage == "finetune" and a.config.get("mode") != "distill" for a in chain
    )
    if erase and not unlearned:
        warnings.append(
            "no unlearning stage ran (finetune.enabled=true with an unlearning mode, or concept_prune.enabled=true): "
            "the erased concepts are measured, not removed"
        )
    return warnings


def _pipeline_files(artifact: Artifact) -> dict[str, str]:
    """component -> model path of an exported artifact holding a whole pipeline, else {}."""
    files = {c: info["path"] for c, info in artifact.metrics.get("files", {}).items()}
    return files if {"text_encoder", "unet", "vae_decoder"} <= set(files) else {}


def _judge_stages(chain: list[Artifact], evaluation: dict | None, bench: _Bench):
    """One report.json stage entry per artifact, judged where a judge applies: every PyTorch stage,
    and every exported (and quantized) model run through ONNX Runtime as the app would run it
    (quantization is known to bring erased concepts back). Returns (stages, per-label accuracy,
    per-label image counts, sample images) keyed by stage name."""
    from toolchain.runtime.ort import OrtPipeline

    stages, per_label, per_label_n, samples = [], {}, {}, {}
    for artifact in chain:
        params = artifact.metrics.get("params", {})
        entry = {
            "name": artifact.stage,
            "params": int(sum(params.values())),
            "unet_params": int(params.get("unet", 0)),
            "size_bytes": int(artifact.metrics.get("size_bytes", 0)),
            "wall_s": artifact.metrics.get("wall_s"),
        }
        files = _pipeline_files(artifact) if artifact.kind in PIPELINE_KINDS else {}
        if evaluation and bench.measured(artifact) and (artifact.kind == "diffusers" or files):
            # a QNN folder's bulk runs its own graphs on the CPU provider; a share through the HTP below
            opener = _opener(artifact, bench)
            ort_pipe = None
            if files:  # every exported runtime samples through the same pipeline, opened its own way
                ort_pipe = OrtPipeline(artifact.path, files, bench.providers, bench.threads, open_session=opener)
            scores, judged, samples[artifact.stage] = _evaluate(artifact, evaluation, bench.cfg, ort_pipe)
            entry.update(judged)
            if artifact.kind == "qnn" and opener is None:  # the bulk ran on the CPU provider
                entry["htp"] = _htp_share(artifact, files, evaluation, bench.cfg)
            per_label[artifact.stage] = scores.per_label_accuracy
            per_label_n[artifact.stage] = scores.per_label_n
            del ort_pipe
        stages.append(entry)
    return stages, per_label, per_label_n, samples


def _opener(artifact: Artifact, bench: _Bench):
    """How the sampler opens an artifact's models: ExecuTorch programs through ExecuTorch's runtime, a
    QNN folder on the HTP backend under a qnn-htp profile, everything else in ONNX Runtime (None)."""
    if artifact.kind == "executorch":
        from toolchain.runtime.executorch import executorch_opener

        return executorch_opener()
    if artifact.kind == "qnn" and bench.device.runtime == "qnn-htp":
        from toolchain.runtime.qnn import htp_opener

        return htp_opener(artifact.records["soc"], set(artifact.records["fp16_components"]))
    return None


def _memory(artifact: Artifact) -> str:
    """The runtime the memory probe's child opens the artifact's models in."""
    return "executorch" if artifact.kind == "executorch" else "onnxruntime"


def _htp_share(artifact: Artifact, files: dict, evaluation: dict, cfg: BenchmarkConfig) -> dict:
    """Leakage of every erased concept on `htp_images` images drawn through the QNN HTP backend itself
    (its first prompt, the benchmark's seed), and how often the judge gives those images the label it
    gives the same seeds drawn on the CPU provider: the share that says whether the CPU bulk stands in."""
    import numpy as np

    from benchmarks.leakage import get_judge
    from toolchain.runtime.ort import OrtPipeline
    from toolchain.runtime.qnn import htp_opener

    record, judge = artifact.records, get_judge(evaluation["judge"], **evaluation["options"])
    htp = OrtPipeline(artifact.path, files, open_session=htp_opener(record["soc"], set(record["fp16_components"])))
    cpu = OrtPipeline(artifact.path, files)
    share = {
        "runtime": "QNN HTP (simulator on x86)",
        "leakage": {},
        "leakage_n": {},
        "agreement": {},
        "concept_agreement": {},
    }
    for label, prompts in evaluation["erase"].items():
        batch = [prompts[0]] * record["htp_images"]
        labels = [
            np.asarray(
                judge.classify(pipe(batch, cfg.seed, steps=cfg.eval_steps, guidance_scale=cfg.guidance_scale)).labels
            )
            for pipe in (htp, cpu)
        ]
        share["leakage"][label] = float(np.mean(labels[0].astype(str) == str(label)))
        share["leakage_n"][label] = len(batch)
        share["agreement"][label] = float(np.mean(labels[0] == labels[1]))  # the same digit
        concept = [lab.astype(str) == str(label) for lab in labels]  # the leakage decision alone
        share["concept_agreement"][label] = float(np.mean(concept[0] == concept[1]))
    return share


def _torch_latency(chain: list[Artifact], pipeline_dir, bench: _Bench) -> tuple[list[dict], list[dict]]:
    """UNet latency in PyTorch of the source and of the last PyTorch stage (load time apart), and
    its CUDA peak memory on a GPU; returns (latency rows, memory rows)."""
    import torch

    from benchmarks.latency import torch_unet_latency
    from benchmarks.memory import cuda_peak_bytes
    from toolchain.models.io import load_unet
    from toolchain.runtime.ort import component_inputs

    cfg, latency, memory = bench.cfg, [], []
    torch_stages = [a for a in chain if a.kind == "diffusers"]
    unet_inputs = component_inputs(pipeline_dir, "unet", cfg.batch, cfg.seed)
    timed = (torch_stages[0], torch_stages[-1]) if len(torch_stages) > 1 else torch_stages[:1]
    for artifact in [a for a in timed if bench.measured(a)]:
        start = time.perf_counter()
        unet = load_unet(artifact.files / "unet")
        load_ms = round((time.perf_counter() - start) * 1000.0, 3)
        timing = torch_unet_latency(unet, unet_inputs, cfg.warmup, cfg.repeats, device=bench.torch_device)
        row = {"runtime": "torch", **bench.tag, "stage": artifact.stage, "component": "unet", "batch": cfg.batch}
        latency.append({**row, "provider": bench.torch_device, "load_ms": load_ms, **timing})
        if bench.torch_device == "cuda":
            import numpy as np

            args = {k: torch.from_numpy(np.asarray(v)).to("cuda") for k, v in unet_inputs.items()}

            def forward(unet=unet, args=args):
                with torch.inference_mode():
                    unet(args["sample"], args["timestep"], encoder_hidden_states=args["encoder_hidden_states"])

            memory.append({**row, "provider": "cuda", "cuda_peak_bytes": cuda_peak_bytes(forward)})
        del unet
    return latency, memory


def _exported_latency(artifact: Artifact, deliverable: bool, pipeline_dir, bench: _Bench):
    """Latency of every component of an exported artifact in its runtime (ONNX Runtime, or
    ExecuTorch's for its programs), and of a whole image composed from them and measured end to end
    through the runtime's sampler. Returns (latency rows, memory rows, memory specs): each
    component's peak RSS, and the whole image's for the deliverable (the last exported artifact)
    only, each in a fresh process of the same runtime."""
    from benchmarks.latency import composed_image_latency, ort_latency, time_callable
    from toolchain.runtime.ort import OrtPipeline, component_inputs, ort_session, read_fixed_rows
    from toolchain.runtime.schedule import read_schedule

    cfg, runtime, opener = bench.cfg, RUNTIMES[artifact.kind], _opener(artifact, bench)
    # a fixed-shape program's rows
    batch = artifact.records.get("batches", {}).get("unet") or read_fixed_rows(artifact.path) or cfg.batch
    component_rows, memory_rows, memory_specs = [], [], []
    for component, info in artifact.metrics.get("files", {}).items():
        start = time.perf_counter()
        if opener is None:
            session, provider = ort_session(artifact.path / info["path"], bench.threads, bench.providers)
        else:
            session = opener(artifact.path / info["path"], component)
            provider = session.get_providers()[0]
        load_ms = round((time.perf_counter() - start) * 1000.0, 3)
        inputs = component_inputs(pipeline_dir, component, batch, cfg.seed)
        timing = ort_latency(session, inputs, cfg.warmup, cfg.repeats)
        n_rows = int(next(iter(inputs.values())).shape[0])
        row = {"runtime": runtime, **bench.tag, "stage": artifact.stage, "component": component, "batch": n_rows}
        component_rows.append({**row, "provider": provider, "load_ms": load_ms, **timing})
        del session
        if artifact.kind != "qnn":  # the HTP simulator's memory is no phone's
            memory_rows.append(row)
            spec = {"model_path": str(artifact.path / info["path"]), "component": component}
            spec.update(runtime=_memory(artifact), pipeline_dir=str(pipeline_dir), batch=batch)
            spec.update(providers=bench.providers, threads=bench.threads, seed=cfg.seed)
            memory_specs.append(("benchmarks.memory:ort_component", spec))
    rows = list(component_rows)
    image_row = {"runtime": runtime, **bench.tag, "stage": artifact.stage, "component": "image", "batch": 2}
    # a k-step generator (finetune.mode=sfd) runs k unguided UNet calls per image: composed from
    # the batch-2 UNet row it is an upper bound; the measured row runs it as it is
    generator = read_schedule(artifact.path)
    steps = len(generator["timesteps"]) if generator else cfg.eval_steps
    if generator:
        image_row.update(batch=1, generator_steps=steps)
    composed = composed_image_latency(component_rows, steps)
    if composed is not None:
        provider = component_rows[0]["provider"]
        rows.append({**image_row, "method": "composed", "steps": steps, "provider": provider, **composed})
    files = _pipeline_files(artifact)
    if files:
        ort_pipe = OrtPipeline(artifact.path, files, bench.providers, bench.threads, open_session=opener)
        timing = time_callable(
            lambda pipe=ort_pipe: pipe(["a photo"], cfg.seed, cfg.eval_steps, cfg.guidance_scale),
            warmup=min(cfg.warmup, 1),
            repeats=max(1, min(cfg.repeats, 5)),
        )
        how = {"method": "measured", "steps": steps, "guidance_scale": cfg.guidance_scale}
        rows.append({**image_row, **how, "provider": ort_pipe.provider, "load_ms": ort_pipe.load_ms, **timing})
        del ort_pipe
    if files and deliverable and artifact.kind != "qnn":  # peak memory of the deliverable only
        memory_rows.append({**image_row, "steps": cfg.eval_steps})
        spec = {"folder": str(artifact.path), "files": files, "providers": bench.providers, "threads": bench.threads}
        spec["runtime"] = _memory(artifact)
        spec.update(steps=cfg.eval_steps, guidance_scale=cfg.guidance_scale)
        memory_specs.append(("benchmarks.memory:ort_image", spec))
    return rows, memory_rows, memory_specs


SOURCE_EXPORT_VERSION = 1  # bump when the source's export for side-by-side timing changes


def _side_by_side(chain: list[Artifact], pipeline_dir, bench: _Bench, ctx, warnings: list[str]) -> dict | None:
    """The deliverable against the unpruned fp32 source exported to the deliverable's runtime (that
    export cached across runs by the source's fingerprint: it costs once per model), timed in turns
    (benchmarks/side_by_side.py). None where the benchmark is off or the deliverable is no
    ONNX Runtime pipeline; a warning says why where a user would expect the comparison."""
    deliverable = chain[-1]
    if not bench.cfg.side_by_side or not bench.measured(deliverable):
        return None
    if deliverable.kind == "qnn":  # an HTP simulator's time is no phone's, and the CPU runs no NPU graph
        warnings.append(
            "no side by side for qnn: the HTP backend here is a simulator (per-call times in the parity rows); "
            "time the context binaries on a Snapdragon phone"
        )
        return None
    if deliverable.kind == "executorch":  # the source would need its own lowering (minutes) for x86 times
        warnings.append(
            "no side by side for executorch: its latency rows are XNNPACK on this x86 machine, not a phone's; "
            "time the programs on the phone (the ort or onnx target's report has the speed-up over the source)"
        )
        return None
    files = _pipeline_files(deliverable) if deliverable.kind in ("onnx", "ort") else {}
    if not files:
        if deliverable.kind == "coreml":
            warnings.append("side by side with the source needs Core ML, i.e. macOS: report.md has no speed-up line")
        return None
    from benchmarks.side_by_side import ort_side_by_side

    folder, info = _source_export(chain, ctx)
    source = {"stage": chain[0].stage, "folder": folder, "files": info["files"]}
    delivered = {"stage": deliverable.stage, "folder": deliverable.path, "files": deliverable.metrics["files"]}
    runtime = RUNTIMES[deliverable.kind]
    side = ort_side_by_side(source, delivered, pipeline_dir, bench.cfg, bench.providers, bench.threads, runtime)
    side["source"].update(export_cache=str(folder), export_cache_bytes=info["bytes"], export_cache_hit=info["hit"])
    return side


def _source_export(chain: list[Artifact], ctx) -> tuple:
    """The source pipeline in the deliverable's format (ONNX fp32, or ORT format made from it with
    the deliverable's optimisation style), from the cross-run cache (toolchain/cache.py) or made
    into it. Returns (folder, {"files", "bytes", "hit"})."""
    import onnxruntime
    import optimum.version
    import torch

    from toolchain.cache import cached_folder, folder_bytes

    onnx = next(a for a in chain if a.kind == "onnx")
    style = chain[-1].records.get("optimization_style", "Fixed") if chain[-1].kind == "ort" else None
    key = {
        "source": chain[0].fingerprint,
        "format": chain[-1].kind,
        "opset": onnx.records.get("opset"),
        "components": sorted(onnx.metrics.get("files", {})),
        "optimization_style": style,
        "fixed_shapes": "fixed_shapes" in onnx.records,  # timed as the deliverable: folding alone is faster
        "version": SOURCE_EXPORT_VERSION,
        "libraries": [torch.__version__, onnxruntime.__version__, optimum.version.__version__],
    }

    def build(tmp):
        return _export_source(chain[0], tmp, key, ctx.progress)

    folder, info, hit = cached_folder(ctx.cache_dir, "source-exports", key, build)
    logger.info("side by side: source export %s (%s)", folder, "cached" if hit else "made now")
    return folder / info["folder"], {"files": info["files"], "bytes": folder_bytes(folder), "hit": hit}


def _export_source(source: Artifact, tmp, key: dict, progress: bool) -> dict:
    """Export the source into `tmp` (ONNX in `onnx/`; ORT format in `ort/` where that is the format)."""
    from export.onnx import export_onnx
    from toolchain.models.io import load_pipeline

    pipe = load_pipeline(source.files)
    result = export_onnx(pipe, tmp / "onnx", opset=key["opset"], components=tuple(key["components"]), progress=progress)
    del pipe
    if key["fixed_shapes"]:
        from export.fixed_shapes import fix_folder

        fix_folder(tmp / "onnx", generator=False, progress=progress)  # the source samples with guidance
    if key["format"] != "ort":
        return {"folder": "onnx", "files": result["files"]}
    from export.ort import convert_to_ort

    converted = convert_to_ort(
        tmp / "onnx", tmp / "ort", optimization_style=key["optimization_style"], progress=progress
    )
    return {"folder": "ort", "files": converted["files"]}


def _peak_memory(memory_rows: list[dict], memory_specs: list, device, warnings: list[str]) -> list[dict]:
    """Peak RSS of every spec, each in a fresh child process (benchmarks/memory.py), checked against
    the device profile's memory budget; an over-budget row adds a warning."""
    from benchmarks.memory import measure

    memory = []
    for row, result in zip(memory_rows, measure(memory_specs), strict=True):
        entry = {
            **row,
            "provider": result["result"],
            "peak_rss_bytes": result["peak_rss_bytes"],
            "runtime_rss_bytes": result["runtime_rss_bytes"],
        }
        if device.memory_budget_bytes:
            entry["memory_budget_bytes"] = device.memory_budget_bytes
            entry["over_budget"] = entry["peak_rss_bytes"] > device.memory_budget_bytes
            if entry["over_budget"]:
                warnings.append(
                    f"{row['runtime']} {row['stage']} {row['component']}: peak RSS "
                    f"{entry['peak_rss_bytes'] / 2**20:.0f} MiB exceeds the {device.name} budget of "
                    f"{device.memory_budget_bytes / 2**20:.0f} MiB"
                )
        memory.append(entry)
    return memory


def _report(settings: BenchmarkSettings, chain, bench: _Bench, stages, latency, memory, warnings, evaluation) -> dict:
    """report.json's body (DESIGN.md's contract), keys in their committed order."""
    from benchmarks.latency import machine_info

    device, exported = bench.device, [a for a in chain if a.kind in PIPELINE_KINDS]
    report = {
        "model": {
            "source": str(chain[0].files),
            "target": settings.target,
            "recipe": settings.recipe,
            "erase": list(settings.erase),
        },
        "device_profile": {**device.to_report(), "threads_used": bench.threads, "providers_used": bench.providers},
        "machine": machine_info(),
        "stages": stages,
        "latency": latency,
        "memory": memory,
        "parity": [row for artifact in exported for row in artifact.metrics.get("parity", [])],
        "guidance": [row for artifact in exported for row in artifact.metrics.get("guidance", [])],
        "usability": [
            {"stage": artifact.stage, **row} for artifact in exported for row in artifact.metrics.get("usability", [])
        ],
        "warnings": warnings,
    }
    if evaluation:
        from benchmarks.leakage import get_judge

        judge = get_judge(evaluation["judge"], **evaluation["options"])
        report["judge"] = judge.describe() if hasattr(judge, "describe") else {"judge": judge.name}
    if chain[-1].kind in ("qnn", "executorch"):  # what an app needs to load it: precisions, shapes, versions
        report[chain[-1].kind] = dict(chain[-1].records)
    fixed = next((a.records["fixed_shapes"] for a in exported if "fixed_shapes" in a.records), None)
    if fixed and chain[-1].kind in ("onnx", "ort"):  # the shapes the app must feed
        report["fixed_shapes"] = fixed
    if any(m.get("over_budget") for m in memory):
        report["over_budget"] = True
    return report


def _evaluation_plan(source: Artifact, erase: list[str], cfg: BenchmarkConfig) -> dict | None:
    """Which judge scores this model and with which prompts, or None when no judge applies.

    With judge "auto" it is the one named by the erased concepts' files, else the one the model
    folder names in judge.json (the embedded digits model does). Prompts per judge label: every
    concept file of that judge gives its label's prompts, and each erased concept adds its own
    `retain_prompts`; "heldout" holds the erased concepts' held-out phrasings (paraphrase leakage).
    """
    if cfg.judge == "none":
        return None
    concepts = [load_concept(name) for name in erase]
    judge = cfg.judge
    if judge == "auto":
        marker = source.files / JUDGE_FILE
        judge = concepts[0].judge if concepts else None
        if judge is None and marker.is_file():
            judge = json.loads(marker.read_text()).get("judge")
        if judge is None:
            return None
    from toolchain.config import CONFIG_DIR

    prompts: dict[str, list[str]] = {}

    def add(label: str, more: list[str]) -> None:
        prompts.setdefault(label, [])
        prompts[label] += [p for p in more if p not in prompts[label]]

    for path in sorted((CONFIG_DIR / "concepts").glob("*.yaml")):
        concept = load_concept(str(path))
        if concept.judge == judge:
            add(concept.label, concept.erase_prompts)
    for concept in concepts:
        add(concept.label, concept.erase_prompts)
        for label, more in concept.retain_prompts.items():
            add(label, more)
    erased = {c.label for c in concepts}
    options = {}
    if judge == "clip":
        options = {"classes": sorted(prompts), "model": cfg.clip_model, "template": cfg.clip_template}
    return {
        "judge": judge,
        "options": options,
        "erase": {label: p for label, p in prompts.items() if label in erased},
        "retain": {label: p for label, p in prompts.items() if label not in erased},
        "heldout": {c.label: list(c.heldout_prompts) for c in concepts if c.heldout_prompts},
    }


def _evaluate(artifact: Artifact, evaluation: dict, cfg: BenchmarkConfig, ort_pipe=None):
    """Judge the images `artifact` generates (a diffusers folder in PyTorch, or `ort_pipe` for an
    exported one); returns (scores, report entry, samples): samples = the first image of every label, erased
    labels first, for the report's sample grid."""
    from benchmarks.leakage import evaluate_concepts, get_judge
    from toolchain.models.io import load_pipeline
    from toolchain.runtime.pytorch import diffusers_generator

    if ort_pipe is None:
        generate = diffusers_generator(
            load_pipeline(artifact.files), steps=cfg.eval_steps, guidance_scale=cfg.guidance_scale
        )
    else:

        def generate(prompts, seed):
            return ort_pipe(prompts, seed, steps=cfg.eval_steps, guidance_scale=cfg.guidance_scale)

    seen = {}

    def generate_and_keep(prompts, seed):
        images = generate(prompts, seed)
        seen["prompts"], seen["images"] = prompts, images
        return images

    judge = get_judge(evaluation["judge"], **evaluation["options"])
    scores = evaluate_concepts(
        generate_and_keep,
        judge,
        erase=evaluation["erase"],
        retain=evaluation["retain"],
        n_per_prompt=cfg.eval_images_per_prompt,
        seed=cfg.seed,
    )
    report = {**scores.to_report(), **scores.intervals()}
    if evaluation["heldout"]:  # phrasings no training step saw: leakage under paraphrase
        held = evaluate_concepts(generate, judge, evaluation["heldout"], {}, cfg.eval_images_per_prompt, cfg.seed + 1)
        report["attack"] = {
            label: _share("heldout_leakage", rate, held.leakage_n[label]) for label, rate in held.leakage.items()
        }
    logger.info("%s: judge %s -> %s", artifact.stage, evaluation["judge"], report)
    samples = []
    for erased, group in ((True, evaluation["erase"]), (False, evaluation["retain"])):
        for label, prompts in group.items():
            if prompts and prompts[0] in seen.get("prompts", []):
                i = seen["prompts"].index(prompts[0])
                samples.append({"label": label, "erased": erased, "prompt": prompts[0], "image": seen["images"][i]})
    return scores, report, samples


def _share(key: str, share: float, n: int) -> dict:
    """report.json's share `key` with its image count `key_n` and 95% Wilson interval `key_ci95`."""
    from benchmarks.leakage import share_interval

    return {key: share, f"{key}_n": n, f"{key}_ci95": share_interval(share, n)}


def _attack_stages(chain, stages, evaluation, acfg: AttackConfig, cfg: BenchmarkConfig, providers, threads):
    """White-box attacks per stage (`attack` section, toolchain/attacks/), merged into each
    stage entry's `attack.<label>`: on every PyTorch stage the prefix attack and concept inversion
    run against that stage's model (`attacked_on` = the stage itself); every exported model runs
    the prompts found on the last PyTorch stage before it (`attacked_on` names that stage; the
    inverted embedding does not transfer: it is no text). The original model is the source stage."""
    if not acfg.enabled or not evaluation or not evaluation["erase"]:
        return
    import torch

    from benchmarks.leakage import get_judge
    from toolchain.attacks import attack_concept, concept_latents, transfer_rate
    from toolchain.models.io import load_pipeline

    judge = get_judge(evaluation["judge"], **evaluation["options"])
    original = load_pipeline(chain[0].files)
    latents = {
        label: concept_latents(original, prompts, acfg.concept_images, cfg.eval_steps, cfg.guidance_scale, acfg.seed)
        for label, prompts in evaluation["erase"].items()
    }
    found: dict[str, tuple[str, list[str]]] = {}
    guidance = cfg.guidance_scale
    for artifact, entry in zip(chain, stages, strict=True):
        files = _pipeline_files(artifact) if artifact.kind in ("onnx", "ort", "executorch") else {}
        if artifact.kind == "diffusers":
            pipe = load_pipeline(artifact.files)
            for label, prompts in evaluation["erase"].items():
                with torch.enable_grad():
                    result = attack_concept(
                        pipe, original, latents[label], prompts, label, judge, acfg, cfg.eval_steps, guidance
                    )
                found[label] = (artifact.stage, result.attacked_prompts)
                attack = entry.setdefault("attack", {}).setdefault(label, {})
                attack.update(result.to_report(), attacked_on=artifact.stage)
                n = len(result.attacked_prompts) * acfg.images_per_prompt  # every attack judges this many
                for kind in ("plain", "prompt_attack", "soft_prompt_attack", "embedding_attack"):
                    if attack.get(kind) is not None:
                        attack.update(_share(kind, attack[kind], n))
            del pipe
        elif files and found:
            from toolchain.runtime.ort import OrtPipeline

            opener = None
            if artifact.kind == "executorch":  # the attacked prompts drawn through ExecuTorch's runtime
                from toolchain.runtime.executorch import executorch_opener

                opener = executorch_opener()
            ort_pipe = OrtPipeline(artifact.path, files, providers, threads, open_session=opener)
            for label, (stage, prompts) in found.items():

                def generate(batch, seed, ort_pipe=ort_pipe):
                    return ort_pipe(batch, seed, steps=cfg.eval_steps, guidance_scale=guidance)

                rate = transfer_rate(generate, prompts, label, judge, acfg.images_per_prompt, acfg.seed)
                attack = entry.setdefault("attack", {}).setdefault(label, {})
                attack.update(
                    **_share("prompt_attack", rate, len(prompts) * acfg.images_per_prompt),
                    soft_prompt_attack=None,
                    embedding_attack=None,
                    prompts=prompts,
                    attacked_on=stage,
                )
            del ort_pipe
