"""CUDA path check: every CUDA code path of the toolchain run for real on one GPU; one JSON of figures.

Mixed precision, gradient checkpointing, Accelerate on a GPU, teacher sampling on the device and the
`cuda` benchmark profile are proven on CPU only by the test suite (issue 19). On one GPU, in a few
minutes (budget: 8), this script runs the project's own code, not a re-write of it:

- digits: the embedded digits model through `toolchain.pipeline.run` (recipe `default`, `--erase 7`):
  prune 0.3 -> finetune bilevel 50 steps, `mixed_precision=bf16`, gradient checkpointing, teacher
  sampled on the device -> ONNX export of that CUDA-trained artifact (parity against PyTorch) ->
  benchmark stage under the `cuda` profile (PyTorch UNet latency at batch 2 on the GPU, CUDA peak
  memory, ONNX Runtime rows, leakage of 7). Checks: the lower loss is finite and falls.
- sfd: the finetune stage again on the same pruned model, `finetune.mode=sfd`, 20 steps, bf16.
- unet: the SD-1.5 UNet (configs/models/sd15-unet.json, random weights, 64x64 latents = 512x512 px)
  pruned 0.3 by `toolchain.pruning` (on the CPU, as the prune stage does); PyTorch latency per UNet
  call at batch 2, fp32 and fp16, unpruned and pruned (`benchmarks.latency.torch_unet_latency`);
  then steps/s and peak GPU memory of bilevel steps at batch 4 and 8 with the finetune stage's own
  `train` (bf16, gradient checkpointing, teacher = the unpruned UNet, EraseDiff upper step every 5
  steps, random latents and text embeddings: the shapes, not the values, set the cost).

The parts run in a child process started by `accelerate launch --num_processes 1` (this script
re-launches itself through `python -m accelerate.commands.launch`, `--mixed_precision bf16`, plus
`--cpu` for `--device cpu`), so Accelerate sets the process up as it does for users. The parent
refuses `--device cuda` without a GPU (one line, exit 2), waits, and renders the Markdown table.
Each part is recorded on its own: a part that fails leaves its error in the JSON and the others
still run (`--parts digits,sfd` runs a subset). `--time-limit` (480 s, the 8-minute budget) kills
the check and keeps the parts that finished. Exit 0: every part ran and every check held; 1:
otherwise; 2: bad input.

On the GPU machine, from the repository root, with what it lacks carried as wheels in .whl/ (beside
torch, accelerate, onnx and onnxruntime the check imports diffusers, transformers, tokenizers,
huggingface_hub, safetensors, torch-pruning, pyyaml, tqdm, regex, pillow, matplotlib, scikit-learn, scipy):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 && python3 device_tests/gpu_check.py --device cuda --out $OUT/gpu-check --work /tmp/gpu-check-runs

Writes `<out>/gpu-check.json` (figures: name, value, unit, what it is, device), `<out>/gpu-check.md`
(rendered from the JSON by `render_markdown`) and `<out>/gpu-check.log`. On CPU, with tiny shapes
(tests/assets/tiny-sd's UNet for SD-1.5, fewer steps and samples; what CI and tests/test_gpu_check.py run):

    OMP_NUM_THREADS=1 python device_tests/gpu_check.py --device cpu --tiny --out runs/gpu-check-cpu
    python device_tests/gpu_check.py --render runs/gpu-check-cpu/gpu-check.json   # the table again
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_UNET = ROOT / "tests" / "assets" / "tiny-sd" / "unet" / "config.json"
RESULT_NAME = "gpu-check"
PSNR_FLOOR_DB = 35.0
logger = logging.getLogger(__name__)

# Sizes of the two modes. full: the settings; tiny: the same code on tiny shapes for a CPU smoke run.
SIZES = {
    "full": {
        "unet_config": "sd15",
        "unet_name": "SD-1.5 UNet (sd15-unet.json, 64x64 latent, 512x512 px)",
        "digits_steps": 50,
        "digits": [],
        "sfd_steps": 20,
        "sfd": [],
        "benchmark": ["benchmark.eval_images_per_prompt=1"],
        "train_batches": (4, 8),
        "train_warmup_steps": 2,
        "train_steps": 10,
        "latency_warmup": 3,
        "latency_repeats": 20,
    },
    "tiny": {
        "unet_config": str(TINY_UNET),
        "unet_name": "tiny-sd UNet (tests/assets/tiny-sd, 8x8 latent)",
        "digits_steps": 12,
        "digits": [
            "finetune.samples_per_prompt=1",
            "finetune.sample_steps=3",
            "finetune.batch_size=8",
            "finetune.upper_batch_size=8",
            "finetune.upper_every=4",
            "finetune.lower_lr=1e-3",
        ],
        "sfd_steps": 3,
        "sfd": ["finetune.batch_size=4", "finetune.upper_batch_size=4"],
        # export the trained UNet only: the benchmark's per-component memory children cost seconds each
        "benchmark": [
            "export.components=[unet]",
            "benchmark.judge=none",
            "benchmark.warmup=1",
            "benchmark.repeats=3",
        ],
        "train_batches": (4, 8),
        "train_warmup_steps": 1,
        "train_steps": 3,
        "latency_warmup": 1,
        "latency_repeats": 3,
    },
}


# ----------------------------------------------------------------------------------------------
# Figures: one row per number, saying what it is and where it was measured


def figure(name: str, value, unit: str, what: str, device: str) -> dict:
    """One measured number; `name` starts with its part (`digits.`, `sfd.`, `unet.`)."""
    if isinstance(value, float):
        value = round(value, 6) if math.isfinite(value) else str(value)  # JSON has no NaN
    return {"name": name, "value": value, "unit": unit, "what": what, "device": device}


@dataclass
class Check:
    """State shared by the parts of one run inside the launched child."""

    args: argparse.Namespace
    sizes: dict
    device: str  # "cuda" or "cpu"
    labels: dict[str, str]  # "cuda"/"cpu" -> a readable device name
    result: dict
    unets: dict = field(default_factory=dict)  # teacher/student of the `unet` part, built once

    def label(self, kind: str) -> str:
        return self.labels.get(kind, kind)

    def save(self) -> None:
        """Rewrite the JSON after every part: a run cut short still leaves what it measured."""
        path = self.args.out / f"{RESULT_NAME}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.result, indent=1) + "\n")
        os.replace(tmp, path)


def device_labels() -> dict[str, str]:
    import torch

    from benchmarks.latency import machine_info

    machine = machine_info()
    labels = {"cpu": f"cpu ({machine['cpu']}, {torch.get_num_threads()} threads)"}
    if torch.cuda.is_available():
        labels["cuda"] = f"cuda ({torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda})"
    return labels


# ----------------------------------------------------------------------------------------------
# Part digits: the real chain on the embedded digits model


def digits_overrides(check: Check, mode: str) -> list[str]:
    sizes = check.sizes
    common = [
        "prune.ratio=0.3",
        "finetune.enabled=true",
        "finetune.mixed_precision=bf16",
        "finetune.gradient_checkpointing=true",
        "benchmark.profile=cuda",
    ]
    if mode == "bilevel":
        steps = sizes["digits_steps"]
        # one checkpoint mid-run: saving from the device is a CUDA path too
        return [*common, "finetune.mode=bilevel", f"finetune.steps={steps}", f"finetune.checkpoint_every={steps // 2}"]
    return [*common, "finetune.mode=sfd", f"finetune.steps={check.sizes['sfd_steps']}", *sizes["sfd"]]


def part_digits(check: Check) -> tuple[list[dict], dict[str, bool]]:
    """prune -> bilevel finetune (bf16, gradient checkpointing) -> export -> benchmark (cuda profile)."""
    from toolchain.config import load_config
    from toolchain.models.io import EMBEDDED_MODEL
    from toolchain.pipeline import run

    overrides = [*digits_overrides(check, "bilevel"), *check.sizes["digits"], *check.sizes["benchmark"]]
    cfg, _ = load_config("default", "onnx", overrides, erase=["7"])
    chain = run(cfg, EMBEDDED_MODEL, check.args.work / "digits", force=True, progress=False)
    by_stage = {a.stage: a for a in chain}
    figures, checks = prune_figures(check, by_stage["source"], by_stage["prune"])
    more, more_checks = finetune_figures(check, by_stage["finetune"], "digits")
    figures += more
    checks.update(more_checks)
    more, more_checks = export_figures(check, by_stage["export"])
    figures += more
    checks.update(more_checks)
    figures += benchmark_figures(check, by_stage["benchmark"])
    figures.append(fp16_figure(check, by_stage["finetune"]))
    return figures, checks


def prune_figures(check: Check, source, pruned) -> tuple[list[dict], dict[str, bool]]:
    before, after = source.metrics["params"]["unet"], pruned.metrics["params"]["unet"]
    cpu = check.label("cpu")
    figures = [
        figure("digits.prune.unet_params_before", before, "params", "digits UNet parameters before pruning", cpu),
        figure("digits.prune.unet_params_after", after, "params", "after channel pruning 0.3 (prune stage)", cpu),
    ]
    return figures, {"digits.prune_removes_params": after < before}


def read_losses(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "losses.jsonl").read_text().splitlines() if line.strip()]


def finetune_figures(check: Check, artifact, part: str) -> tuple[list[dict], dict[str, bool]]:
    """Steps/s, set-up time (teacher sampling on the device) and the loss trajectory of a finetune artifact."""
    summary = artifact.records["finetune"]
    device = check.label(check.device)
    mode = summary["mode"]
    steps_per_s = summary["steps"] / summary["wall_s"] if summary["wall_s"] else None
    setup_s = artifact.metrics["wall_s"] - summary["wall_s"] if "wall_s" in artifact.metrics else None
    figures = [
        figure(
            f"{part}.finetune.steps",
            summary["steps"],
            "steps",
            f"finetune {mode} steps, bf16, gradient checkpointing",
            device,
        ),
        figure(f"{part}.finetune.steps_per_s", steps_per_s, "steps/s", f"finetune {mode} training loop", device),
        figure(
            f"{part}.finetune.setup_s",
            setup_s,
            "s",
            "finetune stage time outside the loop (loading, teacher sampling on the device)",
            device,
        ),
    ]
    losses = read_losses(artifact.path)
    key = "lower" if mode != "sfd" else "g_loss"
    values = [row[key] for row in losses if key in row]
    finite = bool(values) and all(math.isfinite(v) for v in values)
    k = max(1, len(values) // 5)
    first, last = sum(values[:k]) / k, sum(values[-k:]) / k
    what = f"mean {key} loss of the first {k} steps" if mode != "sfd" else f"mean generator loss of the first {k} steps"
    figures += [
        figure(f"{part}.finetune.loss_first", first, "loss", what, device),
        figure(f"{part}.finetune.loss_last", last, "loss", what.replace("first", "last"), device),
    ]
    checks = {f"{part}.loss_finite": finite}
    if mode != "sfd":  # SFD's generator loss is a score difference, not expected to fall in 20 steps
        checks[f"{part}.loss_falling"] = finite and last < first
        upper = sum(1 for row in losses if "upper" in row)
        figures.append(figure(f"{part}.finetune.upper_steps", upper, "steps", "upper (unlearning) steps taken", device))
    return figures, checks


def export_figures(check: Check, artifact) -> tuple[list[dict], dict[str, bool]]:
    """Parity of the ONNX export of the CUDA-trained artifact: ONNX Runtime (CPU) vs PyTorch (CPU)."""
    where = "ONNX Runtime CPU vs PyTorch CPU"
    figures, ok = [], bool(artifact.metrics["parity"])
    for row in artifact.metrics["parity"]:
        name = f"digits.export.{row['component']}"
        figures += [
            figure(
                f"{name}.max_abs_err",
                row["max_abs_err"],
                "abs",
                f"max abs error, tolerance {row['tolerance']:g}",
                where,
            ),
            figure(
                f"{name}.psnr_db", row["psnr_db"], "dB", f"PSNR of the ONNX output, floor {PSNR_FLOOR_DB:g} dB", where
            ),
        ]
        ok = ok and row["max_abs_err"] <= row["tolerance"] and row["psnr_db"] >= PSNR_FLOOR_DB
    return figures, {"digits.export_parity": ok}


def benchmark_figures(check: Check, artifact) -> list[dict]:
    """The benchmark stage's own rows under the `cuda` profile: PyTorch (device), ONNX Runtime, memory, leakage."""
    report = json.loads((artifact.path / "report.json").read_text())
    check.result["warnings"] += [f"digits benchmark: {w}" for w in report.get("warnings", [])]
    figures = []
    for row in report["latency"]:
        if row["component"] != "unet":
            continue
        where = check.label(row["provider"]) if row["runtime"] == "torch" else f"onnxruntime {row['provider']}"
        name = f"digits.benchmark.{row['runtime']}.unet.{row['stage']}.median_ms"
        what = f"UNet call at batch {row['batch']}, fp32, profile {row['profile']} (benchmark stage)"
        figures.append(figure(name, row["median_ms"], "ms", what, where))
    for row in report["memory"]:
        if "cuda_peak_bytes" in row:
            name = f"digits.benchmark.torch.unet.{row['stage']}.cuda_peak_bytes"
            what = "peak CUDA memory of one UNet call at batch 2 (benchmark stage)"
            figures.append(figure(name, row["cuda_peak_bytes"], "bytes", what, check.label("cuda")))
    for stage in report["stages"]:  # judged where the chain has a judge (full mode: digits, erase 7)
        if "leakage" in stage:
            where = "cpu (judge)" if stage["name"] != "export" else "onnxruntime (judge)"
            what = f"share of the {stage['name']} model's images of the erased 7 judged as 7 (benchmark stage)"
            figures.append(
                figure(f"digits.benchmark.{stage['name']}.leakage_7", stage["leakage"].get("7"), "share", what, where)
            )
            what = f"share of the {stage['name']} model's retained-digit images judged as prompted"
            figures.append(
                figure(
                    f"digits.benchmark.{stage['name']}.retain_accuracy",
                    stage.get("retain_accuracy"),
                    "share",
                    what,
                    where,
                )
            )
    return figures


