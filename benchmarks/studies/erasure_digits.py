"""Erasure at research standard on the digits world: the default recipe, several digits and seeds.

For each erase group (one digit, or several erased at once: `7+1`) and training seed, from the
30%-channel-pruned student and the teacher's samples drawn with that seed, train
  default     the finetune of `compress --erase <group>` (the recipe's finetune section, resolved)
  distill     the same steps and data, no unlearning (judge FID and retain reference)
  sequential  distill, then unlearn with the default's objective (same total steps; revival groups)
and measure each: leakage of every erased digit on its training prompts and on held-out phrasings,
the three white-box attacks (prefix prompt, soft prompt, concept inversion; default row), accuracy
on the digits kept and judge FID; every share with its image count and 95% Wilson interval.
`--revival 50 200`: the default and sequential students of `--revival-groups` fine-tuned on the
retain data alone with the plain denoising loss; leakage after each step count.

    python -m benchmarks.studies.erasure_digits --groups 7 1 5 7+1 --seeds 0 1 2 \\
        --out benchmarks/results/erasure-digits
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import platform
import sys
import tempfile
from pathlib import Path

from benchmarks.studies.digits_erase import handwritten_section, markdown_header, write_result

ROWS = ("default", "distill", "sequential")
# Issue #18's targets for the default recipe (each erased digit, each seed).
TARGETS = {
    "leakage_upper": 0.02,  # 95% Wilson upper bound of leakage on the training prompts
    "heldout": 0.05,  # leakage on held-out phrasings
    "attack": 0.05,  # strongest of the three attacks
    "retain_ratio": 0.97,  # retain accuracy / the teacher's
    "fid_ratio": 1.10,  # judge FID / plain distillation's (same seed)
}


def share(k: int, n: int) -> dict:
    """A judged share with its image count and 95% Wilson interval."""
    from benchmarks.leakage import wilson_interval

    low, high = wilson_interval(k, n)
    return {"share": k / n, "k": k, "n": n, "ci95": [round(low, 4), round(high, 4)]}


def counted(value: float, n: int) -> dict:
    return share(round(value * n), n)


@dataclasses.dataclass
class Group:
    """The erased concepts, their prompt sets and the prompts of the digits kept."""

    name: str
    concepts: list
    erase: dict[str, list[str]]
    heldout: dict[str, list[str]]
    retain: dict[str, list[str]]


def load_group(name: str) -> Group:
    from toolchain.config import load_concept

    concepts = [load_concept(d) for d in name.split("+")]
    labels = {c.label for c in concepts}
    retain = {k: v for k, v in concepts[0].retain_prompts.items() if k not in labels}
    return Group(
        name,
        concepts,
        {c.label: c.erase_prompts for c in concepts},
        {c.label: c.heldout_prompts for c in concepts},
        retain,
    )


def recipe_finetune(recipe: str, group: Group, seed: int, sets: list[str]):
    """The finetune config `compress --recipe R --erase <group> finetune.seed=S ...` trains with."""
    from toolchain.config import load_config, resolve_finetune

    erase = [c.label for c in group.concepts]
    cfg, _ = load_config(recipe, "onnx", [f"finetune.seed={seed}", *(f"finetune.{s}" for s in sets)], erase)
    return dataclasses.replace(resolve_finetune(cfg.finetune, erase), checkpoint_every=10**6)


def evaluate(pipe, unet, group: Group, judge, n: int, attack=None, generate=None) -> dict:
    """Leakage, held-out leakage, retain accuracy and FID of `pipe` with `unet`; the attacks too
    when `attack` = (original pipe, {label: concept latents}, AttackConfig). `generate`: the judged
    images' generator when they come from elsewhere (an exported copy); the attacks stay white-box
    on `pipe`."""
    from benchmarks.leakage import evaluate_concepts
    from toolchain.attacks import attack_concept
    from toolchain.runtime.pytorch import diffusers_generator

    model = copy.copy(pipe)
    model.unet = unet.eval()
    generate = generate or diffusers_generator(model)
    scores = evaluate_concepts(generate, judge, group.erase, group.retain, n, seed=1)
    out = {
        "leakage": {k: counted(v, scores.leakage_n[k]) for k, v in scores.leakage.items()},
        "retain": counted(scores.retain_accuracy, scores.retain_n),
        "fid": scores.fid,
    }
    if group.heldout:
        held = evaluate_concepts(generate, judge, group.heldout, {}, n, seed=2)
        out["heldout"] = {k: counted(v, held.leakage_n[k]) for k, v in held.leakage.items()}
    if attack is not None:
        original, latents, cfg = attack
        out["attack"] = {}
        for c in group.concepts:
            found = attack_concept(model, original, latents[c.label], c.erase_prompts, c.label, judge, cfg)
            n_attack = cfg.images_per_prompt * cfg.n_prompts
            rates = {
                "prefix": found.prompt_attack,
                "soft_prompt": found.soft_attack,
                "inversion": found.embedding_attack,
            }
            out["attack"][c.label] = {k: counted(v, n_attack) for k, v in rates.items()} | {"wall_s": found.wall_s}
    return out


def revive(unet, teacher, data, cfg, counts: list[int], scheduler_config, out_dir: Path, measure) -> dict:
    """Fine-tune `unet` (a copy) on the retain data alone with the plain denoising loss (no
    distillation, no unlearning, no min-SNR weighting) and `measure(unet)` after each count."""
    from toolchain.finetune import train

    plain = dataclasses.replace(
        cfg, mode="distill", w_out=0.0, w_feat=0.0, snr_gamma=0.0, steps=max(counts), checkpoint_every=math.gcd(*counts)
    )
    student, done, result = copy.deepcopy(unet), 0, {}
    for count in sorted(counts):
        student, _ = train(student.train(), teacher, data, plain, scheduler_config, out_dir, stop_after=count - done)
        done = count
        result[str(count)] = measure(student)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--groups", nargs="*", default=["7", "1", "5", "7+1"], help="digits; 7+1 erases both; 7+1@0 only seed 0"
    )
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--rows", nargs="*", default=["default", "distill"], choices=ROWS, help="revival groups add sequential"
    )
    parser.add_argument("--recipe", default="default")
    parser.add_argument("--set", nargs="*", default=[], help="finetune overrides key=value (finetune. implied)")
    parser.add_argument("--n-per-prompt", type=int, default=32, help="judged images per prompt")
    parser.add_argument("--attack-images", type=int, default=16, help="judged images per attacked prompt")
    parser.add_argument("--revival", nargs="*", type=int, default=[50, 200], help="retain-only steps; none: off")
    parser.add_argument("--revival-groups", nargs="*", default=["7"], help="as --groups (7@0: seed 0 only)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json, OUT.md and OUT.png")
    parser.add_argument("--merge", nargs="*", type=Path, default=[], help="take groups from these result JSONs")
    parser.add_argument("--samples-dir", type=Path, default=Path(tempfile.gettempdir()) / "erasure-digits-samples")
    args = parser.parse_args(argv)

    from toolchain.config import AttackConfig, to_dict

    pipe, judge = digits_judging(args.threads)
    attack_cfg = AttackConfig(enabled=True, images_per_prompt=args.attack_images)
    settings = {
        "recipe": args.recipe,
        "set": args.set,
        "finetune": to_dict(recipe_finetune(args.recipe, load_group("7"), 0, args.set)),
        "prune_ratio": 0.3,
        "n_per_prompt": args.n_per_prompt,
        "attack": vars(attack_cfg),
        "revival": args.revival,
        "targets": TARGETS,
    }
    result = {
        "command": "python -m benchmarks.studies.erasure_digits " + " ".join(reproducing_args(argv)),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch_threads": args.threads},
        "versions": versions(),
        "settings": settings,
        "groups": {},
    }
    for path in args.merge:
        merge_into(result, json.loads(path.read_text()), path)
    revived = {
        (name, seed) for spec in args.revival_groups for name, seeds in [pick(spec, args.seeds)] for seed in seeds
    }
    for name, seeds in (pick(spec, args.seeds) for spec in args.groups):
        group = load_group(name)
        entry = result["groups"].setdefault(name, {"seeds": {}})
        if "teacher" not in entry:
            entry["teacher"] = evaluate(pipe, pipe.unet, group, judge, args.n_per_prompt)
        for seed in seeds:
            revival = args.revival if (name, seed) in revived else []
            if str(seed) in entry["seeds"]:
                if bool(revival) != ("revival" in entry["seeds"][str(seed)]):
                    raise SystemExit(f"merged erase {name} seed {seed}: revival differs from --revival-groups")
                continue
            entry["seeds"][str(seed)] = run_seed(pipe, group, seed, args, judge, attack_cfg, revival)
            result["measured_here"] = True  # this command ran: a later merge lists it among the parts
            write(result, args.out)  # after every seed: a long run that is stopped keeps what it measured
    order = [pick(spec, args.seeds)[0] for spec in args.groups]
    result["groups"] = dict(sorted(result["groups"].items(), key=lambda item: order.index(item[0])))
    return write(result, args.out)


def digits_judging(threads: int):
    """(the embedded digits pipeline, progress bars off: its UNet is the teacher; the digits judge)
    with torch on `threads` threads: what every digits-world study judges with."""
    import torch

    from benchmarks.leakage import get_judge
    from toolchain.models.io import EMBEDDED_MODEL, load_pipeline

    torch.set_num_threads(threads)
    pipe = load_pipeline(EMBEDDED_MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe, get_judge("digits")


def pick(spec: str, seeds: list[int]) -> tuple[str, list[int]]:
    """'7+1@0,2' -> ('7+1', [0, 2]); '5' -> ('5', seeds)."""
    name, _, only = spec.partition("@")
    return name, [int(s) for s in only.split(",")] if only else list(seeds)


def reproducing_args(argv: list[str] | None) -> list[str]:
    """This invocation's arguments without `--merge` and its files: the single run that measures
    what a merge assembles (its parts, scratch files, are recorded under `merged`)."""
    from benchmarks.studies.attack_digits import drop_option

    return drop_option(list(sys.argv[1:] if argv is None else argv), "--merge")


def run_seed(pipe, group: Group, seed: int, args, judge, attack_cfg, revival: list[int]) -> dict:
    """Train and measure the rows of one group and seed."""
    from toolchain.attacks import concept_latents
    from toolchain.finetune import prepare_data, train, training_examples
    from toolchain.pruning.channels import prune_unet_channels

    cfg = recipe_finetune(args.recipe, group, seed, args.set)
    examples = training_examples(cfg, [c.label for c in group.concepts])
    args.samples_dir.mkdir(parents=True, exist_ok=True)
    cache = args.samples_dir / f"{group.name}-seed{seed}.safetensors"
    data = prepare_data(pipe, examples.retain, examples.forget, cfg, cache, progress=True)
    student0 = copy.deepcopy(pipe.unet)
    prune_unet_channels(student0, 0.3)
    scheduler_config = dict(pipe.scheduler.config)
    latents = {
        c.label: concept_latents(pipe, c.erase_prompts, attack_cfg.concept_images, 25, 5.0, attack_cfg.seed)
        for c in group.concepts
    }
    rows, students = {}, {}
    work = Path(tempfile.mkdtemp(prefix=f"erasure-{group.name}-{seed}-"))
    for row in [r for r in ROWS if r in args.rows or (revival and r == "sequential")]:
        row_cfg = cfg if row == "default" else dataclasses.replace(cfg, mode=row)
        unet, summary = train(copy.deepcopy(student0), pipe.unet, data, row_cfg, scheduler_config, work / row, True)
        attack = (pipe, latents, attack_cfg) if row == "default" else None
        rows[row] = {
            **evaluate(pipe, unet, group, judge, args.n_per_prompt, attack),
            "mode": row_cfg.mode,
            "steps": row_cfg.steps,
            "wall_s": round(summary["wall_s"], 1),
        }
        students[row] = unet
        print(group.name, seed, row, json.dumps(brief(rows[row])), flush=True)
    if revival:
        rows["revival"] = {}
        for row in [r for r in ("default", "sequential") if r in students]:

            def measure(unet):
                return evaluate(pipe, unet, dataclasses.replace(group, heldout={}), judge, args.n_per_prompt)

            rows["revival"][row] = revive(
                students[row], pipe.unet, data, cfg, revival, scheduler_config, work / f"revive-{row}", measure
            )
    return rows


def brief(row: dict) -> dict:
    return {k: {d: v["share"] for d, v in row[k].items()} for k in ("leakage", "heldout")} | {
        "retain": row["retain"]["share"],
        "fid": row["fid"],
    }


def merge_into(result: dict, other: dict, path: Path) -> None:
    """Add `other`'s groups and seeds (measured by a part run with the same settings); its command
    is kept without its scratch `--out`. Where `other` was itself merged, its parts' commands, and
    its own only if it measured something (an assembled file's command never ran as one)."""
    from benchmarks.studies.attack_digits import drop_option

    if other["settings"] != json.loads(json.dumps(result["settings"])):
        raise SystemExit(f"{path}: measured with other settings than this command's; not merged")
    for name, entry in other["groups"].items():
        mine = result["groups"].setdefault(name, {"seeds": {}})
        mine.setdefault("teacher", entry.get("teacher"))
        mine["seeds"].update(entry["seeds"])
    own = [" ".join(drop_option(other["command"].split(" "), "--out"))]
    parts = other.get("merged", []) + (own if other.get("measured_here", "merged" not in other) else [])
    merged = result.setdefault("merged", [])
    merged += [part for part in parts if part not in merged]


def versions() -> dict:
    import diffusers
    import torch
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def write(result: dict, out: Path | None) -> dict:
    kept = handwritten_section(out.with_suffix(".md")) if out is not None else ""
    write_result(out, result, lambda r: to_markdown(r) + kept)
    if out is not None and result["groups"]:
        write_plot(result, out.with_suffix(".png"))
    return result


# ----------------------------------------------------------------------------------------------
# Judging the targets and rendering


def target_checks(row: dict, teacher: dict, distill: dict | None) -> dict[str, bool | None]:
    """Each target of TARGETS for one default row: True met, False missed, None not measured (which
    does not count as met: `met`). The leakage bound from the counts, not the rounded ci95."""
    from benchmarks.leakage import wilson_interval

    attacks = [v["share"] for a in row.get("attack", {}).values() for k, v in a.items() if k != "wall_s"]
    fid_ratio = row["fid"] / distill["fid"] if distill and distill.get("fid") else None
    return {
        "leakage_upper": all(
            wilson_interval(v["k"], v["n"])[1] <= TARGETS["leakage_upper"] for v in row["leakage"].values()
        ),
        "heldout": all(v["share"] <= TARGETS["heldout"] for v in row["heldout"].values()),
        "attack": max(attacks) <= TARGETS["attack"] if attacks else None,
        "retain_ratio": row["retain"]["share"] / teacher["retain"]["share"] >= TARGETS["retain_ratio"],
        "fid_ratio": None if fid_ratio is None else fid_ratio <= TARGETS["fid_ratio"],
    }


def fmt(s: dict | None) -> str:
    """'1.2% (3/224, ≤2.6%)': share, count and the Wilson interval's upper end."""
    if s is None:
        return "-"
    return f"{s['share']:.1%} ({s['k']}/{s['n']}, CI {s['ci95'][0]:.1%}–{s['ci95'][1]:.1%})"


def strongest(row: dict, label: str) -> dict | None:
    found = [v for k, v in row.get("attack", {}).get(label, {}).items() if k != "wall_s"]
    return max(found, key=lambda v: v["share"]) if found else None


def group_lines(name: str, entry: dict) -> list[str]:
    teacher = entry["teacher"]
    labels = list(teacher["leakage"])
    lines = [
        f"### erase {name}",
        "",
        "| seed | row | label | leakage | held-out | strongest attack | retain | retain / teacher | FID | FID / distill "
        "| train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| - | teacher | {lab} | {fmt(teacher['leakage'][lab])} | {fmt(teacher['heldout'][lab])} | - | "
        f"{fmt(teacher['retain'])} | 1.00 | {teacher['fid']:.3f} | - | - |"
        for lab in labels
    ]
    for seed, rows in entry["seeds"].items():
        distill = rows.get("distill")
        for row_name in ROWS:
            row = rows.get(row_name)
            if row is None:
                continue
            ratio = row["retain"]["share"] / teacher["retain"]["share"]
            fid_ratio = f"{row['fid'] / distill['fid']:.2f}" if distill else "-"
            for lab in labels:
                lines.append(
                    f"| {seed} | {row_name} | {lab} | {fmt(row['leakage'][lab])} | {fmt(row['heldout'][lab])} | "
                    f"{fmt(strongest(row, lab))} | {fmt(row['retain'])} | {ratio:.3f} | {row['fid']:.3f} | "
                    f"{fid_ratio} | {row['wall_s']} |"
                )
    return [*lines, ""]


def summary_lines(result: dict) -> list[str]:
    """Per group: the default row's mean and worst seed, and which targets each seed met."""
    lines = [
        "| erase | label | seeds | leakage mean | worst seed | held-out worst | strongest attack worst "
        "| retain / teacher worst | FID / distill worst | targets met (seeds) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in result["groups"].items():
        seeds = {s: r for s, r in entry["seeds"].items() if "default" in r}
        if not seeds:
            continue
        teacher = entry["teacher"]
        checks = {s: target_checks(r["default"], teacher, r.get("distill")) for s, r in seeds.items()}
        met = sum(all(v is True for v in c.values()) for c in checks.values())
        for lab in teacher["leakage"]:
            leak = {s: r["default"]["leakage"][lab] for s, r in seeds.items()}
            worst = max(leak, key=lambda s: (leak[s]["share"], leak[s]["ci95"][1]))
            held = max((r["default"]["heldout"][lab] for r in seeds.values()), key=lambda v: v["share"])
            attacks = [strongest(r["default"], lab) for r in seeds.values()]
            attack = max((a for a in attacks if a), key=lambda v: v["share"], default=None)
            retain = min(r["default"]["retain"]["share"] / teacher["retain"]["share"] for r in seeds.values())
            fids = [r["default"]["fid"] / r["distill"]["fid"] for r in seeds.values() if r.get("distill")]
            missed = sorted(
                {
                    k + ("" if v is False else " (not measured)")
                    for c in checks.values()
                    for k, v in c.items()
                    if v is not True
                }
            )
            verdict = f"{met}/{len(seeds)}" + (f" (missed: {', '.join(missed)})" if missed else "")
            lines.append(
                f"| {name} | {lab} | {len(seeds)} | {sum(v['share'] for v in leak.values()) / len(leak):.2%} | "
                f"seed {worst}: {fmt(leak[worst])} | {fmt(held)} | {fmt(attack)} | {retain:.3f} | "
                f"{f'{max(fids):.2f}' if fids else '-'} | {verdict} |"
            )
    return [*lines, ""]


def revival_lines(result: dict) -> list[str]:
    lines = []
    for name, entry in result["groups"].items():
        for seed, rows in entry["seeds"].items():
            for student, after in rows.get("revival", {}).items():
                trained = rows[student]
                for lab in trained["leakage"]:
                    cells = [fmt(trained["leakage"][lab])] + [fmt(after[c]["leakage"][lab]) for c in after]
                    retain = [fmt(trained["retain"])] + [fmt(after[c]["retain"]) for c in after]
                    lines.append(f"| {name} | {seed} | {student} | {lab} | " + " | ".join(cells) + f" | {retain[-1]} |")
    if not lines:
        return []
    counts = result["settings"]["revival"]
    head = " | ".join(f"leakage after {c} steps" for c in counts)
    return [
        "## Concept revival: retain-only fine-tuning after erasure",
        "",
        f"| erase | seed | student | label | leakage as trained | {head} | retain after {max(counts)} |",
        "|---|---|---|---|---|" + "---|" * len(counts) + "---|",
        *lines,
        "",
        "Fine-tuning: the plain denoising loss (no distillation, no min-SNR weighting, no unlearning) on the "
        "teacher's samples of the retain prompts, lower_lr and batch of the recipe, from each trained student.",
        "",
    ]


def to_markdown(result: dict) -> str:
    s = result["settings"]
    f = s["finetune"]
    a = s["attack"]
    t = s["targets"]
    lines = [
        *markdown_header("Erasure on the digits world: the default recipe, three digits, three seeds", result),
        f"Recipe `{s['recipe']}`{' with ' + ', '.join(s['set']) if s['set'] else ''}: finetune.mode {f['mode']}, "
        f"objective {f['objective']} (ESD eta {f['esd']['eta']}, from the anchor: {f['esd']['from_anchor']}), "
        f"{f['steps']} steps, K={f['upper_every']}, batch {f['batch_size']}, lower_lr {f['lower_lr']}, "
        f"upper_lr {f['upper_lr']}; student: the teacher's UNet with {s['prune_ratio']:.0%} of its channels pruned "
        f"(magnitude). Seeds: finetune.seed, which also draws the teacher's samples; the judged images use the same "
        f"seeds for every row.",
        f"Judged: {s['n_per_prompt']} images per prompt (leakage, held-out phrasings, retain); attacks "
        f"{a['images_per_prompt']} images on each of {a['n_prompts']} attacked prompts (prefix {a['prefix_tokens']} "
        f"tokens x {a['steps']} steps, soft prompt {a['soft_steps']} steps, concept inversion "
        f"{a['inversion_steps']} steps). Each share: k/n images and its 95% Wilson interval.",
        f"Targets (default row, each erased digit and seed): leakage Wilson upper <= {t['leakage_upper']:.0%}, "
        f"held-out <= {t['heldout']:.0%}, strongest attack <= {t['attack']:.0%}, retain >= "
        f"{t['retain_ratio']:.0%} of the teacher's, judge FID <= {t['fid_ratio']:.2f}x plain distillation's.",
        "",
        "## Summary (default row)",
        "",
        *summary_lines(result),
        "## Per seed",
        "",
    ]
    for name, entry in result["groups"].items():
        lines += group_lines(name, entry)
    lines += revival_lines(result)
    return "\n".join(lines)


def write_plot(result: dict, path: Path) -> None:
    """Leakage per group, seed and row with Wilson whiskers; revival leakage against steps."""
    from benchmarks.plots import _pyplot

    plt = _pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    x, ticks = 0, []
    colors = {"default": "tab:green", "distill": "tab:gray", "sequential": "tab:orange"}
    for name, entry in result["groups"].items():
        for seed, rows in entry["seeds"].items():
            for row_name in ROWS:
                for lab, s in rows.get(row_name, {}).get("leakage", {}).items():
                    err = [[s["share"] - s["ci95"][0]], [s["ci95"][1] - s["share"]]]
                    ax.bar(x, s["share"], yerr=err, color=colors[row_name], capsize=2)
                    ticks.append((x, f"{name}:{lab}/s{seed}/{row_name[:3]}"))
                    x += 1
            x += 1
    ax.axhline(TARGETS["leakage_upper"], color="red", lw=0.8, ls="--")
    ax.set_xticks([p for p, _ in ticks], [t for _, t in ticks], rotation=90, fontsize=6)
    ax.set_ylabel("leakage (whisker: 95% Wilson)")
    ax.set_title("Leakage per erased digit / seed / row")
    for name, entry in result["groups"].items():
        for seed, rows in entry["seeds"].items():
            for student, after in rows.get("revival", {}).items():
                for lab in rows[student]["leakage"]:
                    points = [(0, rows[student]["leakage"][lab])] + [
                        (int(c), v["leakage"][lab]) for c, v in after.items()
                    ]
                    xs = [p for p, _ in points]
                    ys = [v["share"] for _, v in points]
                    low = [v["ci95"][0] for _, v in points]
                    high = [v["ci95"][1] for _, v in points]
                    line = bx.plot(xs, ys, marker="o", label=f"erase {name}: {lab}, seed {seed}, {student}")[0]
                    bx.fill_between(xs, low, high, color=line.get_color(), alpha=0.15)
    bx.set_xlabel("retain-only fine-tuning steps")
    bx.set_ylabel("leakage (band: 95% Wilson)")
    bx.set_title("Concept revival")
    if bx.lines:
        bx.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
