"""Measure the digits-world model: per-digit judge accuracy, judge FID, nearest-neighbour check.

    python -m benchmarks.testbed.evaluate_digits [--model DIR] [--n-per-digit N] [--guidance-scale G]

Writes benchmarks/results/digits-model.json and .md. Every digit is prompted with all its
phrasings in turn (training and held-out ones), sampled with DDIM at `--steps` steps and
classifier-free guidance. The nearest-neighbour check compares each generated digit's distance
to the closest generator-training digit with the same distance for real digits the generator
never saw: copies would sit far below that reference.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np

from benchmarks import quality
from benchmarks.testbed import digits
from benchmarks.testbed.judge import judge_report, load_judge
from toolchain.runtime.pytorch import diffusers_generator
from toolchain.runtime.sampler import DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS

logger = logging.getLogger(__name__)

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "toolchain" / "assets" / "digits-sd"
RESULTS = Path(__file__).resolve().parents[1] / "results"


def digit_prompts(n_per_digit: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """n_per_digit prompts per digit cycling through its phrasings -> prompts, labels, is_heldout."""
    prompts, labels, heldout = [], [], []
    for d in range(10):
        train, held = digits.train_prompts(d), digits.heldout_prompts(d)
        phrasings = train + held
        for i in range(n_per_digit):
            prompts.append(phrasings[i % len(phrasings)])
            labels.append(str(d))
            heldout.append(i % len(phrasings) >= len(train))
    return prompts, np.asarray(labels), np.asarray(heldout)


def evaluate(model: Path, n_per_digit: int, steps: int, guidance_scale: float, seed: int) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(seed)
    judge = load_judge()
    split = digits.load_split()
    pipe = StableDiffusionPipeline.from_pretrained(model)
    generate = diffusers_generator(pipe, steps=steps, guidance_scale=guidance_scale)
    prompts, labels, heldout = digit_prompts(n_per_digit)
    t0 = time.perf_counter()
    images = generate(prompts, seed)
    gen_s = time.perf_counter() - t0
    judged = judge.classify(images).labels
    correct = judged == labels
    per_digit = {str(d): float(correct[labels == str(d)].mean()) for d in range(10)}

    # Real digits reach the judge through the same 16x16 path as generated ones.
    real = digits.upsample(split.heldout_images, images.shape[1])
    fid = quality.judge_fid(images, real, judge)
    # Reference points at the same sample count: real generator-split digits vs held-out reals.
    rng = np.random.default_rng(seed)
    ref_idx = rng.choice(len(split.generator_images), size=min(len(images), len(split.generator_images)), replace=False)
    fid_real = quality.judge_fid(digits.upsample(split.generator_images[ref_idx], images.shape[1]), real, judge)

    # The VAE bounds what the UNet can reach: judge its reconstructions of unseen real digits.
    with torch.no_grad():
        pixels = torch.from_numpy(digits.to_model_range(digits.upsample(split.heldout_images)))
        recon = pipe.vae.decode(pipe.vae.encode(pixels).latent_dist.mean).sample
    recon = (recon.permute(0, 2, 3, 1).numpy() / 2 + 0.5).clip(0, 1)
    vae_acc = judge.accuracy(recon, split.heldout_labels)

    small = digits.downsample(images)
    # Every side through the same 8 -> 16 -> 8 path, so blur does not pass for novelty.
    via16 = lambda im: digits.downsample(digits.upsample(im, images.shape[1]))  # noqa: E731
    training = via16(split.generator_images)
    nn_gen = quality.nearest_neighbour_distances(small, training)
    nn_real = quality.nearest_neighbour_distances(via16(split.heldout_images), training)
    try:
        shown = model.resolve().relative_to(Path.cwd())
    except ValueError:
        shown = model
    return {
        "model": str(shown),
        "command": "python -m benchmarks.testbed.evaluate_digits "
        f"--model {shown} --n-per-digit {n_per_digit} --steps {steps} --guidance-scale {guidance_scale} --seed {seed}",
        "sampler": {
            "scheduler": type(pipe.scheduler).__name__,
            "steps": steps,
            "guidance_scale": guidance_scale,
            "seed": seed,
            "size": list(images.shape[1:]),
        },  # fmt: skip
        "n_images": int(len(images)),
        "accuracy": float(correct.mean()),
        "accuracy_training_phrasings": float(correct[~heldout].mean()),
        "accuracy_heldout_phrasings": float(correct[heldout].mean()),
        "per_digit_accuracy": per_digit,
        "min_digit_accuracy": min(per_digit.values()),
        "judge_fid_generated_vs_heldout_real": fid,
        "judge_fid_real_generator_split_vs_heldout_real": fid_real,
        "nn_distance": {
            "generated_to_training_mean": float(nn_gen.mean()),
            "heldout_real_to_training_mean": float(nn_real.mean()),
            "ratio": float(nn_gen.mean() / nn_real.mean()),
            "generated_below_0.5_share": float((nn_gen < 0.5).mean()),
            "heldout_real_below_0.5_share": float((nn_real < 0.5).mean()),
            "space": "8x8 pixels in [0, 1], Euclidean; real digits upsampled to the generated size and "
            "area-downsampled like generated ones",
        },
        "judge": judge_report(),
        "judge_accuracy_on_vae_reconstructions_of_heldout_real": vae_acc,
        "generation_s": round(gen_s, 1),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "versions": _versions(),
    }


def _versions() -> dict[str, str]:
    import diffusers
    import sklearn
    import torch
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "scikit-learn": sklearn.__version__, "numpy": np.__version__}  # fmt: skip


def to_markdown(r: dict) -> str:
    s, nn = r["sampler"], r["nn_distance"]
    lines = [
        "# Digits-world model quality",
        "",
        f"`{r['command']}`",
        "",
        f"{r['n_images']} images, {s['scheduler']} {s['steps']} steps, guidance scale {s['guidance_scale']}, "
        f"{s['size'][0]}x{s['size'][1]} px, seed {s['seed']}; {r['machine']['platform']}, "
        f"{r['machine']['cpu_count']} CPUs; generation {r['generation_s']} s.",
        "",
        "| digit | " + " | ".join(r["per_digit_accuracy"]) + " | all |",
        "|---|" + "---|" * (len(r["per_digit_accuracy"]) + 1),
        "| judge accuracy | "
        + " | ".join(f"{v:.3f}" for v in r["per_digit_accuracy"].values())
        + f" | {r['accuracy']:.3f} |",
        "",
        f"- Accuracy on training phrasings {r['accuracy_training_phrasings']:.3f}, "
        f"on held-out phrasings {r['accuracy_heldout_phrasings']:.3f}.",
        f"- Judge-feature FID (20 principal components of real 8x8 digits; real digits upsampled to the "
        f"generated size first), generated vs held-out real digits: {r['judge_fid_generated_vs_heldout_real']:.3f} "
        f"(real generator-split digits vs the same held-out digits, same N: "
        f"{r['judge_fid_real_generator_split_vs_heldout_real']:.3f}).",
        f"- Nearest-neighbour distance to the generator's training digits (8x8, [0, 1]): generated "
        f"{nn['generated_to_training_mean']:.3f}, held-out real {nn['heldout_real_to_training_mean']:.3f} "
        f"(ratio {nn['ratio']:.2f}); share closer than 0.5: generated {nn['generated_below_0.5_share']:.3f}, "
        f"real {nn['heldout_real_below_0.5_share']:.3f}.",
        f"- Judge on real digits it was not fitted on: {r['judge']['judge_eval_accuracy']:.3f} "
        f"(via 16x16: {r['judge']['judge_eval_accuracy_via_16x16']:.3f}; on the generator's split via 16x16: "
        f"{r['judge']['generator_split_accuracy_via_16x16']:.3f}).",
        f"- Judge accuracy on VAE reconstructions of held-out real digits: "
        f"{r['judge_accuracy_on_vae_reconstructions_of_heldout_real']:.3f}.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()) + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--n-per-digit", type=int, default=100)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE_SCALE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "digits-model.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = evaluate(args.model, args.n_per_digit, args.steps, args.guidance_scale, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(to_markdown(result))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
