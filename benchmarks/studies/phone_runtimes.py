"""Phone runtimes on the digits world: one erase-7 student through each runtime's own numerics.

From the fp32 ONNX export of a `compress --target onnx --erase 7` run (default recipe), rows:
ONNX Runtime CPU fp32, ORT static int8 (W8A8: uint8 activations, the quantize stage's default),
ORT W8A16, and the QNN target at fp16 / W8A16 / W8A8 run on the HTP backend (the x86 simulator
of Qualcomm's NPU, CPU fallback disabled). Per row: UNet parity (PSNR against fp32 on a held-out
trajectory feed; for QNN on the HTP), the guidance signal's cosine and norm ratio against fp32 (7
held-out feeds, worst timestep band; for QNN on the HTP), leakage of 7 / held-out leakage / retain
accuracy with Wilson intervals and image counts and judge FID (judged on ONNX Runtime's CPU provider:
for QNN rows its own fixed-shape graphs there, i.e. simulated quantization), leakage on
`--htp-images` images drawn through the HTP itself with the judge's agreement with the CPU on the
same seeds, folder size, and the UNet's per-call time (CPU: ORT at the machine's threads; QNN: the
HTP *simulator*, no phone's latency). ExecuTorch rows lower the same student from PyTorch
(`--student`, its diffusers folder) with the XNNPACK delegate, fp32, with the UNet 8-bit (PT2E,
calibrated on the same trajectories) or 8da4w (torchao: dynamic int8 activations, int4 weights, on
the Linear layers), and are judged with every image drawn through ExecuTorch's
runtime (XNNPACK on x86, not a phone's time). Gates are off here: the study measures what they judge.

    python -m benchmarks.studies.phone_runtimes --export runs/compress/03-export --out benchmarks/results/phone-runtimes
    python -m benchmarks.studies.phone_runtimes --export runs/compress/03-export --student runs/compress/02-finetune \
        --rows executorch-fp32 executorch-int8 --merge --out benchmarks/results/phone-runtimes
    python -m benchmarks.studies.phone_runtimes --export runs/compress/03-export --student runs/compress/02-finetune \
        --rows executorch-8da4w --merge --out benchmarks/results/phone-runtimes

`--merge` keeps the rows of OUT.json this command does not measure (each row names the command that measured it).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

from benchmarks.studies.digits_erase import handwritten_section, write_result

ROWS = (
    "ort-fp32", "ort-w8a8", "ort-w8a16", "qnn-fp16", "qnn-w8a16", "qnn-w8a8",
    "executorch-fp32", "executorch-int8", "executorch-8da4w",
)  # fmt: skip
FILES = {c: f"{c}/model.onnx" for c in ("text_encoder", "unet", "vae_decoder")}
PROGRAMS = {c: f"{c}/model.pte" for c in FILES}  # an ExecuTorch folder's


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, required=True, help="an fp32 ONNX export folder (NN-export)")
    parser.add_argument("--erase", default="7")
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=ROWS)
    parser.add_argument("--n-per-prompt", type=int, default=4)
    parser.add_argument("--htp-images", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("runs/phone-runtimes"))
    parser.add_argument(
        "--student", type=Path, help="the same student's diffusers folder (NN-finetune): ExecuTorch rows"
    )
    parser.add_argument("--merge", action="store_true", help="keep OUT.json's rows this command does not measure")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    if any(r.startswith("executorch") for r in args.rows) and not args.student:
        parser.error("ExecuTorch rows lower from PyTorch: pass --student (the run's NN-finetune folder)")
    command = "python -m benchmarks.studies.phone_runtimes " + " ".join(argv if argv is not None else sys.argv[1:])

    from toolchain.artifact import Artifact
    from toolchain.config import BenchmarkConfig, QuantizeConfig
    from toolchain.stages.benchmark import _evaluation_plan
    from toolchain.stages.quantize import calibration_prompts, held_out_feeds

    cfg = QuantizeConfig()
    plan = _evaluation_plan(Artifact(path=args.export, kind="onnx"), [args.erase], BenchmarkConfig())
    prompts = calibration_prompts(cfg, [args.erase])
    calibration = _calibration(args.export, prompts, cfg)
    held_out = held_out_feeds(args.export, prompts, cfg)
    rows = []
    for name in args.rows:
        start = time.perf_counter()
        folder, unet_fn, per_call = _build(name, args, args.work / name, calibration, held_out)
        row = {"row": name, "command": command, "build_s": round(time.perf_counter() - start, 1)}
        row.update(_fidelity(args.export, unet_fn, held_out))
        row.update(_judged(folder, plan, args.n_per_prompt, executorch=name.startswith("executorch")))
        if name.startswith("qnn"):
            row.update(_htp_share(folder, name, plan, args.htp_images))
        row.update(size_bytes=_bytes(folder), unet_call_ms=per_call, unet_call_runtime=_call_runtime(name))
        print(row, flush=True)
        rows.append(row)
    if args.merge and args.out and args.out.with_suffix(".json").is_file():
        kept = json.loads(args.out.with_suffix(".json").read_text())
        measured = {r["row"] for r in rows}
        rows = [r for r in kept["rows"] if r["row"] not in measured] + rows
        rows.sort(key=lambda r: ROWS.index(r["row"]))
        command = kept["command"]
    result = {
        "command": command,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
        "versions": {p: version(p) for p in ("torch", "onnxruntime", "onnxruntime-qnn", "executorch", "diffusers")},
        "export": str(args.export),
        "erase": args.erase,
        "rows": rows,
    }
    if args.out:
        write_result(args.out, result, lambda r: to_markdown(r) + handwritten_section(args.out.with_suffix(".md")))
    return result


def _calibration(export: Path, prompts: list[str], cfg) -> list:
    from export.quantize import collect_unet_calibration

    return collect_unet_calibration(
        export, prompts, cfg.calibration_steps, cfg.calibration_guidance_scale, cfg.calibration_seed,
        n=cfg.calibration_feeds,
    )  # fmt: skip


def _build(name: str, args, folder: Path, calibration: list, held_out: list):
    """The row's folder, its UNet as a function of a feed, and its UNet call time (ms)."""
    from export.guidance import onnx_unet_fn
    from export.qnn import htp_unet_fn, prepare_qnn_folder
    from export.quantize import quantize_onnx_folder

    export = args.export
    shutil.rmtree(folder, ignore_errors=True)
    if name.startswith("executorch"):
        return _build_executorch(name.split("-")[1], args.student, folder, calibration, held_out)
    if name == "ort-fp32":
        return export, onnx_unet_fn(export / "unet" / "model.onnx"), _cpu_call_ms(export, held_out)
    if name.startswith("ort"):
        quantize_onnx_folder(
            export, folder, mode="static", per_channel=True, op_types=["Conv", "MatMul"], quant_format="QDQ",
            calibration={"unet": calibration}, parity_inputs={"unet": held_out[len(held_out) // 2]},
            activation_type="QUInt16" if name == "ort-w8a16" else "QUInt8", psnr_floor_db=0.0, progress=False,
        )  # fmt: skip
        return folder, onnx_unet_fn(folder / "unet" / "model.onnx"), _cpu_call_ms(folder, held_out)
    precision = name.split("-")[1]
    result = prepare_qnn_folder(
        export, folder, precision, calibration if precision != "fp16" else None, held_out[len(held_out) // 2],
        psnr_floors_db={"fp16": 0.0, "w8a16": 0.0, "w8a8": 0.0}, progress=False,
    )  # fmt: skip
    (unet,) = [r for r in result["parity"] if r["component"] == "unet"]
    fn = htp_unet_fn(folder / "unet" / "model.onnx", fp16=precision == "fp16")
    return folder, fn, unet["htp_call_ms"]


def _build_executorch(precision: str, student: Path, folder: Path, calibration: list, held_out: list):
    """The student lowered to ExecuTorch programs (XNNPACK), floors off; the UNet's call time is
    XNNPACK's on this x86 machine."""
    from export.executorch import executorch_unet_fn, export_executorch
    from toolchain.models.io import load_pipeline

    result = export_executorch(
        load_pipeline(student), folder, precision, calibration if precision == "int8" else None,
        held_out[len(held_out) // 2], psnr_floors_db={"fp32": 0.0, "int8": 0.0, "8da4w": 0.0}, progress=False,
    )  # fmt: skip
    (unet,) = [r for r in result["parity"] if r["component"] == "unet"]
    return folder, executorch_unet_fn(folder / "unet" / "model.pte"), unet["call_ms"]


def _cpu_call_ms(folder: Path, held_out: list, repeats: int = 10) -> float:
    """Median ms of the UNet on ONNX Runtime's CPU provider at batch 2 (one guided image)."""
    from export.layout import guided_pairs
    from toolchain.runtime.ort import ort_feed, ort_session

    session, _ = ort_session(folder / "unet" / "model.onnx")
    feed = ort_feed(session, guided_pairs(held_out[len(held_out) // 2])[0])
    times = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1000.0)
    return round(float(np.median(times[2:])), 3)


def _fidelity(export: Path, unet_fn, held_out: list) -> dict:
    """UNet PSNR against fp32 on the middle held-out feed; guidance fidelity on all of them."""
    from export.guidance import guidance_fidelity, onnx_unet_fn
    from export.validate import psnr

    reference = onnx_unet_fn(export / "unet" / "model.onnx")
    feed = held_out[len(held_out) // 2]
    guidance = guidance_fidelity(reference, unet_fn, held_out)
    return {
        "unet_psnr_db": round(psnr(reference(feed), unet_fn(feed)), 2),
        "guidance_cosine": round(guidance["cosine"], 4),
        "guidance_norm_ratio": round(guidance["norm_ratio"], 4),
        "guidance_images": guidance["images"],
        "guidance_bands": guidance["bands"],
    }


def _judged(folder: Path, plan: dict, n_per_prompt: int, executorch: bool = False) -> dict:
    """Leakage, held-out leakage, retain accuracy (Wilson intervals, counts) and FID on the CPU
    provider (an ExecuTorch folder: through ExecuTorch's runtime), over the benchmark stage's own
    prompts (`plan`: its evaluation plan)."""
    from benchmarks.leakage import evaluate_concepts, get_judge
    from toolchain.runtime.executorch import executorch_opener
    from toolchain.runtime.ort import OrtPipeline

    judge = get_judge(plan["judge"], **plan["options"])
    if executorch:
        pipe = OrtPipeline(folder, PROGRAMS, open_session=executorch_opener())
    else:
        pipe = OrtPipeline(folder, FILES)
    (label,) = plan["erase"]
    scores = evaluate_concepts(lambda p, s: pipe(p, s), judge, plan["erase"], plan["retain"], n_per_prompt, 0)
    held = evaluate_concepts(lambda p, s: pipe(p, s), judge, plan["heldout"], {}, n_per_prompt, 1)
    intervals, held_intervals = scores.intervals(), held.intervals()
    return {
        "leakage": scores.leakage[label],
        "leakage_n": scores.leakage_n[label],
        "leakage_ci95": intervals["leakage_ci95"][label],
        "heldout_leakage": held.leakage[label],
        "heldout_leakage_n": held.leakage_n[label],
        "heldout_leakage_ci95": held_intervals["leakage_ci95"][label],
        "retain_accuracy": scores.retain_accuracy,
        "retain_n": scores.retain_n,
        "retain_ci95": intervals["retain_ci95"],
        "fid": scores.fid,
    }


def _htp_share(folder: Path, name: str, plan: dict, images: int) -> dict:
    """Leakage on `images` images of the concept's first prompt drawn through the HTP itself, and
    the judge's agreement with the CPU provider on the same seeds."""
    from benchmarks.leakage import get_judge
    from toolchain.runtime.ort import OrtPipeline
    from toolchain.runtime.qnn import htp_opener

    fp16 = {"text_encoder", "vae_decoder"} | ({"unet"} if name == "qnn-fp16" else set())
    judge = get_judge(plan["judge"], **plan["options"])
    ((label, prompts),) = plan["erase"].items()
    batch = [prompts[0]] * images
    htp = OrtPipeline(folder, FILES, open_session=htp_opener("SM8750", fp16))
    labels = [np.asarray(judge.classify(pipe(batch, 0)).labels) for pipe in (htp, OrtPipeline(folder, FILES))]
    return {
        "htp_leakage": float(np.mean(labels[0].astype(str) == str(label))),
        "htp_images": images,
        "htp_agreement": float(np.mean(labels[0] == labels[1])),  # the same digit on both
        # the leakage decision alone (the concept or not): what the CPU bulk stands in for
        "htp_concept_agreement": float(
            np.mean((labels[0].astype(str) == str(label)) == (labels[1].astype(str) == str(label)))
        ),
    }


def _call_runtime(name: str) -> str:
    if name.startswith("executorch"):
        return "ExecuTorch XNNPACK (x86)"
    return "QNN HTP simulator (x86)" if name.startswith("qnn") else "ONNX Runtime CPU"


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def to_markdown(result: dict) -> str:
    """The rendered part of OUT.md."""
    lines = [
        "# Phone runtimes on the digits world (erase 7, default recipe)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']['platform']}; versions: "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        "",
        "Leakage, held-out leakage and retain are judged on ONNX Runtime's CPU provider (QNN rows: their own "
        "fixed-shape graphs there; ExecuTorch rows: every image through ExecuTorch's runtime); `htp` columns are "
        "images drawn through the QNN HTP backend itself. The UNet call time of QNN rows is the HTP *simulator's* "
        "on x86, of ExecuTorch rows XNNPACK's on x86: neither is a phone's.",
        "",
        "| row | UNet PSNR vs fp32 (dB) | guidance cosine (worst band) | guidance norm ratio | leakage of "
        f"{result['erase']} | held-out leakage | retain | FID | htp leakage | htp vs CPU: same digit / same leakage call | "
        "size (MB) | "
        "UNet call (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        htp = (
            f"{100 * r['htp_leakage']:.0f}% ({round(r['htp_leakage'] * r['htp_images'])}/{r['htp_images']})"
            if "htp_leakage" in r
            else "–"
        )
        agree = "–"
        if "htp_agreement" in r:
            agree = f"{100 * r['htp_agreement']:.0f}% / {100 * r.get('htp_concept_agreement', float('nan')):.0f}%"
        lines.append(
            f"| {r['row']} | {r['unet_psnr_db']:.1f} | {r['guidance_cosine']:.3f} | {r['guidance_norm_ratio']:.3f} | "
            f"{_share(r, 'leakage')} | {_share(r, 'heldout_leakage')} | {_share(r, 'retain', 'retain_accuracy')} | "
            f"{r['fid']:.3f} | {htp} | {agree} | {r['size_bytes'] / 1e6:.2f} | {r['unet_call_ms']:.1f} "
            f"({r['unet_call_runtime']}) |"
        )
    return "\n".join(lines + [""])


def _share(row: dict, key: str, value_key: str | None = None) -> str:
    value, n, (lo, hi) = row[value_key or key], row[f"{key}_n"], row[f"{key}_ci95"]
    return f"{100 * value:.1f}% ({round(value * n)}/{n}, {100 * lo:.1f}–{100 * hi:.1f}%)"


if __name__ == "__main__":
    main()
