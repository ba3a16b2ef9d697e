"""The SD-1.5 UNet (860M params, random weights) through the phone targets: conversion time, peak
memory, parity and guidance fidelity through each runtime, and what a phone accelerator takes.

    python -m benchmarks.studies.phone_sd15 [--latent 8] [--rows onnx ort-fixed qnn-fp16 executorch-fp32]
        [--out benchmarks/results/phone-sd15]

Each row runs in a fresh child process (`benchmarks.memory`, as `export_sd15` does), so its peak RSS
is that conversion's alone; the fp32 UNet's weights (3.44 GB) are the yardstick (issue: peak ≤ 2x).
The pipeline is `export_sd15.build_pipeline` (the SD-1.5 UNet config, the digits text encoder with
77 positions), the UNet at a `--latent` x `--latent` latent: the HTP backend here is a simulator,
which takes minutes per SD-1.5 call at full size; the weights, and so the conversion's memory and the
context binary, do not depend on it.

- onnx: `export.onnx.export_onnx` of the text encoder and UNet (dynamic axes, weights in model.onnx_data).
- ort-fixed: that folder fixed to a guided pair and folded (`export.fixed_shapes.fix_folder`, what
  `--target ort` does), with ONNX Runtime's usability figures for NNAPI and the Core ML EP before and after.
- qnn-fp16: the fixed, folded UNet as `--target qnn` prepares it (`export.qnn._write_graph`),
  compiled for the SoC into a context binary, opened from it on the HTP backend (CPU fallback off: it
  opens only if every node runs on the HTP) and compared with the fp32 graph on the CPU provider.
- executorch-fp32: the PyTorch UNet lowered to one XNNPACK program (`export.executorch.export_executorch`)
  and run through ExecuTorch's runtime against PyTorch.

Parity: one guided pair (max abs error, PSNR); guidance: `export.guidance.guidance_fidelity` on random
guided pairs at early, middle and late timesteps (the same latent for both rows, two random prompt
embeddings), one pair per call; on the HTP simulator the parity pair alone (t=500: an SD-1.5 call
there takes tens of minutes), so its guidance is the middle band's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from benchmarks.studies.export_sd15 import build_pipeline, cpu_model, library_versions, run_child

ROWS = ("onnx", "ort-fixed", "qnn-fp16", "executorch-fp32")
TIMESTEPS = (900.0, 500.0, 100.0)  # one guided pair per band of export.guidance.BANDS
GIB = 2**30


def guided_feeds(latent: int, length: int, dim: int, seed: int) -> list[dict[str, np.ndarray]]:
    """One guided pair per timestep of TIMESTEPS: the same latent in both rows, an "empty" and a
    prompt embedding, in `export.guidance`'s form (unconditional row first)."""
    rng, feeds = np.random.default_rng(seed), []
    for t in TIMESTEPS:
        x = rng.standard_normal((1, 4, latent, latent)).astype(np.float32)
        text = rng.standard_normal((2, length, dim)).astype(np.float32)
        feeds.append(
            {"sample": np.concatenate([x, x]), "timestep": np.array(t, np.float32), "encoder_hidden_states": text}
        )
    return feeds


def onnx_child(config: str, seed: int, out_dir: str, threads: int) -> dict:
    import torch

    from benchmarks.memory import mark_runtime
    from export.onnx import export_onnx

    torch.set_num_threads(threads)
    mark_runtime()
    pipe = build_pipeline(config, seed)
    start = time.perf_counter()
    result = export_onnx(pipe, Path(out_dir), components=("text_encoder", "unet"), progress=False)
    params = sum(p.numel() for p in pipe.unet.parameters())
    return {"unet_params": params, "export_s": round(time.perf_counter() - start, 1), "parity": result["parity"],
            **_size(out_dir)}  # fmt: skip