def fp16_figure(check: Check, artifact) -> dict:
    """The fp16 twin of the benchmark stage's fp32 row: the finetuned UNet at batch 2, same harness."""
    import numpy as np
    import torch

    from benchmarks.latency import torch_unet_latency
    from toolchain.models.io import load_unet
    from toolchain.runtime.ort import component_inputs

    unet = load_unet(artifact.files / "unet").to(torch.float16)
    inputs = component_inputs(artifact.files, "unet", 2)
    inputs = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in inputs.items()}
    timing = torch_unet_latency(
        unet, inputs, check.sizes["latency_warmup"], check.sizes["latency_repeats"], check.device
    )
    what = f"finetuned digits UNet, one call at batch 2, fp16, median of {timing['repeats']} (benchmarks.latency)"
    return figure("digits.latency.finetune.fp16.median_ms", timing["median_ms"], "ms", what, check.label(check.device))


# ----------------------------------------------------------------------------------------------
# Part sfd: the finetune stage in SFD mode on the pruned digits model


def part_sfd(check: Check) -> tuple[list[dict], dict[str, bool]]:
    """Calls the finetune stage itself (`STAGES["finetune"].run`) on the digits part's sealed prune artifact."""
    from toolchain import artifact as art
    from toolchain.config import load_config
    from toolchain.pipeline import STAGES, RunContext

    run_dir = check.args.work / "digits"
    if not (run_dir / "01-prune" / art.MANIFEST).is_file():
        raise RuntimeError(f"{run_dir}/01-prune is not sealed: the digits part must prune first")
    source, pruned = art.load(run_dir / "00-source"), art.load(run_dir / "01-prune")
    cfg, _ = load_config("default", "onnx", digits_overrides(check, "sfd"), erase=["7"])
    out = check.args.work / "digits-sfd"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    stage = STAGES["finetune"]
    ctx = RunContext(run_dir=check.args.work, out_dir=out, chain=[source, pruned], progress=False)
    started = time.perf_counter()
    result = stage.run(pruned, stage.settings(cfg), ctx)
    result.path = out
    result.metrics["wall_s"] = time.perf_counter() - started
    return finetune_figures(check, result, "sfd")


