"""The one-step mode through `compress`: the shipped `one-step` recipe run as a user runs it, per
seed, and the ONNX pipeline it delivers judged against issue #18's erasure targets.

Per erase group G and seed S, two real command lines (each resumes if its folder is there):
  erase    compress --target onnx --erase G --recipe one-step --out WORK/G-S/erase finetune.seed=S
  distill  the same with finetune.sfd.forget_weight=0: the same one-step distillation on the same
           prompts, forgetting nothing (the judge-FID reference; G's leakage is still measured)
Each run's exported pipeline (03-export, ONNX Runtime, one unguided UNet call per image) is judged
with n images per prompt (leakage, held-out phrasings, retain, judge FID); the three white-box
attacks run on the PyTorch generator the export was made from (02-finetune; export parity is in
the run's report) and their images come from its own one-step sampler. The teacher (25 guided
DDIM steps) is judged once. `compress`'s own report figures (its export stage) are kept beside.

    python -m benchmarks.studies.onestep_compress --groups 7 1@0 5@0 --seeds 0 1 2 \\
        --out benchmarks/results/onestep-compress
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.studies.digits_erase import handwritten_section, markdown_header, write_result
from benchmarks.studies.erasure_digits import (
    TARGETS,
    digits_judging,
    evaluate,
    fmt,
    load_group,
    pick,
    strongest,
    target_checks,
    versions,
)

RECIPE = "one-step"


def commands(group: str, seed: int, work: Path) -> dict[str, list[str]]:
    """The two `compress` command lines of one group and seed."""
    base = ["compress", "--target", "onnx", "--recipe", RECIPE]
    erase = [a for d in group.split("+") for a in ("--erase", d)]
    return {
        "erase": [*base, *erase, "--out", str(work / "erase"), f"finetune.seed={seed}"],
        "distill": [
            *base,
            *erase,
            "--out",
            str(work / "distill"),
            f"finetune.seed={seed}",
            "finetune.sfd.forget_weight=0",
        ],
    }


def run_compress(argv: list[str], out: Path, threads: int) -> float | None:
    """Run one `compress` command line (skipped when its report is there); its wall seconds."""
    if (out / "report.json").is_file():
        return None
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "toolchain.cli", *argv[1:]], check=True, env=env)
    return round(time.perf_counter() - start, 1)


def judge_run(out: Path, group, judge, n: int, attack, threads: int) -> dict:
    """Judge the run in `out`: its export through ONNX Runtime, attacks on its PyTorch generator."""
    from toolchain.models.io import load_pipeline
    from toolchain.runtime.ort import ort_generator

    pipe = load_pipeline(out / "02-finetune")  # its folder's onestep.json makes it a one-step sampler
    pipe.set_progress_bar_config(disable=True)
    generate = ort_generator(out / "03-export", threads=threads)
    row = evaluate(pipe, pipe.unet, group, judge, n, attack, generate=generate)
    report = json.loads((out / "report.json").read_text())
    stage = next(s for s in report["stages"] if s["name"] == "export")
    finetune = json.loads((out / "02-finetune" / "manifest.json").read_text())["records"]["finetune"]
    row["compress_report"] = {k: stage.get(k) for k in ("leakage", "leakage_n", "retain_accuracy", "retain_n", "fid")}
    row["finetune_wall_s"] = finetune.get("wall_s")
    row["finetune"] = {k: finetune.get(k) for k in ("mode", "steps", "generator_timesteps")}
    return row


def run_seed(name: str, seed: int, args, teacher_pipe, judge, attack_cfg) -> dict:
    from toolchain.attacks import concept_latents

    group, work, threads = load_group(name), args.work / f"{name}-{seed}", args.threads
    lines = commands(name, seed, work)
    walls = {row: run_compress(argv, work / row, args.threads) for row, argv in lines.items()}
    latents = {
        c.label: concept_latents(teacher_pipe, c.erase_prompts, attack_cfg.concept_images, 25, 5.0, attack_cfg.seed)
        for c in group.concepts
    }
    rows = {
        "erase": judge_run(
            work / "erase", group, judge, args.n_per_prompt, (teacher_pipe, latents, attack_cfg), threads
        ),
        "distill": judge_run(work / "distill", group, judge, args.n_per_prompt, None, threads),
    }
    for row, argv in lines.items():
        argv = [a if not a.startswith(str(args.work)) else a.replace(str(args.work), "WORK") for a in argv]
        rows[row].update(command=" ".join(argv), compress_wall_s=walls[row])
    return rows


def teacher_row(name: str, args, teacher_pipe, judge) -> tuple[dict, str]:
    """The teacher judged as erasure-digits judged it (same function, seeds and image count): taken
    from that results file when it holds this group at this count, else measured (~10 min)."""
    if args.teacher_from.is_file():
        known = json.loads(args.teacher_from.read_text())
        teacher = known["groups"].get(name, {}).get("teacher")
        if teacher and known["settings"]["n_per_prompt"] == args.n_per_prompt:
            return teacher, str(args.teacher_from)
    return evaluate(teacher_pipe, teacher_pipe.unet, load_group(name), judge, args.n_per_prompt), "measured"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", nargs="*", default=["7"], help="digits; 7+1 erases both; 7@0 only seed 0")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--n-per-prompt", type=int, default=32, help="judged images per prompt")
    parser.add_argument("--attack-images", type=int, default=16, help="judged images per attacked prompt")
    parser.add_argument("--threads", type=int, default=1, help="torch / ONNX Runtime threads, the runs' too")
    parser.add_argument("--work", type=Path, default=Path("runs/onestep-compress"), help="the compress runs")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    parser.add_argument(
        "--teacher-from", type=Path, default=Path("benchmarks/results/erasure-digits.json"), help="its teacher rows"
    )
    args = parser.parse_args(argv)

    from toolchain.config import AttackConfig, load_config, to_dict

    teacher_pipe, judge = digits_judging(args.threads)
    attack_cfg = AttackConfig(enabled=True, images_per_prompt=args.attack_images)
    recipe, _ = load_config(RECIPE, "onnx", [], ["7"])
    result = {
        "command": "python -m benchmarks.studies.onestep_compress "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch_threads": args.threads},
        "versions": versions(),
        "settings": {
            "recipe": RECIPE,
            "finetune": to_dict(recipe.finetune),
            "n_per_prompt": args.n_per_prompt,
            "attack": vars(attack_cfg),
            "targets": TARGETS,
        },
        "groups": {},
    }
    for name, seeds in (pick(spec, args.seeds) for spec in args.groups):
        entry = result["groups"].setdefault(name, {"seeds": {}})
        entry["teacher"], entry["teacher_from"] = teacher_row(name, args, teacher_pipe, judge)
        for seed in seeds:
            entry["seeds"][str(seed)] = run_seed(name, seed, args, teacher_pipe, judge, attack_cfg)
            write(result, args.out)  # after every seed: a stopped run keeps what it measured
    return write(result, args.out)


def write(result: dict, out: Path | None) -> dict:
    kept = handwritten_section(out.with_suffix(".md")) if out is not None else ""
    write_result(out, result, lambda r: to_markdown(r) + kept)
    return result


# ----------------------------------------------------------------------------------------------
# Rendering


def to_markdown(result: dict) -> str:
    s = result["settings"]
    ft, sfd = s["finetune"], s["finetune"]["sfd"]
    lines = markdown_header("The one-step mode through compress: the `one-step` recipe's exported ONNX", result)
    lines += [
        f"Recipe `{s['recipe']}`: finetune.mode {ft['mode']}, {ft['steps']} steps, batch {ft['batch_size']} retain + "
        f"{ft['upper_batch_size']} forget prompts, generator timesteps {sfd.get('timesteps') or [sfd['init_timestep']]}, "
        f"guidance {sfd['guidance']} inside the loss, negative_forget {sfd['negative_forget']}, lrs "
        f"{sfd['generator_lr']} / {sfd['fake_lr']}.",
        f"Judged: the exported ONNX pipeline (ONNX Runtime, CPU) at {s['n_per_prompt']} images per prompt; attacks "
        f"{s['attack']['images_per_prompt']} images on each of {s['attack']['n_prompts']} prompts, on the PyTorch "
        "generator the export came from, sampled one step. Each share: k/n images and its 95% Wilson interval.",
        "Targets (erase row, each digit and seed): leakage Wilson upper <= 2%, held-out <= 5%, strongest attack <= 5%, "
        "retain >= 97% of the teacher's (25 guided steps), judge FID <= 1.10x the same one-step distillation "
        "without forgetting (distill row, same seed).",
        "",
    ]
    for name, entry in result["groups"].items():
        lines += group_table(name, entry)
    return "\n".join(lines) + "\n"


def group_table(name: str, entry: dict) -> list[str]:
    teacher = entry["teacher"]
    lines = [
        f"## erase {name}",
        "",
        "| seed | row | label | leakage | held-out | strongest attack | retain / teacher | FID / distill "
        "| compress's report: leakage, retain | targets missed | finetune s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines[1:1] = ["", f"Teacher row: {entry.get('teacher_from', 'measured')}."]
    for label in teacher["leakage"]:
        lines.append(
            f"| - | teacher | {label} | {fmt(teacher['leakage'][label])} | {fmt(teacher['heldout'][label])} | - | 1.00 "
            "| - | - | - | - |"
        )
    for seed, rows in entry["seeds"].items():
        checks = target_checks(rows["erase"], teacher, rows["distill"])
        missed = ", ".join(k for k, ok in checks.items() if ok is not True) or "none"
        for row_name, row in rows.items():
            ratio = row["retain"]["share"] / teacher["retain"]["share"]
            fid = row["fid"] / rows["distill"]["fid"]
            rep = row["compress_report"]
            for label in row["leakage"]:
                reported = ", ".join(
                    f"{rep['leakage'][k]:.1%} of {rep['leakage_n'][k]}" for k in rep.get("leakage") or {}
                )
                lines.append(
                    f"| {seed} | {row_name} | {label} | {fmt(row['leakage'][label])} | {fmt(row['heldout'][label])} "
                    f"| {fmt(strongest(row, label))} | {ratio:.3f} | {fid:.2f} "
                    f"| {reported or '-'}; {rep['retain_accuracy']:.1%} of {rep['retain_n']} "
                    f"| {missed if row_name == 'erase' else '-'} | {row['finetune_wall_s']} |"
                )
    commands = [f"- `{rows[r]['command']}`" for rows in entry["seeds"].values() for r in rows]
    return [*lines, "", "Commands (WORK = --work):", "", *commands, ""]


if __name__ == "__main__":
    main()