def fixed_child(onnx_dir: str, out_dir: str) -> dict:
    from benchmarks.memory import mark_runtime
    from export.fixed_shapes import fix_folder
    from export.ort import mobile_usability

    mark_runtime()
    shutil.copytree(onnx_dir, out_dir, copy_function=os.link)  # hard links: the fix writes new files
    before = mobile_usability(Path(onnx_dir) / "unet" / "model.onnx", "unet", qnn=False)
    start = time.perf_counter()
    record = fix_folder(Path(out_dir), generator=False, progress=False)
    fix_s = round(time.perf_counter() - start, 1)
    after = mobile_usability(Path(out_dir) / "unet" / "model.onnx", "unet", qnn=False)
    usability = {"dynamic": before, "fixed": after}
    return {"fix_s": fix_s, "parity": record["parity"], "usability": usability, **_size(out_dir)}


def qnn_child(onnx_dir: str, out_dir: str, soc: str, seed: int, htp_pairs: int = 1) -> dict:
    from benchmarks.memory import mark_runtime
    from export.fixed_shapes import deploy_inputs
    from export.guidance import guidance_fidelity, onnx_unet_fn
    from export.layout import pairwise_unet_fn
    from export.qnn import _context_binary, _write_graph
    from export.validate import psnr
    from toolchain.runtime.qnn import htp_session, qnn_device

    qnn_device()
    mark_runtime()
    src, target = Path(onnx_dir) / "unet" / "model.onnx", Path(out_dir) / "unet" / "model.onnx"
    inputs = deploy_inputs(Path(onnx_dir), "unet", 2)
    phases = {}
    start = time.perf_counter()
    _write_graph(src, target, inputs, None, "fp16")
    phases["prepare_s"] = round(time.perf_counter() - start, 1)
    context = _context_binary(target, soc, fp16=True)
    phases["compile_s"] = context["context_s"]
    start = time.perf_counter()
    session = htp_session(target.with_name(Path(context["context_path"]).name), soc, fp16=True)
    phases["open_from_context_s"] = round(time.perf_counter() - start, 1)
    row = {**phases, "soc": soc, "context_bytes": context["context_bytes"], "htp_pairs": htp_pairs}
    row["graph_bytes"] = sum(p.stat().st_size for p in target.parent.glob("model.onnx*"))
    if not htp_pairs:  # compiled and opened with CPU fallback off: every node on the HTP, no call run
        return row
    reference = onnx_unet_fn(src)
    feed = guided_feeds(*_feed_shape(inputs), seed)[1]  # one pair: an SD-1.5 call on the simulator takes minutes
    start = time.perf_counter()
    htp = pairwise_unet_fn(session)(feed)
    row["htp_call_s"] = round(time.perf_counter() - start, 1)
    ref = reference(feed)
    row["parity"] = {"max_abs_err": float(np.max(np.abs(ref - htp))), "psnr_db": psnr(ref, htp)}
    row["guidance"] = guidance_fidelity(reference, lambda _feed: htp, [feed])  # the middle band, from that call
    return row


def executorch_child(config: str, seed: int, out_dir: str, threads: int) -> dict:
    import torch

    from benchmarks.memory import mark_runtime
    from export.executorch import executorch_unet_fn, export_executorch, torch_unet_fn
    from export.guidance import guidance_fidelity
    from toolchain.runtime.executorch import require_executorch

    torch.set_num_threads(threads)
    require_executorch()
    mark_runtime()
    pipe = build_pipeline(config, seed)
    feeds = guided_feeds(pipe.unet.config.sample_size, pipe.text_encoder.config.max_position_embeddings,
                         pipe.unet.config.cross_attention_dim, seed)  # fmt: skip
    start = time.perf_counter()
    result = export_executorch(pipe, Path(out_dir), "fp32", parity_feed=feeds[1], components=("unet",), progress=False)
    lower_s = round(time.perf_counter() - start, 1)
    guidance = guidance_fidelity(torch_unet_fn(pipe), executorch_unet_fn(Path(out_dir) / "unet" / "model.pte"), feeds)
    params = sum(p.numel() for p in pipe.unet.parameters())
    return {"unet_params": params, "lower_s": lower_s, "parity": result["parity"], "guidance": guidance,
            **_size(out_dir)}  # fmt: skip