# ----------------------------------------------------------------------------------------------
# Part unet: SD-1.5 (or tiny) UNet, pruned; latency fp32/fp16 and bilevel training speed


def unets(check: Check) -> dict:
    """{"teacher": unpruned, "student": pruned 0.3 (magnitude), "config": dict}, built once on the CPU."""
    if not check.unets:
        import copy

        from toolchain.models.architectures import build_unet_from_config, resolve_unet_config
        from toolchain.pruning.channels import prune_unet_channels

        path = resolve_unet_config(check.sizes["unet_config"])
        teacher = build_unet_from_config(path, seed=0)
        student = copy.deepcopy(teacher)
        started = time.perf_counter()
        prune_unet_channels(student, ratio=0.3, importance="magnitude")
        check.unets = {
            "teacher": teacher,
            "student": student.eval(),
            "config": json.loads(path.read_text()),
            "prune_s": time.perf_counter() - started,
        }
    return check.unets


def part_unet_prune(check: Check) -> tuple[list[dict], dict[str, bool]]:
    built = unets(check)
    before = sum(p.numel() for p in built["teacher"].parameters())
    after = sum(p.numel() for p in built["student"].parameters())
    cpu, name = check.label("cpu"), check.sizes["unet_name"]
    figures = [
        figure("unet.prune.params_before", before, "params", name, cpu),
        figure("unet.prune.params_after", after, "params", f"{name}, channels pruned 0.3 (magnitude)", cpu),
        figure("unet.prune.prune_s", built["prune_s"], "s", "toolchain.pruning.channels.prune_unet_channels", cpu),
    ]
    return figures, {"unet.prune_removes_params": after < before}


