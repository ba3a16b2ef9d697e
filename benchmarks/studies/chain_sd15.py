"""The per-image chain on the SD-1.5 architecture (random weights): what each compression step buys
per image, in ONNX Runtime on the CPU.

    python -m benchmarks.studies.chain_sd15 [--threads 2] [--rounds 3] [--work /tmp/chain-sd15]
        [--out benchmarks/results/chain-sd15]

Rows (issue 17, item 5), each a complete ONNX pipeline folder (text encoder, UNet, VAE decoder in
optimum's layout), built by the project's own exporter, quantizer, pruner and decoder code:

- (a) unpruned fp32, DDIM 25 steps with classifier-free guidance (UNet at batch 2): a plain export.
- (b) (a) with the UNet through ONNX Runtime's `quantize_dynamic` on MatMul at its defaults
  (per-tensor int8 weights): what a user would try next.
- (c) channels 0.5 (magnitude importance), fp32.
- (d) (c) with the UNet static int8: QDQ, per-channel, Conv + MatMul (the quantize stage's default),
  calibrated on (c)'s own DDIM trajectories.
- (d+) channels `--dplus-ratio` (0.6) with the same static int8, and the text encoder int8 (dynamic,
  MatMul): the deepest pruning whose chain held the digits world's quality bars (the results'
  hand-written notes name that run).
- (e) (d+)'s UNet as a one-step generator: one unguided UNet call at batch 1 per image.
- (f) (e) with the tiny decoder (AutoencoderTiny in the decoder stage's default shape) in place of
  the VAE decoder.

Weights are random (nothing is downloaded): the figures say what the shapes cost, not how good the
images are; quality is the digits world's (`configs/recipes/fastest.yaml`).

Per row: MACs per image (torch-pruning's counter over conv / linear / norm layers: text encoder and
UNet at the row's batch, times its steps, plus the decoder; attention's matmuls inside
scaled_dot_product_attention are not counted), size (the three components' files), the UNet call,
the decoder and the text encoder timed **in turns** against (a)'s, per image composed from those
(text encoder + steps x UNet + decoder, each as (a)'s median over the speed-up measured in turns;
the text encoder is (a)'s fp32 one for every row),
and one image measured end to end in a fresh process, with that process's peak RSS. UNets are
timed in pairs with (a)'s, since (a) and (b) beside every other session pass this machine's
memory. Builds are cached in `--work` (a row folder with model_index.json is complete; those built
on (d+)'s UNet carry its ratio in their name); delete it to rebuild with other settings.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from benchmarks.studies.decoder import count_macs

ROWS = {
    "a": "unpruned fp32, 25 steps, guided: a plain export",
    "b": "(a), UNet dynamic int8 on MatMul (quantize_dynamic defaults)",
    "c": "channels 0.5, fp32",
    "d": "(c), UNet static int8 (QDQ, per-channel, Conv + MatMul)",
    "d+": "channels {ratio}, UNet static int8 as (d), text encoder dynamic int8 on MatMul",
    "e": "(d+) as a one-step generator at batch 1",
    "f": "(e) + tiny decoder",
}
GUIDED_STEPS, GUIDANCE = 25, 7.5
GENERATOR_TIMESTEPS = [999]
CALIBRATION_PROMPTS = ["a photo of a cat", "a red car on a street"]
COMPONENTS = ("text_encoder", "unet", "vae_decoder")
TARGETS = {"f_speedup_min": 50.0, "f_size_max": 0.15, "dplus_unet_speedup_min": 5.0}


def source_pipeline(args):
    """A StableDiffusionPipeline with SD-1.5's UNet, VAE and text encoder shapes, random weights."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from toolchain.config import CONFIG_DIR
    from toolchain.models.architectures import build_unet_from_config
    from toolchain.models.io import EMBEDDED_MODEL, assemble_pipeline

    models = CONFIG_DIR / "models"
    unet = build_unet_from_config(args.unet_config, seed=args.seed)
    torch.manual_seed(args.seed)
    vae = AutoencoderKL.from_config(json.loads(Path(args.vae_config or models / "sd15-vae.json").read_text()))
    text = CLIPTextConfig(**json.loads((models / "sd15-text-encoder.json").read_text()))
    tokenizer = CLIPTokenizer.from_pretrained(str(EMBEDDED_MODEL / "tokenizer"))
    tokenizer.model_max_length = text.max_position_embeddings  # SD's 77 tokens (ids from a small vocabulary)
    scheduler = DDIMScheduler.from_pretrained(str(EMBEDDED_MODEL / "scheduler"))  # SD-1.x's noise schedule
    return assemble_pipeline(unet, vae.eval(), CLIPTextModel(text).eval(), tokenizer, scheduler)


