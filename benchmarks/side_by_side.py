"""Side by side: the deliverable against the model the user started with, in the same runtime,
timed in turns in one process (`benchmarks.latency.time_interleaved`), so the speed-up is a ratio
measured within one run whatever the machine's speed that minute; each row takes as many turns as
fit in `benchmark.side_by_side_ms` (3 s) of the slower model, at least `benchmark.repeats`.

Each model runs at its own sampling: the source at `steps` with classifier-free guidance (the UNet
at batch 2 per image), the deliverable the same, or, where it is a k-step generator
(`onestep.json`), its k unguided UNet calls per image. Rows:

- one per component (text encoder, UNet, VAE decoder) at the benchmark's batch: both models on the
  same inputs; `speedup` = source ms / deliverable ms, `size_ratio` = deliverable bytes / source bytes;
- `image`, `measured`: one whole image through each model's sampler (`toolchain.runtime`);
- `image`, `composed`: text encoder + steps x UNet + VAE decoder from the component medians (for a
  generator, its k UNet calls are taken at the batch-2 row, an upper bound of its cost, unless its
  graphs are fixed to its 1 row).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.latency import composed_image_latency, time_interleaved, turns_for
from toolchain.runtime.ort import OrtPipeline, component_inputs, ort_feed, ort_session, read_fixed_rows
from toolchain.runtime.schedule import read_schedule

COMPONENTS = ("text_encoder", "unet", "vae_decoder")


def ort_side_by_side(
    source: dict[str, Any],
    deliverable: dict[str, Any],
    pipeline_dir: Path,
    cfg,
    providers: list[str],
    threads: int,
    runtime: str = "onnxruntime",
) -> dict[str, Any]:
    """`source` and `deliverable`: {"stage", "folder", "files": {component: {"path", "size_bytes"}}}
    of two exported pipelines in ONNX Runtime; `cfg` a BenchmarkConfig (batch, warmup, repeats,
    eval_steps, guidance_scale, seed); `pipeline_dir` the diffusers folder whose configs shape
    the component inputs. Returns report.json's `side_by_side` section."""
    sampling = {
        name: _sampling(model["folder"], cfg) for name, model in (("source", source), ("deliverable", deliverable))
    }
    rows = [_component_row(c, source, deliverable, pipeline_dir, cfg, providers, threads) for c in COMPONENTS]
    sizes = {name: sum(r[f"{name}_bytes"] for r in rows) for name in ("source", "deliverable")}
    composed = {
        name: composed_image_latency(rows, sampling[name]["unet_calls"], keys=(f"{name}_ms",))
        for name in ("source", "deliverable")
    }
    if all(composed.values()):  # the UNet rows are guided steps (batch 2): an image composes from them
        ms = {name: value[f"{name}_ms"] for name, value in composed.items()}
        rows.append(_row("image", 1, ms, sizes, method="composed"))
    rows.append(_measured_image(source, deliverable, sampling, sizes, cfg, providers, threads))
    return {
        "runtime": runtime,
        "provider": rows[0]["provider"],
        "threads": threads,
        "interleaved": True,
        "source": {"stage": source["stage"], **sampling["source"]},
        "deliverable": {"stage": deliverable["stage"], **sampling["deliverable"]},
        "rows": rows,
    }


def _sampling(folder: Path, cfg) -> dict[str, Any]:
    """How a model draws one image: guided diffusion at the benchmark's steps, or its generator's k steps."""
    schedule = read_schedule(folder)
    if schedule:
        return {"steps": len(schedule["timesteps"]), "guidance_scale": None, "unet_calls": len(schedule["timesteps"])}
    return {"steps": cfg.eval_steps, "guidance_scale": cfg.guidance_scale, "unet_calls": cfg.eval_steps}


def _row(component: str, batch: int, ms: dict[str, float], sizes: dict[str, int], **extra) -> dict[str, Any]:
    return {
        "component": component,
        "batch": batch,
        **extra,
        "source_ms": ms["source"],
        "deliverable_ms": ms["deliverable"],
        "speedup": round(ms["source"] / ms["deliverable"], 3),
        "source_bytes": int(sizes["source"]),
        "deliverable_bytes": int(sizes["deliverable"]),
        "size_ratio": round(sizes["deliverable"] / sizes["source"], 4),
    }