def unet_inputs(config: dict, batch: int, dtype, seq: int = 77, seed: int = 0) -> dict:
    """sample (B, C, h, w), timestep (B,), encoder_hidden_states (B, seq, D) as numpy, floats in `dtype`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    side = config["sample_size"]
    return {
        "sample": rng.standard_normal((batch, config["in_channels"], side, side)).astype(dtype),
        "timestep": np.full((batch,), 500, dtype=np.int64),
        "encoder_hidden_states": rng.standard_normal((batch, seq, config["cross_attention_dim"])).astype(dtype),
    }


def part_unet_latency(check: Check) -> tuple[list[dict], dict[str, bool]]:
    """PyTorch latency per UNet call at batch 2 (one guided image), fp32 and fp16, unpruned and pruned."""
    import numpy as np
    import torch

    from benchmarks.latency import torch_unet_latency

    built, sizes = unets(check), check.sizes
    figures, positive = [], True
    for variant in ("teacher", "student"):
        unet = built[variant]
        for dtype, np_dtype in ((torch.float32, np.float32), (torch.float16, np.float16)):
            unet.to(dtype)
            inputs = unet_inputs(built["config"], 2, np_dtype)
            timing = torch_unet_latency(unet, inputs, sizes["latency_warmup"], sizes["latency_repeats"], check.device)
            label = "fp32" if dtype == torch.float32 else "fp16"
            name = f"unet.latency.{'unpruned' if variant == 'teacher' else 'pruned'}.{label}.median_ms"
            what = f"{sizes['unet_name']}{', pruned 0.3' if variant == 'student' else ''}: one call at batch 2, {label}, median of {timing['repeats']}"
            figures.append(figure(name, timing["median_ms"], "ms", what, check.label(check.device)))
            positive = positive and timing["median_ms"] > 0
        unet.to(torch.float32)
    return figures, {"unet.latency_positive": positive}


def synthetic_data(config: dict, batch: int, seq: int = 77, seed: int = 0):
    """`finetune.TrainingData` of random latents and prompt embeddings: rows 0..B-1 retain, B..2B-1 forget."""
    import torch

    from toolchain.finetune import TrainingData

    g = torch.Generator().manual_seed(seed)
    side = config["sample_size"]
    rows = torch.arange(2 * batch)
    return TrainingData(
        latents=torch.randn((2 * batch, config["in_channels"], side, side), generator=g),
        emb=torch.randn((4, seq, config["cross_attention_dim"]), generator=g),  # "", retain, forget, anchor
        retain_rows=rows[:batch],
        retain_pids=torch.full((batch,), 1),
        forget_rows=rows[batch:],
        forget_pids=torch.full((batch,), 2),
        anchor_pids=torch.full((batch,), 3),
        anchor_rows=rows[:batch],
    )


def part_unet_train(check: Check) -> tuple[list[dict], dict[str, bool]]:
    """Bilevel steps/s and peak memory of the finetune stage's `train` on the pruned UNet, per batch."""
    from toolchain.models.io import EMBEDDED_MODEL

    built = unets(check)
    scheduler_config = json.loads((EMBEDDED_MODEL / "scheduler" / "scheduler_config.json").read_text())
    figures, checks = [], {}
    for batch in check.sizes["train_batches"]:
        timing = time_bilevel(check, built, batch, scheduler_config)
        device, name = check.label(check.device), f"unet.bilevel.batch{batch}"
        what = f"{check.sizes['unet_name']} pruned 0.3, bilevel (EraseDiff upper step every 5), bf16, gradient checkpointing"
        figures += [
            figure(
                f"{name}.steps_per_s",
                timing["steps_per_s"],
                "steps/s",
                f"{what}; mean of {timing['steps']} steps",
                device,
            ),
            figure(f"{name}.peak_memory_bytes", timing["peak_bytes"], "bytes", timing["memory_what"], device),
            figure(f"{name}.loss_last", timing["loss"], "loss", "lower loss of the last timed step", device),
        ]
        checks[f"{name}.loss_finite"] = math.isfinite(timing["loss"])
    return figures, checks