def _feed_shape(inputs: dict) -> tuple[int, int, int]:
    """(latent side, sequence length, embedding width) of a UNet's example inputs."""
    return inputs["sample"].shape[-1], *inputs["encoder_hidden_states"].shape[1:]


def _size(folder: str) -> dict:
    return {"output_bytes": sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())}


def run_rows(args, work: Path) -> Iterator[dict]:
    """Every asked row in its own child; yields the rows so far after each, for the caller to write
    (a later failure keeps the earlier figures)."""
    onnx_dir, rows = work / "onnx", {}
    common = {"seed": args.seed}
    specs = {
        "onnx": ("onnx_child", {"config": str(args.config_path), "out_dir": str(onnx_dir), "threads": args.threads}),
        "ort-fixed": ("fixed_child", {"onnx_dir": str(onnx_dir), "out_dir": str(work / "fixed")}),
        "qnn-fp16": ("qnn_child", {
            "onnx_dir": str(onnx_dir), "out_dir": str(work / "qnn"), "soc": args.soc, "htp_pairs": args.htp_pairs,
            **common,
        }),
        "executorch-fp32": ("executorch_child", {
            "config": str(args.config_path), "out_dir": str(work / "executorch"), "threads": args.threads, **common,
        }),
    }  # fmt: skip
    specs["onnx"][1].update(common)
    for name in args.rows:
        fn, kwargs = specs[name]
        print(f"{name} ...", flush=True)
        try:
            rows[name] = run_child(f"benchmarks.studies.phone_sd15:{fn}", kwargs, args.timeout)
        except (RuntimeError, TimeoutError) as exc:
            rows[name] = {"error": str(exc)}
        rows[name]["command"] = args.command
        rows[name]["peak_vs_fp32_unet"] = round(rows[name].get("peak_rss_bytes", 0) / _fp32_unet_bytes(rows), 2)
        print(f"{name}: {_summary(rows[name])}", flush=True)
        yield rows


def _fp32_unet_bytes(rows: dict) -> float:
    """The yardstick: the fp32 UNet's weights, counted by a row that built it (NaN before any did)."""
    params = next((row["unet_params"] for row in rows.values() if "unet_params" in row), float("nan"))
    return 4 * params


def _summary(row: dict) -> str:
    if "error" in row:
        return f"FAILED: {row['error']}"
    return f"{row['wall_s']:.0f} s, peak RSS {row['peak_rss_bytes'] / GIB:.2f} GiB ({row['peak_vs_fp32_unet']}x)"


def to_markdown(result: dict) -> str:
    rows = result["rows"]
    lines = [
        f"# SD-1.5 UNet through the phone targets (random weights, {result['latent']}x{result['latent']} latent)",
        "",
        f"- machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; torch threads {result['threads']}",
        *sorted({f"- command: `{row.get('command', result['command'])}`" for row in rows.values()}),
        "- each row a fresh child process; peak RSS is its VmHWM; the yardstick is the fp32 UNet's weights, "
        f"{_fp32_unet_bytes(rows) / GIB:.2f} GiB (target: peak ≤ 2x)",
        "",
        "| row | wall s | peak RSS GiB | x fp32 UNet | output GiB | parity PSNR dB | guidance cosine (worst band) | norm ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error']} |")
            continue
        parity = row.get("parity")
        psnr = min(p["psnr_db"] for p in parity) if isinstance(parity, list) else (parity or {}).get("psnr_db")
        guidance = row.get("guidance") or {}
        size = row.get("output_bytes") or row.get("context_bytes") or 0
        lines.append(
            f"| {name} | {row['wall_s']:.0f} | {row['peak_rss_bytes'] / GIB:.2f} | {row['peak_vs_fp32_unet']} | "
            f"{size / GIB:.2f} | {_num(psnr)} | {_num(guidance.get('cosine'), 4)} | {_num(guidance.get('norm_ratio'), 3)} |"
        )
    lines += _details(rows)
    return "\n".join(lines) + "\n"


