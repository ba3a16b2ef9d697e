"""Time and peak memory of exporting the SD-1.5 UNet (860M params, random weights) to ONNX and Core ML.

    python -m benchmarks.studies.export_sd15 [--targets onnx coreml] [--threads 1] [--out benchmarks/results/export-sd15.json]

Each target runs in a fresh child process (`python -m benchmarks.memory`, as the memory benchmark
does), so its peak memory belongs to that export alone. The child builds the UNet from the
committed config (configs/models/sd15-unet.json, fp32, `--seed`) inside a StableDiffusionPipeline
whose text encoder and VAE are the small embedded digits ones (the text encoder given 77
positions, SD's prompt length: the UNet's example inputs take their sequence length from it), then
calls the pipeline's own exporter for the UNet alone:

- onnx: `export.onnx.export_onnx(pipe, out, components=("unet",))`: TorchScript trace at batch 2,
  weights gathered into `unet/model.onnx_data` (SD-1.5 passes protobuf's 2 GiB), parity against
  PyTorch in ONNX Runtime at batch 3 (max abs error, PSNR).
- coreml: `export.coreml.export_coreml(pipe, out, components=("unet",))` with the coreml stage's
  defaults: fp16 ML program, iOS17 target, no compression. Conversion only: Core ML cannot load or
  run a model off macOS, so the package is checked by its spec.

Per target: wall time of the build and of each phase the exporter reports (its `phases_s`), the
child's peak RSS (VmHWM: the kernel's exact high-water mark), the peak RSS attributed to each
phase (sampled every 50 ms in the child), the peak RSS summed over the child and any processes it
starts (sampled every 200 ms from here), and the output's size. Writes the JSON and a Markdown table
beside it, both naming the machine, library versions and command. `--config` takes another UNet
config (e.g. a small SD-1.x-layout one to try the script in seconds).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TARGETS = ("onnx", "coreml")
ROOT = Path(__file__).resolve().parents[2]
SAMPLE_S = 0.05  # RSS sampling period inside the child
POLL_S = 0.2  # process-tree RSS polling period in the parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_versions() -> dict[str, str]:
    """Read from the installed distributions, without importing torch into this (parent) process."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for dist in ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "coremltools", "numpy"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            found[dist] = "not installed"
    return found


def build_pipeline(config: str, seed: int, seq_len: int = 77):
    """A StableDiffusionPipeline (fp32, eval) around the UNet of `config` with random weights under `seed`.

    The exporters read shapes from the whole pipeline (sequence length from the text encoder, the
    VAE's scale factor), so it gets the embedded digits model's small text encoder (re-made with
    `seq_len` positions) and VAE; only the UNet is exported.
    """
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from toolchain.models.architectures import build_unet_from_config
    from toolchain.models.io import EMBEDDED_MODEL, assemble_pipeline, load_pipeline

    small = load_pipeline(EMBEDDED_MODEL)
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(**{**small.text_encoder.config.to_dict(), "max_position_embeddings": seq_len})
    text_encoder = CLIPTextModel(text_config).eval()
    unet = build_unet_from_config(config, seed=seed)
    pipe = assemble_pipeline(unet, small.vae, text_encoder, small.tokenizer, small.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _rss_bytes() -> tuple[int, int]:
    """(VmRSS, RssAnon) of this process. RssAnon leaves out file-backed pages: ONNX Runtime maps an
    external-data file read-only, so the weights it reads back count in VmRSS but the kernel can drop
    them under pressure."""
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in ("VmRSS", "RssAnon"):
            found[key] = int(line.split()[1]) * 1024
    return found.get("VmRSS", 0), found.get("RssAnon", 0)


class PhaseMemory(logging.Handler):
    """Peak RSS of this process per export phase.

    The exporters log `extra={"phase": name}` when a phase starts and `extra={"phase_done": name}`
    when it ends; a thread samples VmRSS every SAMPLE_S seconds and keeps the maximum under the
    current phase's name ("other" between phases). A phase shorter than SAMPLE_S may be missed.
    """

    def __init__(self, start_phase: str = "other"):
        super().__init__(level=logging.DEBUG)
        self.phase = start_phase
        self.peaks: dict[str, int] = {}
        self.anon_peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "phase", None):
            self._record()
            self.phase = record.phase
        elif getattr(record, "phase_done", None):
            self._record()
            self.phase = "other"

    def set_phase(self, phase: str) -> None:
        self._record()
        self.phase = phase

    def _record(self) -> None:
        rss, anon = _rss_bytes()
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)
        self.anon_peaks[self.phase] = max(self.anon_peaks.get(self.phase, 0), anon)

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._record()

    def __enter__(self):
        exporters = logging.getLogger("export")
        self._level = exporters.level
        exporters.setLevel(logging.INFO)  # phase records are INFO
        exporters.addHandler(self)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._record()
        exporters = logging.getLogger("export")
        exporters.removeHandler(self)
        exporters.setLevel(self._level)