def time_bilevel(check: Check, built: dict, batch: int, scheduler_config: dict) -> dict:
    """One warm-up call of `train`, then a timed one; `steps` is one more than run so that no
    end-of-run checkpoint (GBs for SD-1.5) lands inside the timed loop."""
    import torch

    from toolchain.config import FinetuneConfig
    from toolchain.finetune import train

    data = synthetic_data(built["config"], batch)
    warm, timed = check.sizes["train_warmup_steps"], check.sizes["train_steps"]
    cfg = FinetuneConfig(
        mode="bilevel",
        objective="erasediff",
        batch_size=batch,
        upper_batch_size=batch,
        upper_every=5,
        steps=timed + 1,
        lower_lr=1e-6,
        upper_lr=5e-6,
        mixed_precision="bf16",
        gradient_checkpointing=True,
        checkpoint_every=10**6,
    )
    work = check.args.work / f"unet-train-batch{batch}"
    args = (built["student"], built["teacher"], data, cfg, scheduler_config)
    shutil.rmtree(work, ignore_errors=True)
    train(*args, work / "warmup", stop_after=warm)
    release_memory()
    if check.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _, summary = train(*args, work / "timed", stop_after=timed)
    built["student"].eval()
    if check.device == "cuda":
        peak, memory_what = (
            torch.cuda.max_memory_allocated(),
            "peak CUDA memory allocated (torch.cuda.max_memory_allocated) in the timed call",
        )
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        memory_what = "peak RSS of the whole check process so far (CPU run: no per-call peak)"
    loop_s = summary["wall_s"]
    return {
        "steps": timed,
        "steps_per_s": timed / loop_s if loop_s else None,
        "peak_bytes": int(peak),
        "memory_what": memory_what,
        "loss": float(summary["final"]["lower"]),
    }