def _details(rows: dict) -> list[str]:
    lines = [""]
    qnn = rows.get("qnn-fp16", {})
    if "compile_s" in qnn:
        lines.append(
            f"- qnn-fp16 ({qnn['soc']}): prepare {qnn['prepare_s']} s, compile {qnn['compile_s']} s, context binary "
            f"{qnn['context_bytes'] / GIB:.2f} GiB, opened from it in {qnn['open_from_context_s']} s with CPU fallback "
            "off (every node on the HTP), "
            + (f"one guided pair {qnn['htp_call_s']} s on the simulator." if "htp_call_s" in qnn else
               "no pair run on the simulator (`--htp-pairs 0`).")
        )  # fmt: skip
    et = rows.get("executorch-fp32", {})
    if "lower_s" in et:
        lines.append(
            f"- executorch-fp32: torch.export + XNNPACK lowering {et['lower_s']} s (parity and guidance after)."
        )
    fixed = rows.get("ort-fixed", {}).get("usability")
    if fixed:
        lines += ["", "ONNX Runtime's usability check on the UNet, dynamic export vs fixed and folded:", ""]
        lines += [
            "| graph | provider | partitions | coverage | unsupported ops | blocked (absent input) | accepted: partitions / coverage |"
        ]
        lines += ["|---|---|---|---|---|---|---|"]
        for graph, found in fixed.items():
            for r in found:
                lines.append(
                    f"| {graph} | {r['execution_provider']} | {r['partitions']} | {r['coverage']:.4f} | "
                    f"{', '.join(r['unsupported_ops']) or '-'} | {r['nodes_blocked_by_dynamic_shapes']} "
                    f"({r['of_which_absent_optional_input']}) | {r.get('partitions_absent_inputs_accepted', '-')} / "
                    f"{r.get('coverage_absent_inputs_accepted', '-')} |"
                )
    return lines


def _num(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    from toolchain.models.architectures import resolve_unet_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="sd15", help="UNet config: sd15 or a .json path")
    parser.add_argument("--latent", type=int, default=8, help="latent side the UNet runs at (weights do not change)")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--soc", default="SM8750")
    parser.add_argument(
        "--htp-pairs", type=int, default=1, choices=(0, 1),
        help="guided pairs run on the HTP simulator (0: compile and open only; one SD-1.5 pair at an 8x8 latent took 53 min here)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per row before its child is killed")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/phone-sd15"))
    parser.add_argument("--merge", action="store_true", help="keep OUT.json's rows this command does not measure")
    args = parser.parse_args(argv)
    if "onnx" not in args.rows and {"ort-fixed", "qnn-fp16"} & set(args.rows):
        parser.error("ort-fixed and qnn-fp16 convert the onnx row's export: keep onnx in --rows")
    with tempfile.TemporaryDirectory(prefix="phone-sd15-") as work:
        config = json.loads(resolve_unet_config(args.config).read_text())
        args.config_path = Path(work) / "unet.json"
        args.config_path.write_text(json.dumps({**config, "sample_size": args.latent}))
        result = {
            "config": args.config, "latent": args.latent, "threads": args.threads,
            "machine": {"cpu": cpu_model(), "cores": os.cpu_count()}, "versions": library_versions(),
            "command": "python -m benchmarks.studies.phone_sd15 " + " ".join(argv if argv is not None else sys.argv[1:]),
        }  # fmt: skip
        args.command = result["command"]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        kept = {}
        if args.merge and args.out.with_suffix(".json").is_file():
            kept = json.loads(args.out.with_suffix(".json").read_text())["rows"]
        for rows in run_rows(args, Path(work)):
            result["rows"] = {**kept, **rows}
            args.out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    args.out.with_suffix(".md").write_text(to_markdown(result))
    print(to_markdown(result))
    return 1 if any("error" in row for row in result["rows"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
