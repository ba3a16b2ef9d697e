"""The tiny decoder (stage `decoder`) measured: judge accuracy on the digits world, MACs and latency
on the SD-1.5 VAE's architecture.

    python -m benchmarks.studies.decoder [--steps N] [--images-per-prompt N] [--threads N]
        [--out benchmarks/results/decoder]

Digits: the decoder is distilled exactly as the stage distils it (default `decoder.*` settings, the
default recipe's teacher samples of the embedded model, from the cross-run cache or made there);
then the embedded model draws every digit's prompts twice from the same seeds, once through its own
VAE and once through the tiny decoder, and the digits judge scores both (accuracy with image counts
and Wilson intervals; target: within 1 point). SD-1.5: the VAE built from `configs/models/sd15-vae.json`
with random weights and the tiny decoder shaped for it, MACs of one 512x512 decode (torch-pruning's
counter) and ONNX Runtime CPU latency, the two timed in turns at fixed threads.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULT_KEYS = ("digits", "sd15")


def digits(args) -> dict:
    """Judge accuracy of the embedded model's images through its VAE and through the tiny decoder."""
    import torch

    from benchmarks.leakage import evaluate_concepts, get_judge
    from toolchain import artifact as art
    from toolchain.cache import default_cache_dir
    from toolchain.config import DecoderConfig, load_config, resolve_finetune
    from toolchain.finetune import sampled_prompts, shared_teacher_samples, training_examples
    from toolchain.finetune.decoder import distill_decoder
    from toolchain.models.io import EMBEDDED_MODEL, load_pipeline
    from toolchain.runtime.pytorch import diffusers_generator
    from toolchain.stages.benchmark import _evaluation_plan

    cfg, _ = load_config("default", "onnx", [], ["7"])
    finetune = resolve_finetune(cfg.finetune, ["7"])
    examples = training_examples(finetune, ["7"])
    pipe = load_pipeline(EMBEDDED_MODEL)
    teacher = art.hash_folder(EMBEDDED_MODEL)
    prompts = sampled_prompts(examples.retain, examples.forget, examples.forget_images)
    latents, _ = shared_teacher_samples(pipe, prompts, finetune, default_cache_dir(), teacher, progress=True)
    decoder_cfg = DecoderConfig(steps=args.steps)
    student, summary = distill_decoder(pipe.vae, latents, decoder_cfg, progress=True)
    plan = _evaluation_plan(
        art.Artifact(path=EMBEDDED_MODEL, kind="diffusers", model_path=EMBEDDED_MODEL), [], cfg.benchmark
    )
    judge = get_judge(plan["judge"], **plan["options"])
    rows = {}
    for name, vae in (("vae", pipe.vae), ("tiny", student)):
        pipe.vae = vae
        generate = diffusers_generator(
            pipe, steps=cfg.benchmark.eval_steps, guidance_scale=cfg.benchmark.guidance_scale
        )
        with torch.no_grad():
            scores = evaluate_concepts(generate, judge, {}, plan["retain"], args.images_per_prompt, cfg.benchmark.seed)
        rows[name] = {**scores.to_report(), **scores.intervals(), "per_label_accuracy": scores.per_label_accuracy}
    points = 100 * (rows["tiny"]["retain_accuracy"] - rows["vae"]["retain_accuracy"])
    return {"training": summary, "rows": rows, "accuracy_points": round(points, 2), "within_1_point": abs(points) <= 1}


def count_macs(module, example) -> int:
    """MACs per sample of one call of `module` on `example` (a tensor or a tuple of positional
    inputs; torch-pruning's counter divides by the batch): conv, linear and norm layers."""
    import torch
    import torch_pruning as tp

    with torch.no_grad():
        macs, _ = tp.utils.count_ops_and_params(module, example)
    return int(macs)


