"""Finetune stage on the digits world: erase digit 7 from a 30%-channel-pruned student.

Rows: the teacher, the pruned student without fine-tuning, distillation alone, distill-then-ESD
(sequential, same steps in total), bilevel with every unlearning objective, distillation
followed by ConceptPrune (skill_ratio 0.3: at the paper's 0.01-0.02 it changes nothing on this
model), and `bilevel-penalty-<objective>` (finetune.mode=bilevel-penalty, BOME on split variables:
needs `--set trainable=cross_attention` or non_cross_attention). Columns: leakage of 7 on its
training prompts and on held-out phrasings, judge accuracy on the other nine digits (2 prompts
each), judge FID of those images, training wall time (the teacher samples, generated once and
shared by every row, are not counted) and steps. `--samples-cache FILE` reuses teacher samples of
the same settings from FILE, else generates them and writes FILE.

    python -m benchmarks.studies.finetune_digits --steps 300 --out benchmarks/results/finetune-digits
    python -m benchmarks.studies.finetune_digits --steps 300 --rows bilevel-esd bilevel-penalty-esd \
        --set trainable=cross_attention --n-per-prompt 4 --out benchmarks/results/penalty-digits
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.studies.digits_erase import (
    erase_seven,
    finetune_config,
    flat_finetune,
    handwritten_section,
    markdown_header,
    write_result,
)

ROWS = (
    "teacher",
    "pruned",
    "distill",
    "sequential-esd",
    "bilevel-esd",
    "bilevel-ablation",
    "bilevel-erasediff",
    "bilevel-override",
    "bilevel-all-but-one",
    "distill+conceptprune",
    "bilevel-penalty-esd",
    "bilevel-penalty-ablation",
    "bilevel-penalty-erasediff",
    "bilevel-penalty-override",
    "bilevel-penalty-all-but-one",
)
DEFAULT_ROWS = [name for name in ROWS if not name.startswith("bilevel-penalty")]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--n-per-prompt", type=int, default=8)
    parser.add_argument("--rows", nargs="*", default=DEFAULT_ROWS, choices=ROWS)
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    parser.add_argument("--samples-cache", type=Path, default=None, help="reuse teacher samples from this file")
    parser.add_argument(
        "--timing",
        type=int,
        default=0,
        metavar="STEPS",
        help="only time distill vs bilevel-esd, alternating 3 times with STEPS steps each; merged into OUT.json",
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        help="FinetuneConfig overrides key=value (YAML values; esd.eta=2.0 sets a sub-config)",
    )
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    import diffusers
    import transformers

    from benchmarks.leakage import evaluate_concepts
    from toolchain.config import to_dict
    from toolchain.finetune import prepare_data, retain_prompt_list, train
    from toolchain.runtime.pytorch import diffusers_generator

    base = finetune_config(args.set, steps=args.steps, checkpoint_every=10**6)
    world = erase_seven(0.3)
    seven, pipe, teacher, student0, judge = world.seven, world.pipe, world.teacher, world.student0, world.judge
    erase, heldout, retain = world.erase, world.heldout, world.retain

    tmp = Path(tempfile.mkdtemp(prefix="finetune-digits-"))
    if args.samples_cache is not None:  # a cache that is not there yet is made, so the command runs anywhere
        args.samples_cache.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = prepare_data(
        pipe,
        retain_prompt_list(base, [seven]),
        [(p, seven.anchor_prompt) for p in seven.erase_prompts],
        base,
        args.samples_cache or tmp / "samples.safetensors",
        progress=True,
    )
    sample_s = time.perf_counter() - start

    def evaluate(unet) -> dict:
        pipe.unet = unet.eval()
        generate = diffusers_generator(pipe)
        scores = evaluate_concepts(generate, judge, erase, retain, args.n_per_prompt, seed=1)
        held = evaluate_concepts(generate, judge, heldout, {}, args.n_per_prompt, seed=2)
        pipe.unet = teacher
        return {
            "leakage_7": scores.leakage["7"],
            "leakage_7_heldout": held.leakage["7"],
            "retain_accuracy": scores.retain_accuracy,
            "fid": scores.fid,
        }

    def finetune(mode: str, objective: str = "esd", **extra):
        cfg = dataclasses.replace(base, mode=mode, objective=objective, **extra)
        out = tmp / f"{mode}-{objective}-{len(list(tmp.iterdir()))}"  # never resume another row's run
        student, summary = train(copy.deepcopy(student0), teacher, data, cfg, dict(pipe.scheduler.config), out, True)
        return student, summary["wall_s"]

    if args.timing:
        runs = {"distill": [], "bilevel-esd": []}
        timing_base = base
        for _ in range(3):
            for name, mode in (("distill", "distill"), ("bilevel-esd", "bilevel")):
                cfg = dataclasses.replace(timing_base, steps=args.timing, mode=mode)
                _, summary = train(
                    copy.deepcopy(student0),
                    teacher,
                    data,
                    cfg,
                    dict(pipe.scheduler.config),
                    tmp / f"timing-{name}-{len(runs[name])}",
                    False,
                )
                runs[name].append(summary["wall_s"])
        best = {k: min(v) for k, v in runs.items()}
        timing = {
            "steps": args.timing,
            "wall_s": runs,
            "best_s": best,
            "bilevel_over_distill": round(best["bilevel-esd"] / best["distill"], 3),
        }
        print("timing", timing, flush=True)
        if args.out is not None and args.out.with_suffix(".json").is_file():
            result = json.loads(args.out.with_suffix(".json").read_text())
            result["timing"] = {
                **timing,
                "command": "python -m benchmarks.studies.finetune_digits "
                + " ".join(sys.argv[1:] if argv is None else argv),
            }
            args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
            args.out.with_suffix(".md").write_text(render(result, args.out.with_suffix(".md")))
        return {"timing": timing}

    rows = {}
    for name in args.rows:
        wall, steps = 0.0, 0
        if name == "teacher":
            unet = teacher
        elif name == "pruned":
            unet = student0
        elif name in ("distill", "distill+conceptprune"):
            unet, wall = finetune("distill")
            steps = base.steps
            if name == "distill+conceptprune":
                from toolchain.pruning.concept_neurons import concept_prune

                pipe.unet = unet
                start = time.perf_counter()
                concept_prune(
                    pipe, seven.erase_prompts, [seven.anchor_prompt], skill_ratio=0.3, steps=25, guidance_scale=5.0
                )
                wall += time.perf_counter() - start
                pipe.unet = teacher
        elif name == "sequential-esd":
            unet, wall = finetune("sequential", "esd")
            steps = base.steps
        elif name.startswith("bilevel-penalty-"):
            unet, wall = finetune("bilevel-penalty", name.removeprefix("bilevel-penalty-"))
            steps = base.steps
        else:
            unet, wall = finetune("bilevel", name.removeprefix("bilevel-"))
            steps = base.steps
        rows[name] = {**evaluate(unet), "wall_s": round(wall, 1), "steps": steps}
        print(name, rows[name], flush=True)

    result = {
        "command": "python -m benchmarks.studies.finetune_digits " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch_threads": 1},
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        },
        "settings": {
            **to_dict(base),
            "prune_ratio": 0.3,
            "erase": "7",
            "n_per_prompt": args.n_per_prompt,
            "teacher_samples_s": round(sample_s, 1),
            "teacher_samples": len(data.latents),
        },
        "rows": rows,
    }
    if args.out is not None:  # keep the hand-written section of an existing OUT.md
        write_result(args.out, result, lambda r: render(r, args.out.with_suffix(".md")))
    return result


def render(result: dict, md: Path) -> str:
    """OUT.md's text: the table rendered from `result` plus the hand-written section of `md`."""
    return to_markdown(result) + handwritten_section(md)


