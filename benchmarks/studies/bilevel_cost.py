"""Bilevel against sequential at equal cost on the digits world: the seed paper's claim, measured.

Erase 7. From the same 30%-channel-pruned student and, per seed, the same teacher samples, every
arm trains for the default recipe's steps with its settings and pauses every `--every` steps to
judge leakage of 7 and accuracy on the other digits: curves against steps and against training
wall time (judging excluded). Arms: `distill` (no unlearning); `sequential-<objective>` (distill,
then unlearn for the last steps // K steps); `bilevel-<objective>` (one upper step every K lower
steps); `penalty-<objective>` (bilevel-penalty, BOME: the cross-attention is the upper variable).

The claim, per objective: bilevel reaches sequential's final leakage within 60% of sequential's
steps, at <= 1.1x distillation's wall time per step; with bilevel's retain accuracy at that point.

    python -m benchmarks.studies.bilevel_cost --seeds 0 1 2 --out benchmarks/results/bilevel-cost
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import tempfile
from pathlib import Path

from benchmarks.studies.attack_digits import drop_option
from benchmarks.studies.digits_erase import handwritten_section, markdown_header, write_result
from benchmarks.studies.erasure_digits import digits_judging, evaluate, load_group, recipe_finetune, reproducing_args

ARMS = (
    "distill",
    *(f"{mode}-{objective}" for objective in ("esd", "erasediff", "ablation") for mode in ("sequential", "bilevel")),
    "penalty-esd",
)
CLAIM = {"steps_share": 0.6, "cost_per_step": 1.1}


def arm_config(base, arm: str):
    """The default recipe's finetune config for `arm`."""
    if arm == "distill":
        return dataclasses.replace(base, mode="distill")
    mode, objective = arm.split("-", 1)
    if mode == "penalty":
        return dataclasses.replace(base, mode="bilevel-penalty", objective=objective, trainable="cross_attention")
    return dataclasses.replace(base, mode=mode, objective=objective)


def curve(student0, teacher, data, cfg, scheduler_config, every: int, out: Path, measure) -> list[dict]:
    """Train a copy of `student0` in segments of `every` steps (resumed from the checkpoint each
    leaves); after each, the cumulative training wall time and `measure(unet)`."""
    from toolchain.finetune import train

    cfg = dataclasses.replace(cfg, checkpoint_every=every)
    student, wall, points = copy.deepcopy(student0), 0.0, []
    for step in range(every, cfg.steps + 1, every):
        student, summary = train(student.train(), teacher, data, cfg, scheduler_config, out, stop_after=every)
        wall += summary["wall_s"]
        points.append({"step": step, "wall_s": round(wall, 2), **measure(student)})
    return points


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="*", default=list(ARMS), choices=ARMS)
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--every", type=int, default=100, help="steps between judgings")
    parser.add_argument("--n-per-prompt", type=int, default=16, help="judged images per prompt at each judging")
    parser.add_argument("--recipe", default="default")
    parser.add_argument("--set", nargs="*", default=[], help="finetune overrides key=value (finetune. implied)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json, OUT.md and OUT.png")
    parser.add_argument("--merge", nargs="*", type=Path, default=[], help="take arms from these result JSONs")
    parser.add_argument("--samples-dir", type=Path, default=Path(tempfile.gettempdir()) / "erasure-digits-samples")
    args = parser.parse_args(argv)

    import torch

    from toolchain.config import to_dict
    from toolchain.finetune import prepare_data, training_examples
    from toolchain.pruning.channels import prune_unet_channels

    pipe, judge = digits_judging(args.threads)
    group = load_group("7")
    base0 = recipe_finetune(args.recipe, group, 0, args.set)
    settings = {"recipe": args.recipe, "set": args.set, "finetune": to_dict(base0), "prune_ratio": 0.3}
    settings |= {"every": args.every, "n_per_prompt": args.n_per_prompt, "claim": CLAIM}
    result = {
        "command": "python -m benchmarks.studies.bilevel_cost " + " ".join(reproducing_args(argv)),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch_threads": args.threads},
        "versions": {"torch": torch.__version__},
        "settings": settings,
        "arms": {},
    }
    for path in args.merge:
        merge_into(result, json.loads(path.read_text()), path)

    def measure(unet) -> dict:  # erasure_digits' judging, without the held-out phrasings
        found = evaluate(pipe, unet, dataclasses.replace(group, heldout={}), judge, args.n_per_prompt)
        return {"leakage": found["leakage"]["7"], "retain": found["retain"]}

    for seed in args.seeds:
        base = recipe_finetune(args.recipe, group, seed, args.set)
        examples = training_examples(base, ["7"])
        args.samples_dir.mkdir(parents=True, exist_ok=True)
        cache = args.samples_dir / f"7-seed{seed}.safetensors"  # erasure_digits' samples of the same seed
        data = prepare_data(pipe, examples.retain, examples.forget, base, cache, progress=True)
        student0 = copy.deepcopy(pipe.unet)
        prune_unet_channels(student0, 0.3)
        work = Path(tempfile.mkdtemp(prefix=f"bilevel-cost-{seed}-"))
        for arm in args.arms:
            runs = result["arms"].setdefault(arm, {})
            if str(seed) in runs:
                continue
            cfg = arm_config(base, arm)
            points = curve(student0, pipe.unet, data, cfg, dict(pipe.scheduler.config), args.every, work / arm, measure)
            runs[str(seed)] = {"mode": cfg.mode, "objective": cfg.objective, "points": points}
            print(arm, seed, json.dumps(points[-1]), flush=True)
            write(result, args.out)
    return write(result, args.out)