def sd15(args) -> dict:
    """MACs and ONNX Runtime latency of one 512x512 decode: SD-1.5's VAE decoder vs the tiny one."""
    import torch
    from diffusers import AutoencoderKL

    from benchmarks.latency import time_interleaved
    from export.onnx import VaeDecoderForExport
    from toolchain.config import CONFIG_DIR, DecoderConfig
    from toolchain.finetune.decoder import tiny_vae
    from toolchain.runtime.ort import ort_session

    torch.manual_seed(args.seed)
    vae = AutoencoderKL.from_config(json.loads((CONFIG_DIR / "models" / "sd15-vae.json").read_text())).eval()
    tiny = tiny_vae(vae, DecoderConfig()).eval()
    latent = torch.randn(1, 4, 64, 64)
    decoders = {"vae": VaeDecoderForExport(vae).eval(), "tiny": VaeDecoderForExport(tiny).eval()}
    rows, calls = {}, {}
    with tempfile.TemporaryDirectory(prefix="decoder-sd15-") as tmp:
        for name, module in decoders.items():
            path = Path(tmp) / f"{name}.onnx"
            with torch.no_grad():
                torch.onnx.export(
                    module, (latent,), str(path), input_names=["latent_sample"], opset_version=17, dynamo=False
                )
            session, provider = ort_session(path, args.threads)
            feed = {"latent_sample": latent.numpy()}
            calls[name] = lambda session=session, feed=feed: session.run(None, feed)
            inner = module.vae.decoder
            rows[name] = {
                "decoder_params": sum(p.numel() for p in inner.parameters()),
                "macs": count_macs(module, latent),
                "onnx_bytes": path.stat().st_size,
                "provider": provider,
            }
        timing = time_interleaved(calls, args.warmup, args.repeats)
    for name in rows:
        rows[name].update(timing[name])
    ratio = {
        "macs": round(rows["tiny"]["macs"] / rows["vae"]["macs"], 4),
        "latency": round(rows["tiny"]["median_ms"] / rows["vae"]["median_ms"], 4),
        "speedup": round(rows["vae"]["median_ms"] / rows["tiny"]["median_ms"], 2),
    }
    return {"latent": [1, 4, 64, 64], "image": [1, 3, 512, 512], "threads": args.threads, "rows": rows, "ratio": ratio}


def to_markdown(result: dict) -> str:
    d, s = result["digits"], result["sd15"]
    lines = [
        "# Tiny decoder (stage `decoder`)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}; wall {result['wall_s']} s.",
        "",
        "## Digits world: judge accuracy through the model's VAE and through the tiny decoder",
        "",
        f"Distilled with the default `decoder.*` settings ({d['training']['steps']} steps, "
        f"{d['training']['wall_s']} s); held-out PSNR against the VAE {d['training']['held_out']['psnr_db']} dB "
        f"over {d['training']['held_out']['n']} latents (untrained: {d['training']['held_out_untrained']['psnr_db']} dB); "
        f"decoder parameters {d['training']['decoder_params']:,} vs the VAE decoder's {d['training']['vae_decoder_params']:,}.",
        "",
        "| decoder | judge accuracy (all ten digits) | images | 95% interval | FID (judge) |",
        "|---|---|---|---|---|",
    ]
    for name, row in d["rows"].items():
        low, high = row["retain_ci95"]
        lines.append(
            f"| {name} | {row['retain_accuracy']:.4f} | {row['retain_n']} | {low:.3f}–{high:.3f} | {row['fid']:.3f} |"
        )
    verdict = "within" if d["within_1_point"] else "NOT within"
    lines += ["", f"Tiny minus VAE: {d['accuracy_points']:+.2f} points ({verdict} the 1-point target).", ""]
    lines += [
        "## SD-1.5 architecture: one 512x512 decode (random weights), ONNX Runtime CPU, timed in turns",
        "",
        "| decoder | parameters | GMACs | median ms | p90 ms | ONNX MB |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in s["rows"].items():
        lines.append(
            f"| {name} | {row['decoder_params']:,} | {row['macs'] / 1e9:.1f} | {row['median_ms']:.0f} | "
            f"{row['p90_ms']:.0f} | {row['onnx_bytes'] / 1e6:.1f} |"
        )
    r = s["ratio"]
    lines += [
        "",
        f"Tiny / VAE: MACs {r['macs']:.3f}x, latency {r['latency']:.3f}x ({r['speedup']}x faster); threads {s['threads'] or 'default'}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="decoder.steps (the stage's default)")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/decoder")
    args = parser.parse_args(argv)
    import torch

    from benchmarks.latency import machine_info
    from benchmarks.studies.digits_erase import handwritten_section

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = {
        "command": "python -m benchmarks.studies.decoder " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "digits": digits(args),
        "sd15": sd15(args),
    }
    result["wall_s"] = round(time.perf_counter() - start, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=_plain) + "\n")
    md = out.with_suffix(".md")
    md.write_text(to_markdown(result) + handwritten_section(md))
    print(to_markdown(result))
    return 0


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value)} is not JSON")


if __name__ == "__main__":
    raise SystemExit(main())