def unet_macs(unet, pipe) -> int:
    """MACs of one UNet call per latent."""
    import torch

    size = unet.config.sample_size
    seq = pipe.text_encoder.config.max_position_embeddings
    example = (
        torch.randn(1, unet.config.in_channels, size, size),
        torch.tensor([500]),
        torch.randn(1, seq, unet.config.cross_attention_dim),
    )
    return count_macs(unet, example)


def _done(folder: Path) -> bool:
    return (folder / "model_index.json").is_file()


def _fresh(folder: Path) -> Path:
    """A scratch folder beside `folder`, renamed onto it when the row is complete."""
    scratch = folder.with_name(folder.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    return scratch


def _complete(scratch: Path, folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    scratch.rename(folder)


def export_unet_row(pipe, source: Path, folder: Path) -> None:
    """`pipe`'s UNet exported, the text encoder and VAE decoder copied from the `source` row."""
    from export.onnx import export_onnx

    scratch = _fresh(folder)
    export_onnx(pipe, scratch, components=("unet",), progress=True)
    for name in ("text_encoder", "vae_decoder"):
        shutil.copytree(source / name, scratch / name)
    _complete(scratch, folder)


def quantize_row(src: Path, folder: Path, mode: str, args) -> dict:
    """The UNet of `src` int8-quantized into `folder` (static: calibrated on `src`'s own trajectories)."""
    from toolchain.runtime.ort import component_inputs

    parity = {"unet": component_inputs(src, "unet", batch=2, seed=7)}  # random: no calibration feed
    if mode == "dynamic":  # quantize_dynamic's defaults, MatMul only
        kwargs = {"mode": "dynamic", "per_channel": False, "op_types": ["MatMul"]}
    else:
        from export.quantize import collect_unet_calibration

        feeds = collect_unet_calibration(
            src,
            CALIBRATION_PROMPTS,
            steps=args.calibration_steps,
            guidance_scale=GUIDANCE,
            seed=1,
            n=args.calibration_feeds,
            threads=args.threads,
        )
        kwargs = {
            "mode": "static",
            "per_channel": True,
            "op_types": ["Conv", "MatMul"],
            "quant_format": "QDQ",
            "calibration": {"unet": feeds},
        }
    return _quantized(src, folder, parity_inputs=parity, **kwargs)


def _quantized(src: Path, folder: Path, **kwargs) -> dict:
    """`quantize_onnx_folder(src -> folder, **kwargs)` with no PSNR floor (random weights: the
    figure is reported, not gated); returns the quantized component's parity entry."""
    from export.quantize import quantize_onnx_folder

    scratch = _fresh(folder)
    result = quantize_onnx_folder(src, scratch, psnr_floor_db=0.0, progress=True, **kwargs)
    _complete(scratch, folder)
    return result["parity"][0]


def row_folders(args) -> dict[str, Path]:
    """Each row's pipeline folder; those built on (d+)'s UNet carry its ratio in their name."""
    tag = f"-{args.dplus_ratio:g}"
    return {row: args.work / (row + tag if row in ("d+", "e", "f") else row) for row in ROWS}


def _once(record: dict, key: str, folder: Path, make) -> None:
    """make() unless `folder` is complete; its seconds go to record["build_s"][key]."""
    if _done(folder):
        return
    start = time.perf_counter()
    make()
    record.setdefault("build_s", {})[key] = round(time.perf_counter() - start, 1)


def quantize_text_encoder(src: Path, folder: Path) -> dict:
    """`src` with its text encoder int8 on MatMul (dynamic, per-channel): the transformer's weights
    are its MatMuls; the token embedding (a Gather) stays fp32."""
    return _quantized(src, folder, mode="dynamic", components=("text_encoder",), per_channel=True, op_types=["MatMul"])


def build(args) -> dict:
    """Every row's folder under args.work (cached), MACs and build facts: build.json there."""
    import torch

    from toolchain.config import DecoderConfig
    from toolchain.finetune.decoder import tiny_vae
    from toolchain.models.architectures import build_unet_from_config
    from toolchain.pruning.channels import prune_unet_channels

    args.work.mkdir(parents=True, exist_ok=True)
    record_path = args.work / "build.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    folders = row_folders(args)
    if all(_done(f) for f in folders.values()) and record.get("dplus_ratio") == args.dplus_ratio:
        return record  # every row built and counted at this (d+) ratio: no model to build again
    pipe = source_pipeline(args)
    side = pipe.unet.config.sample_size
    latent = torch.randn(1, pipe.vae.config.latent_channels, side, side)
    tokens = torch.zeros(1, pipe.text_encoder.config.max_position_embeddings, dtype=torch.long)
    macs = {"text_encoder": count_macs(pipe.text_encoder, tokens), "vae_decoder": _decoder_macs(pipe.vae, latent)}
    macs["unet"] = {"a": unet_macs(pipe.unet, pipe)}
    _once(record, "a export", folders["a"], lambda: export_whole(pipe, folders["a"]))
    dplus_fp32 = args.work / f"dplus-{args.dplus_ratio:g}-fp32"
    for row, ratio, fp32 in (("c", 0.5, folders["c"]), ("d+", args.dplus_ratio, dplus_fp32)):
        pipe.unet = build_unet_from_config(args.unet_config, seed=args.seed)
        prune_unet_channels(pipe.unet, ratio=ratio, importance="magnitude")
        pipe.unet.eval()
        macs["unet"][row] = unet_macs(pipe.unet, pipe)
        _once(record, f"{row} export", fp32, lambda fp32=fp32: export_unet_row(pipe, folders["a"], fp32))
        gc.collect()
    parity = record.setdefault("int8_parity", {})
    unet8 = args.work / f"dplus-{args.dplus_ratio:g}-unet8"
    for key, src, mode, folder in (
        ("b", folders["a"], "dynamic", folders["b"]),
        ("d", folders["c"], "static", folders["d"]),
        ("d+", dplus_fp32, "static", unet8),
    ):
        _once(
            record,
            f"{key} quantize",
            folder,
            lambda key=key, src=src, mode=mode, folder=folder: parity.update(
                {key: quantize_row(src, folder, mode, args)}
            ),
        )
    _once(
        record,
        "d+ text encoder",
        folders["d+"],
        lambda: parity.update({"d+ text_encoder": quantize_text_encoder(unet8, folders["d+"])}),
    )
    _once(record, "e schedule", folders["e"], lambda: generator_row(folders["d+"], folders["e"], pipe))
    tiny = tiny_vae(pipe.vae, DecoderConfig()).eval()
    macs["tiny_decoder"] = _decoder_macs(tiny, latent)
    _once(
        record, "f decoder", folders["f"], lambda: tiny_decoder_row(pipe, tiny, folders["e"], folders["f"], args.work)
    )
    record["macs"], record["dplus_ratio"] = macs, args.dplus_ratio
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    return record


def export_whole(pipe, folder: Path) -> None:
    from export.onnx import export_onnx

    scratch = _fresh(folder)
    export_onnx(pipe, scratch, progress=True)
    _complete(scratch, folder)


def generator_row(src: Path, folder: Path, pipe) -> None:
    """`src` with a one-step generator schedule: sampled unguided at batch 1, one UNet call."""
    from toolchain.runtime.schedule import write_schedule

    scratch = _fresh(folder)
    shutil.copytree(src, scratch)
    write_schedule(scratch, GENERATOR_TIMESTEPS, pipe.scheduler.config.prediction_type)
    _complete(scratch, folder)


def tiny_decoder_row(pipe, tiny, src: Path, folder: Path, work: Path) -> None:
    """`src` with the tiny decoder exported in place of the VAE decoder."""
    from export.onnx import export_onnx

    vae, pipe.vae = pipe.vae, tiny
    decoder = work / "tiny-decoder"
    shutil.rmtree(decoder, ignore_errors=True)
    export_onnx(pipe, decoder, components=("vae_decoder",), progress=True)
    pipe.vae = vae
    scratch = _fresh(folder)
    shutil.copytree(src, scratch, ignore=shutil.ignore_patterns("vae_decoder"))
    shutil.copytree(decoder / "vae_decoder", scratch / "vae_decoder")
    _complete(scratch, folder)


def _decoder_macs(vae, latent) -> int:
    from export.onnx import VaeDecoderForExport

    return count_macs(VaeDecoderForExport(vae).eval(), latent)


def sampling(row: str) -> dict:
    """How the row draws an image: steps, guidance and the UNet's batch."""
    if row in ("e", "f"):
        return {"steps": 1, "guidance_scale": None, "batch": 1}
    return {"steps": GUIDED_STEPS, "guidance_scale": GUIDANCE, "batch": 2}


def _caller(folder: Path, component: str, batch: int, threads: int):
    from toolchain.runtime.ort import component_inputs, ort_feed, ort_session

    session, _ = ort_session(folder / component / "model.onnx", threads)
    feed = ort_feed(session, component_inputs(folder, component, batch))
    return lambda: session.run(None, feed)


def time_components(folders: dict[str, Path], args) -> dict:
    """UNet calls in pairs with (a)'s, decoders and text-encoder batches in turns; speed-ups vs (a)."""
    from benchmarks.latency import time_interleaved

    anchor = _caller(folders["a"], "unet", 2, args.threads)
    unet = {}
    for row in ("b", "c", "d", "d+", "e"):
        other = _caller(folders[row], "unet", sampling(row)["batch"], args.threads)
        timing = time_interleaved({"a": anchor, row: other}, warmup=1, repeats=args.rounds)
        unet[row] = {
            "ms": timing[row]["median_ms"],
            "a_ms": timing["a"]["median_ms"],
            "speedup": round(timing["a"]["median_ms"] / timing[row]["median_ms"], 3),
            "repeats": args.rounds,
        }
        print(f"UNet {row}: {unet[row]}", flush=True)
        del other
        gc.collect()
    del anchor
    gc.collect()
    decoders = time_interleaved(
        {
            "vae": _caller(folders["a"], "vae_decoder", 1, args.threads),
            "tiny": _caller(folders["f"], "vae_decoder", 1, args.threads),
        },
        warmup=1,
        repeats=args.rounds,
    )
    text = time_interleaved(
        {
            2: _caller(folders["a"], "text_encoder", 2, args.threads),
            1: _caller(folders["a"], "text_encoder", 1, args.threads),
        },
        warmup=1,
        repeats=args.rounds * 3,
    )
    a_ms = statistics.median(r["a_ms"] for r in unet.values())
    unet["a"] = {"ms": round(a_ms, 3), "a_ms": round(a_ms, 3), "speedup": 1.0, "repeats": args.rounds * len(unet)}
    return {"unet": unet, "decoder": decoders, "text_encoder": {str(k): v for k, v in text.items()}}


def _timed_unet(row: str) -> str:
    """The row whose UNet timing a row uses: (f) runs (e)'s UNet."""
    return "e" if row == "f" else row


def composed_ms(row: str, timing: dict) -> float:
    """Text encoder + steps x UNet + decoder; the UNet as (a)'s median over the row's speed-up."""
    s = sampling(row)
    unet_ms = timing["unet"]["a"]["ms"] / timing["unet"][_timed_unet(row)]["speedup"]
    decoder = timing["decoder"]["tiny" if row == "f" else "vae"]["median_ms"]
    return timing["text_encoder"][str(s["batch"])]["median_ms"] + s["steps"] * unet_ms + decoder


def one_image(folder: str, threads: int, steps: int, guidance_scale: float) -> dict:
    """Run in a fresh process (benchmarks.memory): load the row's pipeline, draw one image."""
    import diffusers  # noqa: F401
    import onnxruntime  # noqa: F401
    import transformers  # noqa: F401

    from benchmarks.memory import mark_runtime
    from toolchain.runtime.ort import OrtPipeline

    mark_runtime()
    pipe = OrtPipeline(Path(folder), None, None, threads)
    start = time.perf_counter()
    pipe(["a photo of a cat"], seed=0, steps=steps, guidance_scale=guidance_scale)
    return {"image_ms": round((time.perf_counter() - start) * 1000.0, 1), "load_ms": pipe.load_ms}


def measured_images(folders: dict[str, Path], args) -> dict:
    """One image end to end per row, each in its own fresh process (one at a time): ms and peak RSS."""
    from benchmarks.memory import measure

    rows = {}
    for row, folder in folders.items():
        s = sampling(row)
        spec = (
            "benchmarks.studies.chain_sd15:one_image",
            {
                "folder": str(folder),
                "threads": args.threads,
                "steps": s["steps"],
                "guidance_scale": s["guidance_scale"] or 1.0,
            },
        )
        out = measure([spec], workers=1, timeout_s=3600.0)[0]
        rows[row] = {
            **out["result"],
            "peak_rss_bytes": out["peak_rss_bytes"],
            "runtime_rss_bytes": out["runtime_rss_bytes"],
        }
        print(f"image {row}: {rows[row]}", flush=True)
    return rows


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for name in COMPONENTS for p in (folder / name).rglob("*") if p.is_file())


def table(record: dict, timing: dict, images: dict, folders: dict[str, Path], args) -> dict:
    """One row per chain step: MACs, size, UNet call, per image composed and measured, peak RSS."""
    macs = record["macs"]
    unet_of = {"a": "a", "b": "a", "c": "c", "d": "c", "d+": "d+", "e": "d+", "f": "d+"}
    rows = {}
    for row in ROWS:
        s = sampling(row)
        per_call = 2 if s["guidance_scale"] else 1
        decoder = macs["tiny_decoder" if row == "f" else "vae_decoder"]
        rows[row] = {
            "what": ROWS[row].format(ratio=args.dplus_ratio),
            **s,
            "macs_per_image": per_call * (macs["text_encoder"] + s["steps"] * macs["unet"][unet_of[row]]) + decoder,
            "size_bytes": folder_bytes(folders[row]),
            "unet_ms": round(timing["unet"]["a"]["ms"] / timing["unet"][_timed_unet(row)]["speedup"], 2),
            "unet_speedup": timing["unet"][_timed_unet(row)]["speedup"],
            "image_composed_ms": round(composed_ms(row, timing), 1),
            "image_measured_ms": images[row]["image_ms"],
            "peak_rss_bytes": images[row]["peak_rss_bytes"],
        }
    base = rows["a"]
    for r in rows.values():
        r["size_ratio"] = round(r["size_bytes"] / base["size_bytes"], 4)
        r["macs_ratio"] = round(r["macs_per_image"] / base["macs_per_image"], 5)
        r["image_composed_speedup"] = round(base["image_composed_ms"] / r["image_composed_ms"], 2)
        r["image_measured_speedup"] = round(base["image_measured_ms"] / r["image_measured_ms"], 2)
    return rows


def verdicts(rows: dict) -> dict:
    """The issue's targets, met or not, as measured."""
    f, dplus = rows["f"], rows["d+"]
    return {
        "f_speedup_composed": {
            "value": f["image_composed_speedup"],
            "target": f">= {TARGETS['f_speedup_min']}",
            "met": f["image_composed_speedup"] >= TARGETS["f_speedup_min"],
        },
        "f_speedup_measured": {
            "value": f["image_measured_speedup"],
            "target": f">= {TARGETS['f_speedup_min']}",
            "met": f["image_measured_speedup"] >= TARGETS["f_speedup_min"],
        },
        "f_size_ratio": {
            "value": f["size_ratio"],
            "target": f"<= {TARGETS['f_size_max']}",
            "met": f["size_ratio"] <= TARGETS["f_size_max"],
        },
        "dplus_unet_speedup": {
            "value": dplus["unet_speedup"],
            "target": f">= {TARGETS['dplus_unet_speedup_min']}",
            "met": dplus["unet_speedup"] >= TARGETS["dplus_unet_speedup_min"],
        },
    }


def to_markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        "# The per-image chain on the SD-1.5 architecture (random weights), ONNX Runtime CPU",
        "",
        f"`{env['command']}` — {env['cpu']}, {env['threads']} intra-op threads, "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
        + ".",
        "",
        "Speed-ups are against (a), timed in turns in one process (UNets in pairs with (a)'s); per image "
        "composed = text encoder + steps x UNet + decoder from those timings; measured = one image end to "
        "end in a fresh process, whose peak RSS is the last column. Weights are random: the figures are "
        "what the shapes cost.",
        "",
        "| row | what | GMACs / image | x | size MB | x | UNet ms (batch) | UNet speed-up | image s composed | "
        "speed-up | image s measured | speed-up | peak RSS GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["rows"].items():
        lines.append(
            f"| {name} | {r['what']} | {r['macs_per_image'] / 1e9:.1f} | {r['macs_ratio']:.4f} | "
            f"{r['size_bytes'] / 1e6:.0f} | {r['size_ratio']:.3f} | {r['unet_ms']:.0f} ({r['batch']}) | "
            f"{r['unet_speedup']:.2f}x | {r['image_composed_ms'] / 1000:.2f} | {r['image_composed_speedup']:.1f}x | "
            f"{r['image_measured_ms'] / 1000:.2f} | {r['image_measured_speedup']:.1f}x | "
            f"{r['peak_rss_bytes'] / 2**30:.2f} |"
        )
    lines += ["", "Targets (issue 17):", ""]
    for name, v in result["verdicts"].items():
        lines.append(f"- {name}: {v['value']} (target {v['target']}): {'met' if v['met'] else 'NOT met'}")
    t = result["timing"]
    lines += [
        "",
        f"Decoder (batch 1, {t['decoder']['vae']['repeats']} turns): VAE {t['decoder']['vae']['median_ms']:.0f} ms, "
        f"tiny {t['decoder']['tiny']['median_ms']:.0f} ms. Text encoder: batch 2 "
        f"{t['text_encoder']['2']['median_ms']:.0f} ms, batch 1 {t['text_encoder']['1']['median_ms']:.0f} ms. "
        f"Build seconds (this run's builds; cached folders are not rebuilt): {result['build'].get('build_s')}.",
    ]
    return "\n".join(lines) + "\n"


def environment(args) -> dict:
    from importlib.metadata import version

    from benchmarks.studies.export_sd15 import cpu_model

    return {
        "cpu": cpu_model(),
        "threads": args.threads,
        "versions": {d: version(d) for d in ("onnxruntime", "onnx", "torch", "diffusers", "torch-pruning")},
        "command": "python -m benchmarks.studies.chain_sd15 " + " ".join(sys.argv[1:]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (fixed for every row)")
    parser.add_argument("--rounds", type=int, default=3, help="timed turns per pair")
    parser.add_argument("--dplus-ratio", type=float, default=0.6, help="channel pruning ratio of row (d+)")
    parser.add_argument("--calibration-steps", type=int, default=10)
    parser.add_argument("--calibration-feeds", type=int, default=4)
    parser.add_argument("--unet-config", default="sd15", help="UNet config (a small one tries the script)")
    parser.add_argument("--vae-config", default=None, help="VAE config JSON (default configs/models/sd15-vae.json)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/chain-sd15"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/chain-sd15"))
    args = parser.parse_args(argv)
    if min(args.threads, args.rounds, args.calibration_steps, args.calibration_feeds) < 1:
        parser.error("--threads, --rounds, --calibration-steps and --calibration-feeds must be at least 1")
    if not 0.0 < args.dplus_ratio < 1.0:
        parser.error(f"--dplus-ratio {args.dplus_ratio}: must be in (0, 1)")

    import torch

    from benchmarks.studies.digits_erase import handwritten_section

    torch.set_num_threads(args.threads)
    env = environment(args)
    record = build(args)
    folders = row_folders(args)
    timing = time_components(folders, args)
    images = measured_images(folders, args)
    rows = table(record, timing, images, folders, args)
    result = {"environment": env, "build": record, "timing": timing, "images": images, "rows": rows}
    result["verdicts"] = verdicts(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    md = args.out.with_suffix(".md")
    md.write_text(to_markdown(result) + handwritten_section(md))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