def merge_into(result: dict, other: dict, path: Path) -> None:
    if other["settings"] != json.loads(json.dumps(result["settings"])):
        raise SystemExit(f"{path}: measured with other settings than this command's; not merged")
    for arm, runs in other["arms"].items():
        result["arms"].setdefault(arm, {}).update(runs)
    result.setdefault("merged", []).append(" ".join(drop_option(other["command"].split(" "), "--out")))


def write(result: dict, out: Path | None) -> dict:
    kept = handwritten_section(out.with_suffix(".md")) if out is not None else ""
    write_result(out, result, lambda r: to_markdown(r) + kept)
    if out is not None and result["arms"]:
        write_plot(result, out.with_suffix(".png"))
    return result


# ----------------------------------------------------------------------------------------------
# The claim and rendering


def per_step_ms(run: dict) -> float:
    last = run["points"][-1]
    return 1000 * last["wall_s"] / last["step"]


def claim(result: dict, objective: str) -> list[dict]:
    """Per seed with bilevel-, sequential-<objective> and distill: the first judged step at which
    bilevel's leakage is at or below sequential's final, its share of sequential's steps, bilevel's
    wall time per step over distillation's, and bilevel's retain there."""
    arms = result["arms"]
    bilevel, sequential, distill = (
        arms.get(a, {}) for a in (f"bilevel-{objective}", f"sequential-{objective}", "distill")
    )
    rows = []
    for seed in sorted(set(bilevel) & set(sequential) & set(distill)):
        final = sequential[seed]["points"][-1]
        reached = next((p for p in bilevel[seed]["points"] if p["leakage"]["share"] <= final["leakage"]["share"]), None)
        cost = per_step_ms(bilevel[seed]) / per_step_ms(distill[seed])
        share_of_steps = reached["step"] / final["step"] if reached else None
        rows.append(
            {
                "seed": seed,
                "sequential_final": final,
                "reached": reached,
                "steps_share": share_of_steps,
                "cost_per_step": cost,
                "holds": share_of_steps is not None
                and share_of_steps <= CLAIM["steps_share"]
                and cost <= CLAIM["cost_per_step"],
            }
        )
    return rows


def fmt(s: dict) -> str:
    return f"{s['share']:.1%} ({s['k']}/{s['n']}, CI {s['ci95'][0]:.1%}–{s['ci95'][1]:.1%})"