def release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Running the parts (inside the launched child)

PARTS = {
    "digits": part_digits,
    "sfd": part_sfd,
    "unet_prune": part_unet_prune,
    "unet_latency": part_unet_latency,
    "unet_train": part_unet_train,
}


def run_parts(args: argparse.Namespace) -> int:
    import torch

    from benchmarks.latency import machine_info
    from toolchain.pipeline import library_versions

    sizes = SIZES["tiny" if args.tiny else "full"]
    result = {
        "schema": "gpu-check/1",
        "command": args.command,
        "device": args.device,
        "mode": "tiny" if args.tiny else "full",
        "unet_architecture": sizes["unet_name"],
        "machine": {**machine_info(), "torch_threads": torch.get_num_threads()},
        "versions": {**library_versions(), "python": sys.version.split()[0], "cuda": torch.version.cuda},
        "launcher": {k: v for k, v in os.environ.items() if k.startswith("ACCELERATE_")},
        "parts": {},
        "checks": {},
        "figures": [],
        "warnings": [],
    }
    check = Check(args=args, sizes=sizes, device=args.device, labels=device_labels(), result=result)
    result["machine"]["device"] = check.label(args.device)
    started = time.perf_counter()
    for name in args.parts:
        run_part(check, name, PARTS[name])
        release_memory()
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["ok"] = all(p["ok"] for p in result["parts"].values()) and all(result["checks"].values())
    check.save()
    return 0 if result["ok"] else 1