def _component_row(component, source, deliverable, pipeline_dir, cfg, providers, threads) -> dict[str, Any]:
    """One component of both models on the same inputs, timed in turns; a fixed-shape model
    (`fixed_shapes.json`: a k-step generator takes 1 row) at its own rows, which the row states."""
    models = (("source", source), ("deliverable", deliverable))
    rows = {name: read_fixed_rows(model["folder"]) or cfg.batch for name, model in models}
    calls, batches, provider = {}, {}, None
    for name, model in models:
        inputs = component_inputs(pipeline_dir, component, rows[name], cfg.seed)
        batches[name] = int(next(iter(inputs.values())).shape[0])
        session, provider = ort_session(Path(model["folder"]) / model["files"][component]["path"], threads, providers)
        feed = ort_feed(session, inputs)
        calls[name] = lambda session=session, feed=feed: session.run(None, feed)
    repeats = turns_for(calls, cfg.repeats, cfg.side_by_side_ms)
    timing = time_interleaved(calls, cfg.warmup, repeats)
    ms = {name: timing[name]["median_ms"] for name in calls}
    sizes = {name: model["files"][component]["size_bytes"] for name, model in models}
    row = {**_row(component, batches["deliverable"], ms, sizes), "repeats": repeats, "provider": provider}
    if batches["source"] != batches["deliverable"]:
        row["source_batch"] = batches["source"]
    return row


def _measured_image(source, deliverable, sampling, sizes, cfg, providers, threads) -> dict[str, Any]:
    """One image end to end through each model's own sampler, in turns."""
    pipes = {
        name: OrtPipeline(Path(model["folder"]), _paths(model), providers, threads)
        for name, model in (("source", source), ("deliverable", deliverable))
    }
    calls = {
        name: lambda pipe=pipe: pipe(["a photo"], cfg.seed, cfg.eval_steps, cfg.guidance_scale)
        for name, pipe in pipes.items()
    }
    repeats = turns_for(calls, cfg.repeats, cfg.side_by_side_ms)
    timing = time_interleaved(calls, min(cfg.warmup, 1), repeats)
    ms = {name: timing[name]["median_ms"] for name in calls}
    return {
        **_row("image", 1, ms, sizes, method="measured"),
        "repeats": repeats,
        "provider": pipes["deliverable"].provider,
    }


def _paths(model: dict[str, Any]) -> dict[str, str]:
    return {component: info["path"] for component, info in model["files"].items()}


def headline(report: dict[str, Any]) -> str | None:
    """report.md's first line: speed-up and size of the deliverable against the source, and the
    deliverable's leakage and retain accuracy (with image counts) against the source's; None
    without a measured side-by-side image row."""
    side = report.get("side_by_side") or {}
    image = next((r for r in side.get("rows", []) if r["component"] == "image" and r.get("method") == "measured"), None)
    if image is None:
        return None
    parts = [f"{image['speedup']:.1f}x faster per image", f"{100 * image['size_ratio']:.0f}% of the size"]
    stages = {s["name"]: s for s in report.get("stages", [])}
    source, final = stages.get("source", {}), stages.get(side["deliverable"]["stage"], {})
    for label, share in (final.get("leakage") or {}).items():
        n = (final.get("leakage_n") or {}).get(label)
        parts.append(f"leakage of {label} {100 * share:.1f}%" + (f" ({round(share * n)}/{n} images)" if n else ""))
    if final.get("retain_accuracy") is not None and source.get("retain_accuracy"):
        relative = final["retain_accuracy"] / source["retain_accuracy"]
        n = final.get("retain_n")
        parts.append(f"retain {100 * relative:.0f}% of the source" + (f" ({n} images)" if n else ""))
    how = f"{side['runtime']}, {side['source']['steps']} vs {side['deliverable']['steps']} UNet steps per image"
    return ", ".join(parts) + f" ({how})"