def to_markdown(result: dict) -> str:
    s, f = result["settings"], result["settings"]["finetune"]
    arms = [a for a in ARMS if a in result["arms"]]
    lines = [
        *markdown_header("Bilevel against sequential at equal cost: erase 7 on the digits world", result),
        f"Default recipe settings: {f['steps']} steps, K={f['upper_every']}, batch {f['batch_size']}, lower_lr "
        f"{f['lower_lr']}, upper_lr {f['upper_lr']}, ESD eta {f['esd']['eta']} from the anchor: "
        f"{f['esd']['from_anchor']}; sequential unlearns for the last steps // K. Judged every {s['every']} steps on "
        f"{s['n_per_prompt']} images per prompt (k/n and the 95% Wilson interval). Wall time: training only.",
        "",
        "## Final point per arm and seed",
        "",
        "| arm | seed | leakage 7 | retain | train s | ms per step | x distill per step |",
        "|---|---|---|---|---|---|---|",
    ]
    distill = result["arms"].get("distill", {})
    for arm in arms:
        for seed, run in sorted(result["arms"][arm].items()):
            last = run["points"][-1]
            ratio = f"{per_step_ms(run) / per_step_ms(distill[seed]):.2f}" if seed in distill else "-"
            lines.append(
                f"| {arm} | {seed} | {fmt(last['leakage'])} | {fmt(last['retain'])} | {last['wall_s']:.0f} | "
                f"{per_step_ms(run):.0f} | {ratio} |"
            )
    lines += [
        "",
        f"## The claim: bilevel reaches sequential's final leakage in <= {CLAIM['steps_share']:.0%} of its steps at "
        f"<= {CLAIM['cost_per_step']}x distillation's cost per step",
        "",
        "| objective | seed | sequential final leakage | bilevel first at or below it | share of steps | "
        "bilevel retain there | bilevel x distill per step | holds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for objective in dict.fromkeys(a.split("-", 1)[1] for a in arms if a.startswith("bilevel-")):
        for row in claim(result, objective):
            reached = row["reached"]
            lines.append(
                f"| {objective} | {row['seed']} | {fmt(row['sequential_final']['leakage'])} | "
                + (
                    f"step {reached['step']}: {fmt(reached['leakage'])} | {row['steps_share']:.0%} | "
                    f"{fmt(reached['retain'])}"
                    if reached
                    else "never | - | -"
                )
                + f" | {row['cost_per_step']:.2f} | {'yes' if row['holds'] else 'no'} |"
            )
    lines += ["", "Curves: the .png beside this file (leakage and retain against steps and against wall time).", ""]
    return "\n".join(lines)


def pooled(runs: dict, key: str) -> tuple[list, list, list, list, list]:
    """Steps, mean wall, pooled share and its Wilson interval over the seeds of one arm."""
    from benchmarks.leakage import wilson_interval

    seeds = list(runs.values())
    steps, walls, values, lows, highs = [], [], [], [], []
    for i, point in enumerate(seeds[0]["points"]):
        k = sum(r["points"][i][key]["k"] for r in seeds)
        n = sum(r["points"][i][key]["n"] for r in seeds)
        low, high = wilson_interval(k, n)
        steps.append(point["step"])
        walls.append(sum(r["points"][i]["wall_s"] for r in seeds) / len(seeds))
        values, lows, highs = [*values, k / n], [*lows, low], [*highs, high]
    return steps, walls, values, lows, highs


def write_plot(result: dict, path: Path) -> None:
    """Leakage and retain against steps and against training wall time, seeds pooled, 95% bands."""
    from benchmarks.plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for arm in [a for a in ARMS if a in result["arms"]]:
        for row, key in enumerate(("leakage", "retain")):
            steps, walls, values, lows, highs = pooled(result["arms"][arm], key)
            for col, xs in enumerate((steps, walls)):
                line = axes[row][col].plot(xs, values, marker="o", ms=3, label=arm)[0]
                axes[row][col].fill_between(xs, lows, highs, color=line.get_color(), alpha=0.12)
    for col, xlabel in enumerate(("training steps", "training wall s (mean over seeds)")):
        axes[0][col].set_xlabel(xlabel)
        axes[1][col].set_xlabel(xlabel)
    axes[0][0].set_ylabel("leakage of 7 (seeds pooled, 95% Wilson band)")
    axes[1][0].set_ylabel("retain accuracy (seeds pooled, 95% Wilson band)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