def run_part(check: Check, name: str, part) -> None:
    """Run one part; its figures and checks, or its error, go into the JSON at once."""
    logger.info("part %s: running", name)
    started = time.perf_counter()
    entry: dict = {"ok": False}
    try:
        figures, checks = part(check)
        check.result["figures"] += figures
        check.result["checks"].update(checks)
        entry["ok"] = True
    except Exception as exc:  # recorded, so that one failing CUDA path does not hide the others
        logger.error("part %s failed:\n%s", name, traceback.format_exc())
        entry["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    entry["wall_s"] = round(time.perf_counter() - started, 1)
    check.result["parts"][name] = entry
    logger.info("part %s: %s in %.1f s", name, "ok" if entry["ok"] else "FAILED", entry["wall_s"])
    check.save()


# ----------------------------------------------------------------------------------------------
# The Markdown table, rendered from the JSON


def render_markdown(result: dict) -> str:
    machine, versions = result["machine"], result["versions"]
    lines = [
        f"# CUDA path check ({result['mode']}, --device {result['device']})",
        "",
        f"- device: {machine.get('device', result['device'])}; host {machine['cpu']}, {machine['cores']} cores",
        f"- libraries: {', '.join(f'{k} {v}' for k, v in versions.items() if v)}",
        f"- command: `{result['command']}` (parts under `accelerate launch --num_processes 1`)",
        f"- unet part: {result['unet_architecture']}; wall {result.get('wall_s', '?')} s; "
        f"result: {'ok' if result.get('ok') else 'FAILED'}",
        "",
        "| part | ok | wall s | error |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {'yes' if p['ok'] else 'NO'} | {p['wall_s']} | {p.get('error', '')} |"
        for name, p in result["parts"].items()
    ]
    lines += ["", "| check | holds |", "|---|---|"]
    lines += [f"| {name} | {'yes' if ok else 'NO'} |" for name, ok in result["checks"].items()]
    lines += ["", "| figure | value | unit | device | what |", "|---|---|---|---|---|"]
    for row in result["figures"]:
        value = row["value"]
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"| {row['name']} | {shown} | {row['unit']} | {row['device']} | {row['what']} |")
    if result.get("warnings"):
        lines += ["", "Warnings:", *[f"- {w}" for w in result["warnings"]]]
    return "\n".join(lines) + "\n"