def to_markdown(result: dict) -> str:
    rows = result["rows"]
    penalty = any(name.startswith("bilevel-penalty") for name in rows)
    title = "Finetune stage on the digits world: erase 7, 30% channel pruning"
    if penalty:
        title = "bilevel-penalty (BOME) vs bilevel on the digits world: erase 7, 30% channel pruning"
    teacher_acc = rows.get("teacher", {}).get("retain_accuracy")
    distill_s = rows.get("distill", {}).get("wall_s")
    lines = [
        *markdown_header(title, result),
        "| row | leakage 7 | leakage 7 (held-out) | retain acc | retain / teacher | judge FID | wall s | x distill | steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        rel = f"{r['retain_accuracy'] / teacher_acc:.2f}" if teacher_acc else "-"
        speed = f"{r['wall_s'] / distill_s:.2f}" if distill_s and r["steps"] else "-"
        fid = f"{r['fid']:.1f}" if r["fid"] is not None else "-"
        lines.append(
            f"| {name} | {r['leakage_7']:.1%} | {r['leakage_7_heldout']:.1%} | {r['retain_accuracy']:.1%} | {rel} | "
            f"{fid} | {r['wall_s']} | {speed} | {r['steps']} |"
        )
    s = flat_finetune(result["settings"])
    lines += [
        "",
        f"Settings: lower_lr {s['lower_lr']}, upper_lr {s['upper_lr']}, K={s['upper_every']}, batch {s['batch_size']}, "
        f"{s['teacher_samples']} teacher samples ({s['teacher_samples_s']} s, shared, not in wall s), "
        f"{s['n_per_prompt']} images per prompt, DDIM 25 steps, guidance 5.",
        "Target: bilevel leakage <= 5% with retain >= 95% of the teacher's at <= 1.2x distill's wall time.",
        "Wall s in the table was taken on 2 CPU cores shared with other jobs, so it is noisy.",
        "",
    ]
    if penalty:
        lines[-1:-1] = [
            f"Trainable subset (bilevel: upper steps; bilevel-penalty: upper variables) {s['trainable']}; "
            f"bilevel-penalty: inner_steps {s['inner_steps']}, penalty_eta {s['penalty_eta']}; "
            f"upper_batch_size {s['upper_batch_size']}, seed {s['seed']}.",
        ]
    if "timing" in result:
        t = result["timing"]
        lines += [
            f"Timing (`{t['command']}`): distill vs bilevel-esd, {t['steps']} steps each, alternated 3 times, "
            f"best of 3: distill {t['best_s']['distill']} s, bilevel-esd {t['best_s']['bilevel-esd']} s, "
            f"ratio {t['bilevel_over_distill']}x (all runs: {t['wall_s']}).",
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