def export_target(target: str, config: str, seed: int, out_dir: str, threads: int) -> dict:
    """Run in the child (`benchmarks.memory` spec): build the pipeline, export its UNet to `target`."""
    import torch

    from benchmarks.memory import mark_runtime

    torch.set_num_threads(threads)
    if target == "onnx":
        import onnxruntime  # noqa: F401  (counted in the runtime's share, as the export imports it)

        from export.onnx import export_onnx as export
    elif target == "coreml":
        import coremltools  # noqa: F401

        from export.coreml import export_coreml as export
    else:
        raise ValueError(f"target {target!r}: must be one of {list(TARGETS)}")
    # The exporters' phase messages are the progress display, as under the CLI; other libraries'
    # INFO chatter (coremltools logs every pass it removes an op in) stays off.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    mark_runtime()

    with PhaseMemory(start_phase="build") as memory:
        start = time.perf_counter()
        pipe = build_pipeline(config, seed)
        build_s = time.perf_counter() - start
        params = sum(p.numel() for p in pipe.unet.parameters())
        memory.set_phase("other")
        start = time.perf_counter()
        result = export(pipe, Path(out_dir), components=("unet",), progress=True)
        export_s = time.perf_counter() - start
        del pipe
    entry = result["files"]["unet"]
    return {
        "params": params,
        "build_s": round(build_s, 2),
        "export_s": round(export_s, 2),
        "phases_s": entry.get("phases_s"),
        "phase_peak_rss_bytes": memory.peaks,
        "phase_peak_anon_bytes": memory.anon_peaks,
        "output": entry,
        "output_bytes": sum(p.stat().st_size for p in Path(out_dir).rglob("*") if p.is_file()),
        "parity": result.get("parity"),
        "spec": result.get("spec", {}).get("unet"),
    }


def run_target(target: str, args, out_dir: Path) -> dict:
    """One fresh child per target; its peak RSS (VmHWM) and the polled peak of its process tree."""
    kwargs = {"target": target, "config": str(args.config_path), "seed": args.seed, "out_dir": str(out_dir)}
    return run_child("benchmarks.studies.export_sd15:export_target", {**kwargs, "threads": args.threads}, args.timeout)


def run_child(fn: str, kwargs: dict, timeout: float) -> dict:
    """`fn(**kwargs)` in a fresh child (`python -m benchmarks.memory`): its result with the wall time,
    the child's peak RSS (VmHWM) and the polled peak RSS of its process tree."""
    import psutil  # a dependency of accelerate

    target, spec = fn.rsplit(":", 1)[-1], [fn, kwargs]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryFile("w+") as stdout:
        start = time.perf_counter()
        # stderr stays on the terminal: the exporter's progress shows live
        process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.memory", json.dumps(spec)], stdout=stdout, env=env, cwd=ROOT
        )
        tree_peak = 0
        root = psutil.Process(process.pid)
        while process.poll() is None:
            total = 0
            try:
                for proc in [root, *root.children(recursive=True)]:
                    total += proc.memory_info().rss
            except psutil.Error:  # a process ended between listing and reading
                pass
            tree_peak = max(tree_peak, total)
            if time.perf_counter() - start > timeout:
                process.kill()
                process.wait()
                raise TimeoutError(f"{target}: ran past --timeout {timeout} s")
            time.sleep(POLL_S)
        wall_s = time.perf_counter() - start
        stdout.seek(0)
        text = stdout.read()
    if process.returncode != 0:
        raise RuntimeError(f"{target}: child exited {process.returncode} (see its stderr above)")
    child = json.loads(text.strip().splitlines()[-1])
    row = child["result"]
    row["wall_s"] = round(wall_s, 1)
    row["peak_rss_bytes"] = child["peak_rss_bytes"]
    row["runtime_rss_bytes"] = child["runtime_rss_bytes"]
    row["tree_peak_rss_bytes"] = tree_peak
    return row


