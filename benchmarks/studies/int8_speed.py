"""Int8 UNet formulations in ONNX Runtime (CPU): latency vs fp32, size, parity, and digits quality.

    python -m benchmarks.studies.int8_speed --out benchmarks/results            # speed + digits quality
    python -m benchmarks.studies.int8_speed --skip-mid --rounds 5              # digits UNet only

Speed: the fp32 UNet and every int8 variant (dynamic QOperator on all ops / MatMul only / Conv
only, static QDQ per-channel, static QOperator per-channel, static QDQ on Conv + MatMul only)
are loaded as ORT sessions at 1 intra-op thread, side by side in one process, and timed interleaved: every round runs each
variant once in turn, so machine load drifting over the run hits all variants alike. The
ratio to fp32 is taken per round, then the median over rounds. Two UNets: the trained digits
UNet (3.3M params, 8x8 latent) and a mid-size SD-1.x-layout UNet with random weights
(block_out_channels (160, 320, 640, 640), one layer per block, cross-attention dim 768,
32x32 latent, 148M params), both at batch 2 (one guided image).

Quality (digits only): each int8 folder draws images through `toolchain.runtime.ort.ort_generator`
(DDIM 25 steps, guidance 5.0) for digit 7's erase + held-out prompts and the nine retained
digits' prompts (configs/concepts/digit-7.yaml); the digits judge scores them. Bars: retain
accuracy within 3 points of fp32, digit 7's rate not more than 2 points above fp32's.

Writes int8-speed.{json,md} and int8-digits.{json,md} under --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

DIGITS = Path(__file__).resolve().parents[2] / "toolchain" / "assets" / "digits-sd"
CALIBRATION_PROMPTS = [f"a handwritten digit {w}" for w in "zero one two three four five six seven eight nine".split()]
MID_UNET = {
    "block_out_channels": (160, 320, 640, 640),
    "layers_per_block": 1,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "sample_size": 32,
}
RETAIN_BAR, LEAK_BAR = 0.03, 0.02


def variants(calibration: list[dict]) -> dict[str, dict]:
    """The int8 formulations compared, as quantize_onnx_folder keyword arguments."""
    static = {"mode": "static", "per_channel": True, "calibration": {"unet": calibration}}
    return {
        "dynamic-all": {"mode": "dynamic", "per_channel": True},
        "dynamic-matmul": {"mode": "dynamic", "per_channel": True, "op_types": ["MatMul"]},
        "dynamic-conv": {"mode": "dynamic", "per_channel": True, "op_types": ["Conv"]},
        "static-qdq": {**static, "quant_format": "QDQ"},
        "static-qoperator": {**static, "quant_format": "QOperator"},
        # int8 only where the FLOPs are; Add / Mul / Softmax / ... stay fp32, fewer Q/DQ pairs
        "static-qdq-conv-matmul": {**static, "quant_format": "QDQ", "op_types": ["Conv", "MatMul"]},
    }


def export_digits(work: Path) -> Path:
    """The unpruned digits model exported to ONNX (cached in `work`)."""
    out = work / "digits-onnx"
    if not (out / "model_index.json").is_file():
        from export.onnx import export_onnx
        from toolchain.models.io import load_pipeline

        export_onnx(load_pipeline(DIGITS), out, progress=False)
    return out


def export_mid(work: Path) -> tuple[Path, dict]:
    """A random-weight mid-size SD-1.x UNet as `<work>/mid-onnx/unet/model.onnx`, and one feed."""
    import torch
    from diffusers import UNet2DConditionModel

    from export.onnx import UNetForExport

    out = work / "mid-onnx"
    rng = np.random.default_rng(0)
    size = MID_UNET["sample_size"]
    feed = {
        "sample": rng.standard_normal((2, 4, size, size), dtype=np.float32),
        "timestep": np.array(500.0, dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, MID_UNET["cross_attention_dim"]), dtype=np.float32),
    }
    path = out / "unet" / "model.onnx"
    if not path.is_file():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**MID_UNET).eval()
        path.parent.mkdir(parents=True, exist_ok=True)
        unet.save_config(path.parent)
        import warnings

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                UNetForExport(unet),
                tuple(torch.from_numpy(v) for v in feed.values()),
                str(path),
                input_names=list(feed),
                output_names=["out_sample"],
                dynamic_axes={"sample": {0: "batch_size"}, "encoder_hidden_states": {0: "batch_size"}},
                opset_version=17,
                do_constant_folding=True,
                dynamo=False,
            )
        del unet
    return out, feed


def time_interleaved(paths: dict[str, Path], feed: dict, rounds: int, warmup: int = 1) -> dict:
    """Per-variant median ms and median per-round ratio to 'fp32', sessions at 1 thread."""
    from toolchain.runtime.ort import ort_feed, ort_session

    sessions = {name: ort_session(path, threads=1)[0] for name, path in paths.items()}
    feeds = {name: ort_feed(s, feed) for name, s in sessions.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for r in range(warmup + rounds):
        order = list(sessions) if r % 2 == 0 else list(reversed(sessions))  # no fixed neighbour
        for name in order:
            start = time.perf_counter()
            sessions[name].run(None, feeds[name])
            if r >= warmup:
                times[name].append((time.perf_counter() - start) * 1000.0)
    out = {}
    for name, ms in times.items():
        ratios = [a / b for a, b in zip(ms, times["fp32"], strict=True)]
        out[name] = {
            "median_ms": round(statistics.median(ms), 2),
            "min_ms": round(min(ms), 2),
            "ratio_vs_fp32": round(statistics.median(ratios), 3),
            "rounds": rounds,
        }
    return out


def bench_unet(label: str, src: Path, feed: dict, calibration: list[dict], work: Path, rounds: int) -> dict:
    from export.quantize import quantize_onnx_folder

    paths = {"fp32": src / "unet" / "model.onnx"}
    rows = {"fp32": {"size_bytes": paths["fp32"].stat().st_size}}
    for name, kwargs in variants(calibration).items():
        out = work / f"{label}-{name}"
        start = time.perf_counter()
        result = quantize_onnx_folder(
            src, out, psnr_floor_db=0.0, parity_inputs={"unet": feed}, progress=False, **kwargs
        )
        parity = result["parity"][0]
        rows[name] = {
            "size_bytes": result["files"]["unet"]["size_bytes"],
            "psnr_db": round(parity["psnr_db"], 2),
            "max_abs_err": round(parity["max_abs_err"], 4),
            "quantize_s": round(time.perf_counter() - start, 1),
        }
        paths[name] = out / "unet" / "model.onnx"
        print(f"{label} {name}: {rows[name]}", flush=True)
    timing = time_interleaved(paths, feed, rounds)
    for name in rows:
        rows[name].update(timing[name])
        rows[name]["size_ratio"] = round(rows[name]["size_bytes"] / rows["fp32"]["size_bytes"], 3)
    return rows


def digits_quality(src: Path, work: Path, n_per_prompt: int, names: list[str]) -> dict:
    from benchmarks.leakage import evaluate_concepts, get_judge
    from toolchain.config import load_concept
    from toolchain.runtime.ort import ort_generator

    concept = load_concept("7")
    erase = {concept.label: list(concept.erase_prompts) + list(concept.heldout_prompts)}
    retain = {k: list(v) for k, v in concept.retain_prompts.items()}
    judge = get_judge("digits")
    rows = {}
    for name in ["fp32", *names]:
        folder = src if name == "fp32" else work / f"digits-{name}"
        start = time.perf_counter()
        scores = evaluate_concepts(ort_generator(folder, threads=1), judge, erase, retain, n_per_prompt, seed=0)
        rows[name] = {
            "retain_accuracy": round(scores.retain_accuracy, 4),
            "rate_7": round(scores.leakage[concept.label], 4),
            "fid": None if scores.fid is None else round(scores.fid, 4),
            "n_images": scores.n_images,
            "generate_s": round(time.perf_counter() - start, 1),
        }
    base = rows["fp32"]
    for row in rows.values():
        row["retain_drop"] = round(base["retain_accuracy"] - row["retain_accuracy"], 4)
        row["rate_7_rise"] = round(row["rate_7"] - base["rate_7"], 4)
        row["passes"] = row["retain_drop"] <= RETAIN_BAR and row["rate_7_rise"] <= LEAK_BAR
    return rows


def environment() -> dict:
    import diffusers
    import onnx
    import onnxruntime
    import torch

    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").is_file() else set()
    model = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if "model name" in line
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").is_file()
        else platform.processor()
    )
    return {
        "cpu": model,
        "isa": sorted(f for f in flags if f in {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"}),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "threads": 1,
        "command": "python -m benchmarks.studies.int8_speed " + " ".join(sys.argv[1:]),
    }


def speed_markdown(data: dict) -> str:
    env = data["environment"]
    lines = [
        "# Int8 UNet in ONNX Runtime (CPU): latency and size vs fp32",
        "",
        f"`{env['command']}` — {env['cpu']} ({', '.join(env['isa'])}), onnxruntime {env['onnxruntime']}, "
        f"onnx {env['onnx']}, torch {env['torch']}, diffusers {env['diffusers']}, Python {env['python']}.",
        "",
        "ORT CPUExecutionProvider, **1 intra-op thread**, batch 2 (one guided image). All variants of a UNet are "
        "loaded in one process and timed **interleaved** (each round runs every variant once, order alternating); "
        "ratio = median over rounds of (variant ms / fp32 ms in the same round). The machine's 2 cores were "
        "shared with other jobs, so absolute ms are noisy; the ratios are the result.",
        "",
    ]
    for label, rows in data["unets"].items():
        lines += [f"## {label}: {data['unet_notes'][label]}", ""]
        lines += [
            "| variant | median ms | ratio vs fp32 | size MB | size ratio | PSNR vs fp32 dB |",
            "|---|---|---|---|---|---|",
        ]
        for name, row in rows.items():
            lines.append(
                f"| {name} | {row['median_ms']:.1f} | {row['ratio_vs_fp32']:.2f} | {row['size_bytes'] / 1e6:.2f} | "
                f"{row['size_ratio']:.2f} | {row.get('psnr_db', '–')} |"
            )
        lines.append("")
    return "\n".join(lines + data.get("notes", [])) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/int8-speed"))
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds for the digits UNet")
    parser.add_argument("--mid-rounds", type=int, default=6, help="timed rounds for the mid-size UNet")
    parser.add_argument("--calibration-feeds", type=int, default=16)
    parser.add_argument("--n-per-prompt", type=int, default=8, help="images per prompt for the digits bars")
    parser.add_argument("--skip-mid", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from export.quantize import collect_unet_calibration

    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment()
    digits = export_digits(args.work)
    # 10 prompts x 25 steps, every feed a batch of 20 (10 unconditional + 10 conditional)
    calibration = collect_unet_calibration(
        digits, CALIBRATION_PROMPTS, steps=25, guidance_scale=5.0, seed=1, n=args.calibration_feeds, threads=1
    )
    # parity on a trajectory feed the calibration did not see (seed 2)
    held_out = collect_unet_calibration(digits, CALIBRATION_PROMPTS, steps=25, seed=2, n=3, threads=1)[1]
    speed = {"environment": env, "unets": {}, "unet_notes": {}}
    speed["unets"]["digits"] = bench_unet("digits", digits, held_out, calibration, args.work, args.rounds)
    speed["unet_notes"]["digits"] = (
        "trained, 3.3M params, 8x8 latent, widths (32, 64, 64, 64); static calibration: "
        f"{len(calibration)} feeds from DDIM trajectories of 10 digit prompts; parity on a held-out trajectory feed"
    )
    if not args.skip_mid:
        mid, feed = export_mid(args.work)
        rng = np.random.default_rng(1)
        mid_cal = [
            {k: (rng.standard_normal(v.shape).astype(np.float32) if v.ndim else v) for k, v in feed.items()}
            for _ in range(4)
        ]
        speed["unets"]["mid"] = bench_unet("mid", mid, feed, mid_cal, args.work, args.mid_rounds)
        speed["unet_notes"]["mid"] = (
            "random weights, 148M params, 32x32 latent, "
            f"{MID_UNET}; static calibration: 4 random-normal feeds (no trained trajectory exists)"
        )
    (args.out / "int8-speed.json").write_text(json.dumps(speed, indent=2) + "\n")
    (args.out / "int8-speed.md").write_text(speed_markdown(speed))

    if not args.skip_quality:
        rows = digits_quality(digits, args.work, args.n_per_prompt, list(variants([])))
        quality = {
            "environment": env,
            "bars": {"retain_drop_max": RETAIN_BAR, "rate_7_rise_max": LEAK_BAR},
            "n_per_prompt": args.n_per_prompt,
            "steps": 25,
            "guidance_scale": 5.0,
            "variants": rows,
        }
        (args.out / "int8-digits.json").write_text(json.dumps(quality, indent=2) + "\n")
        lines = [
            "# Int8 digits UNet: judge scores of images drawn through ONNX Runtime",
            "",
            f"`{env['command']}` — onnxruntime {env['onnxruntime']}. Unpruned digits model exported to ONNX; "
            f"only the UNet quantized. DDIM 25 steps, guidance 5.0, seed 0, {args.n_per_prompt} images per prompt: "
            "digit 7's 10 prompts (erase + held-out) and the nine retained digits' 18 prompts "
            "(configs/concepts/digit-7.yaml). Bars: retain accuracy within 3 points of fp32, rate of 7 at most "
            "2 points above fp32.",
            "",
            "| variant | retain accuracy | drop | rate of 7 | rise | judge FID | passes |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, row in rows.items():
            lines.append(
                f"| {name} | {row['retain_accuracy']:.3f} | {row['retain_drop']:+.3f} | {row['rate_7']:.3f} | "
                f"{row['rate_7_rise']:+.3f} | {row['fid']} | {'yes' if row['passes'] else 'NO'} |"
            )
        (args.out / "int8-digits.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    print(speed_markdown(speed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