def write_markdown(json_path: Path) -> str:
    table = render_markdown(json.loads(json_path.read_text()))
    json_path.with_suffix(".md").write_text(table)
    return table


# ----------------------------------------------------------------------------------------------
# The parent: refuse, launch under accelerate, render


def launch(args: argparse.Namespace) -> int:
    """Re-run this script under `accelerate launch --num_processes 1`; kill its process group on timeout."""
    threads = os.environ.get("OMP_NUM_THREADS") or str(os.cpu_count() or 1)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    cmd += ["--mixed_precision", "bf16", "--dynamo_backend", "no", "--num_cpu_threads_per_process", threads]
    cmd += ["--cpu"] if args.device == "cpu" else []
    cmd += [str(Path(__file__).resolve()), "--device", args.device, *(["--tiny"] if args.tiny else [])]
    cmd += ["--out", str(args.out), "--work", str(args.work), "--parts", ",".join(args.parts)]
    cmd += ["--command", args.command, "--launched"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU check stays on the CPU even on a GPU machine
    (args.out / f"{RESULT_NAME}.json").unlink(missing_ok=True)
    child = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    try:
        code = child.wait(timeout=args.time_limit)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        print(f"gpu_check: stopped after --time-limit {args.time_limit} s; the JSON holds the parts that finished")
        code = 1
    json_path = args.out / f"{RESULT_NAME}.json"
    if not json_path.is_file():
        print(f"gpu_check: the launched check wrote no {json_path.name} (exit {code}); see {args.out}/gpu-check.log")
        return 1
    print(write_markdown(json_path))
    return code


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and few steps (CPU smoke run)")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-check"), help="where gpu-check.json/.md/.log go")
    parser.add_argument("--work", type=Path, help="run folders (default: <out>/runs)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--time-limit", type=int, default=480, help="seconds before the launched check is killed")
    parser.add_argument("--render", type=Path, metavar="JSON", help="only render JSON to a .md table beside it")
    parser.add_argument("--launched", action="store_true", help=argparse.SUPPRESS)  # set by launch()
    parser.add_argument("--command", help=argparse.SUPPRESS)  # the user's command, passed to the child
    args = parser.parse_args(argv)
    args.parts = args.parts.split(",")
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {','.join(PARTS)}")
    args.command = args.command or " ".join(["python", "device_tests/gpu_check.py", *argv])
    args.out = args.out.resolve()
    args.work = (args.work or args.out / "runs").resolve()
    return args


def configure_logging(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers = [logging.StreamHandler(), logging.FileHandler(out / f"{RESULT_NAME}.log", mode="w")]
    for handler in handlers:
        handler.setFormatter(fmt)
    logging.basicConfig(level=logging.INFO, handlers=handlers)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.render:
        print(write_markdown(args.render))
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: --device cuda asked but torch sees no CUDA GPU; run on a GPU machine or pass --device cpu --tiny",
            file=sys.stderr,
        )
        return 2
    if not args.launched:
        args.out.mkdir(parents=True, exist_ok=True)
        return launch(args)
    configure_logging(args.out)
    args.work.mkdir(parents=True, exist_ok=True)
    return run_parts(args)


if __name__ == "__main__":
    raise SystemExit(main())