def to_markdown(result: dict) -> str:
    gib = 2**30
    lines = [
        f"# SD-1.5 UNet export: time and peak memory ({result['config']})",
        "",
        f"- machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, "
        f"{result['machine']['memory_gib']} GiB RAM ({result['machine']['available_gib_at_start']} GiB available "
        f"at start, shared with other jobs), {result['machine']['threads']} torch thread(s)",
        f"- libraries: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}",
        f"- command: `{result['command']}`",
        "- UNet: random weights, fp32, exported alone from a pipeline; each target in a fresh child process.",
        "  onnx: TorchScript trace at batch 2, external data, ORT parity at batch 1 on a 32x32 latent (the graph",
        "  as exported, no ORT rewrites). coreml: fp16 ML program,",
        "  iOS17, no compression, conversion only (Linux: no prediction).",
        "- peak RSS: the child's VmHWM; tree: polled sum over the child and its children; per phase: sampled",
        "  every 50 ms in the child (other: outside the named phases, including after the export). Runtime:",
        "  RSS after imports, before the model is built. Anon: the sampled peak of RssAnon, i.e. without",
        "  file-backed pages (ONNX Runtime maps the external-data file it validates read-only: those pages",
        "  count in RSS, yet the kernel drops them under pressure). Times are wall seconds.",
        "",
        "| target | params (M) | wall s | build s | export s | peak RSS GiB | anon peak GiB | tree peak GiB | runtime GiB | output GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for target, row in result["targets"].items():
        if "error" in row:
            lines.append(f"| {target} | failed: {row['error']} | | | | | | | | |")
            continue
        lines.append(
            f"| {target} | {row['params'] / 1e6:.1f} | {row['wall_s']:.0f} | {row['build_s']:.0f} | "
            f"{row['export_s']:.0f} | {row['peak_rss_bytes'] / gib:.2f} | "
            f"{max((row.get('phase_peak_anon_bytes') or {0: 0}).values()) / gib:.2f} | "
            f"{row['tree_peak_rss_bytes'] / gib:.2f} | "
            f"{(row['runtime_rss_bytes'] or 0) / gib:.2f} | {row['output_bytes'] / gib:.2f} |"
        )
    lines += ["", "Phases (wall s / peak RSS GiB / anon peak GiB while in the phase):", ""]
    for target, row in result["targets"].items():
        if "error" in row:
            continue
        phases_s = row.get("phases_s") or {}
        peaks = row.get("phase_peak_rss_bytes") or {}
        anon = row.get("phase_peak_anon_bytes") or {}
        names = ["build", *phases_s, *(p for p in peaks if p not in phases_s and p != "build")]
        cells = []
        for name in names:
            seconds = row["build_s"] if name == "build" else phases_s.get(name)
            peak = peaks.get(name)
            cells.append(
                f"{name} {'-' if seconds is None else f'{seconds:.1f} s'} / "
                f"{'-' if peak is None else f'{peak / gib:.2f} GiB'}"
                f"{'' if name not in anon else f' / {anon[name] / gib:.2f} GiB'}"
            )
        lines.append(f"- {target}: " + "; ".join(cells))
        if row.get("parity"):
            p = row["parity"][0]
            lines.append(f"  - parity vs PyTorch: max abs err {p['max_abs_err']:.3g}, PSNR {p['psnr_db']:.1f} dB")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="sd15", help="UNet config: sd15, sd21-base or a .json path")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in the child (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per target before the child is killed")
    parser.add_argument("--keep", type=Path, default=None, help="write exports under this folder instead of a temp one")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/export-sd15.json"))
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be at least 1")

    import psutil

    from toolchain.models.architectures import resolve_unet_config

    args.config_path = resolve_unet_config(args.config)
    memory = psutil.virtual_memory()
    result = {
        "config": args.config_path.name,
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "threads": args.threads,
            "memory_gib": round(memory.total / 2**30, 1),
            "available_gib_at_start": round(memory.available / 2**30, 1),
            "platform": platform.platform(),
        },
        "versions": library_versions(),
        "command": "python -m benchmarks.studies.export_sd15 " + " ".join(argv if argv is not None else sys.argv[1:]),
        "targets": {},
    }
    failed = False
    for target in args.targets:
        with tempfile.TemporaryDirectory(prefix=f"export-sd15-{target}-") as scratch:
            out_dir = (args.keep / target) if args.keep else Path(scratch) / target
            try:
                row = run_target(target, args, out_dir)
            except (RuntimeError, TimeoutError) as exc:
                failed = True
                row = {"error": str(exc)}
        result["targets"][target] = row
        if "error" in row:
            print(f"{target}: FAILED: {row['error']}", flush=True)
        else:
            print(
                f"{target}: {row['wall_s']:.0f} s, peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB, "
                f"output {row['output_bytes'] / 2**30:.2f} GiB",
                flush=True,
            )
        # ru_maxrss of waited-for children: the largest child of this run so far (KiB on Linux)
        result["max_child_ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        # after every target, so a later target's failure or kill keeps the earlier figures
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    table = to_markdown(result)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
