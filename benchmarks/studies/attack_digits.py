"""Erasure under attack on the digits world: erase digit 7 from a 30%-channel-pruned student.

Rows: the teacher; distillation alone (no unlearning); plain bilevel with EraseDiff (the default
recipe's objective) and with ESD; the same with the AdvUnlearn-style robust option
(`finetune.robust.enabled`; "+robust" trains against the continuous soft-prompt attack, the default,
"+robust-prefix" against the discrete prefix search). Columns: leakage of 7 on its training
prompts and on held-out phrasings, success of the white-box prefix-prompt attack, of its
continuous soft-prompt form and of concept inversion (toolchain/attacks/, budget in
`settings.attack`), judge accuracy on the other nine digits, judge FID, training wall
time and the robust option's share of it.

    python -m benchmarks.studies.attack_digits --steps 600 --set upper_every=3 esd.eta=2.0 esd.from_anchor=true \\
        --int8 bilevel-esd+robust --out benchmarks/results/attack-digits
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import sys
import tempfile
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
    "distill",
    "bilevel-erasediff",
    "bilevel-erasediff+robust",
    "bilevel-erasediff+robust-prefix",
    "bilevel-esd",
    "bilevel-esd+robust",
    "bilevel-esd+robust-prefix",
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--n-per-prompt", type=int, default=32, help="judged images per leakage/retain prompt")
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=ROWS)
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    parser.add_argument("--samples-cache", type=Path, default=None, help="reuse teacher samples from this file")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        help="FinetuneConfig overrides key=value (YAML values; esd.eta=2.0 sets a sub-config)",
    )
    parser.add_argument("--attack", nargs="*", default=[], help="AttackConfig overrides key=value (JSON values)")
    parser.add_argument("--keep", action="store_true", help="keep the rows OUT.json already has; measure the rest")
    parser.add_argument(
        "--merge",
        nargs="*",
        type=Path,
        default=[],
        help="take rows (and the int8 section) from these result JSONs of the same settings, e.g. parallel runs",
    )
    parser.add_argument(
        "--int8", default=None, metavar="ROW", help="export ROW's model to ONNX, int8-quantize it and measure both"
    )
    parser.add_argument(
        "--int8-checkpoint", type=Path, default=None, help="ROW's finetune checkpoint model.safetensors (if kept)"
    )
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    import diffusers
    import transformers

    from benchmarks.leakage import evaluate_concepts
    from toolchain.attacks import PromptEncoder, attack_concept, concept_latents
    from toolchain.config import AttackConfig, to_dict
    from toolchain.finetune import prepare_data, retain_prompt_list, train
    from toolchain.runtime.pytorch import diffusers_generator

    base = finetune_config(args.set, steps=args.steps, checkpoint_every=10**6)
    attack_cfg = AttackConfig(
        enabled=True,
        **{"images_per_prompt": 16, **{k: json.loads(v) for k, v in (item.split("=", 1) for item in args.attack)}},
    )
    world = erase_seven(0.3)
    seven, pipe, teacher, student0, judge = world.seven, world.pipe, world.teacher, world.student0, world.judge
    erase, heldout, retain = world.erase, world.heldout, world.retain

    tmp = Path(tempfile.mkdtemp(prefix="attack-digits-"))
    data = prepare_data(
        pipe,
        retain_prompt_list(base, [seven]),
        [(p, seven.anchor_prompt) for p in seven.erase_prompts],
        base,
        args.samples_cache or tmp / "samples.safetensors",
        progress=True,
    )
    latents = concept_latents(pipe, seven.erase_prompts, attack_cfg.concept_images, 25, 5.0, attack_cfg.seed)
    encoder = PromptEncoder(pipe.text_encoder, pipe.tokenizer)

    def evaluate(unet) -> dict:
        erased = copy.copy(pipe)  # the same components, the student's UNet
        erased.unet = unet.eval()
        generate = diffusers_generator(erased)
        scores = evaluate_concepts(generate, judge, erase, retain, args.n_per_prompt, seed=1)
        held = evaluate_concepts(generate, judge, heldout, {}, args.n_per_prompt, seed=2)
        attacked = attack_concept(erased, pipe, latents, seven.erase_prompts, "7", judge, attack_cfg)
        return {
            "leakage_7": scores.leakage["7"],
            "leakage_7_heldout": held.leakage["7"],
            "prompt_attack": attacked.prompt_attack,
            "embedding_attack": attacked.embedding_attack,
            "soft_prompt_attack": attacked.soft_attack,
            "attack_plain": attacked.plain,
            "attacked_prompts": attacked.attacked_prompts,
            "attack_s": round(attacked.wall_s, 1),
            "retain_accuracy": scores.retain_accuracy,
            "fid": scores.fid,
        }

    def int8_transfer(unet, attacked_prompts: list[str]) -> dict:
        """Export the pipeline with `unet` to ONNX (fp32), int8-quantize its UNet as the default
        recipe does (static QDQ, Conv + MatMul, calibrated on DDIM trajectories), and measure both
        through ONNX Runtime: leakage, held-out leakage, retain accuracy, FID and the success of
        the prompts the attack found on the PyTorch model (transfer)."""
        from export.onnx import export_onnx
        from export.quantize import collect_unet_calibration, collect_unet_parity_feed, quantize_onnx_folder
        from toolchain.attacks import transfer_rate
        from toolchain.runtime.ort import OrtPipeline

        model = copy.copy(pipe)
        model.unet = unet.eval()
        fp32_dir, int8_dir = tmp / "onnx-fp32", tmp / "onnx-int8"
        files = export_onnx(model, fp32_dir, progress=False)["files"]
        prompts = seven.erase_prompts + [p[0] for p in retain.values()]
        calibration = collect_unet_calibration(fp32_dir, prompts, n=16)
        quantize_onnx_folder(
            fp32_dir,
            int8_dir,
            mode="static",
            components=("unet",),
            op_types=["Conv", "MatMul"],
            quant_format="QDQ",
            calibration={"unet": calibration},
            parity_inputs={"unet": collect_unet_parity_feed(fp32_dir, prompts[:2], seed=1)},  # held out
            progress=False,
        )
        out = {}
        for name, folder in (("onnx_fp32", fp32_dir), ("onnx_int8", int8_dir)):
            ort_pipe = OrtPipeline(folder, {c: info["path"] for c, info in files.items()}, threads=1)

            def generate(prompts, seed, ort_pipe=ort_pipe):
                return ort_pipe(prompts, seed, steps=25, guidance_scale=5.0)

            scores = evaluate_concepts(generate, judge, erase, retain, args.n_per_prompt, seed=1)
            held = evaluate_concepts(generate, judge, heldout, {}, args.n_per_prompt, seed=2)
            out[name] = {
                "leakage_7": scores.leakage["7"],
                "leakage_7_heldout": held.leakage["7"],
                "prompt_attack_transfer": transfer_rate(
                    generate, attacked_prompts, "7", judge, attack_cfg.images_per_prompt, attack_cfg.seed
                ),
                "retain_accuracy": scores.retain_accuracy,
                "fid": scores.fid,
            }
        return out

    given = list(sys.argv[1:] if argv is None else argv)

    def write(rows: dict) -> dict:
        """Write OUT.json / OUT.md with the rows measured so far (keeping OUT.md's hand-written
        section); returns the result."""
        result = {
            "command": "python -m benchmarks.studies.attack_digits " + " ".join(reproducing_args(given, rows, extra)),
            "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch_threads": 1},
            "versions": {
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "transformers": transformers.__version__,
            },
            "settings": {
                "finetune": to_dict(base),
                "attack": vars(attack_cfg),
                "prune_ratio": 0.3,
                "erase": "7",
                "n_per_prompt": args.n_per_prompt,
                "prompts": {
                    "erase": len(seven.erase_prompts),
                    "heldout": len(seven.heldout_prompts),
                    "retain": sum(len(v) for v in retain.values()),
                },
            },
            "rows": rows,
            **extra,
        }
        kept = handwritten_section(args.out.with_suffix(".md")) if args.out is not None else ""
        write_result(args.out, result, lambda r: to_markdown(r) + kept)
        if args.out is not None:
            write_plot(result, args.out.with_suffix(".png"))
        return result

    rows, unets, extra = {}, {}, {}
    if args.keep and args.out is not None and args.out.with_suffix(".json").is_file():
        rows = json.loads(args.out.with_suffix(".json").read_text())["rows"]
    for path in args.merge:
        other = json.loads(path.read_text())
        same = json.loads(json.dumps([to_dict(base), vars(attack_cfg), args.n_per_prompt]))
        if [other["settings"][k] for k in ("finetune", "attack", "n_per_prompt")] != same:
            raise SystemExit(f"{path}: measured with other settings than this command's; not merged")
        rows.update(other["rows"])
        extra.setdefault("merged", []).append(" ".join(drop_option(other["command"].split(" "), "--out")))
        if "int8" in other:
            extra["int8"] = other["int8"]
    for name in args.rows:
        if name in rows:
            continue
        wall, steps, robust_s = 0.0, 0, None
        if name == "teacher":
            unet = teacher
        else:
            name_objective, _, robust_kind = name.partition("+")
            mode, _, objective = name_objective.partition("-")
            robust = bool(robust_kind)
            attack = "prefix" if robust_kind == "robust-prefix" else base.robust.attack
            robust_cfg = dataclasses.replace(base.robust, enabled=robust, attack=attack)
            cfg = dataclasses.replace(base, mode=mode, objective=objective or "esd", robust=robust_cfg)
            out = tmp / f"{name}-{len(list(tmp.iterdir()))}"
            unet, summary = train(
                copy.deepcopy(student0),
                teacher,
                data,
                cfg,
                dict(pipe.scheduler.config),
                out,
                True,
                prompt_encoder=encoder if robust else None,
            )
            wall, steps = summary["wall_s"], cfg.steps
            if robust:
                cost = summary["robust"]
                robust_s = round(cost["attack_s"] + cost["retain_s"], 1)
        unets[name] = unet
        rows[name] = {**evaluate(unet), "wall_s": round(wall, 1), "robust_s": robust_s, "steps": steps}
        print(name, rows[name], flush=True)
        write(rows)  # after every row: a long run that is stopped keeps what it measured
    if args.int8:
        unet = unets.get(args.int8)
        if unet is None:
            from safetensors.torch import load_file

            unet = copy.deepcopy(student0)
            state = load_file(args.int8_checkpoint)
            unet.load_state_dict({k[len("model.unet.") :]: v for k, v in state.items() if k.startswith("model.unet.")})
        extra["int8"] = {"row": args.int8, **int8_transfer(unet, rows[args.int8]["attacked_prompts"])}
        print("int8", extra["int8"], flush=True)
    return write(rows)


def drop_option(args: list[str], name: str) -> list[str]:
    """`args` without the option `name` and the values that follow it."""
    kept, dropping = [], False
    for arg in args:
        if arg.startswith("--"):
            dropping = arg == name
        if not dropping:
            kept.append(arg)
    return kept


def reproducing_args(given: list[str], rows: dict, extra: dict) -> list[str]:
    """The arguments that measure this result in one process from a clean checkout. A --merge run
    only assembles rows other runs measured (their files are scratch, not in the repository), so
    it is recorded as the single run of the same settings over the same rows and int8 section;
    the part commands that measured them in parallel are kept under `merged`."""
    if "--merge" not in given:
        return given
    args = drop_option(drop_option(drop_option(given, "--merge"), "--keep"), "--rows")
    args += ["--rows", *sorted(rows, key=ROWS.index)]
    if "int8" in extra and "--int8" not in args:
        args += ["--int8", extra["int8"]["row"]]
    return args


def write_plot(result: dict, path: Path) -> None:
    """Plain leakage and the three attacks' success per method (benchmarks/plots.py)."""
    from benchmarks.plots import attack_plot

    keys = ("prompt_attack", "soft_prompt_attack", "embedding_attack")
    rows = [
        {"name": name, "leakage": {"7": r["leakage_7"]}, "attack": {"7": {k: r.get(k) for k in keys}}}
        for name, r in sorted(result["rows"].items(), key=lambda item: ROWS.index(item[0]))
    ]
    if rows:
        attack_plot(rows, path, title="per method, erase 7")


def to_markdown(result: dict) -> str:
    rows = dict(sorted(result["rows"].items(), key=lambda item: ROWS.index(item[0])))
    teacher_acc = rows.get("teacher", {}).get("retain_accuracy")
    a = result["settings"]["attack"]
    pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
    lines = [
        *markdown_header("Erasure under attack on the digits world: erase 7, 30% channel pruning", result),
        "| row | leakage 7 | held-out leakage | prefix attack | (same prompts, no prefix) | soft-prompt attack "
        "| concept inversion | retain acc | retain / teacher | judge FID | train wall s | robust s | attack s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        rel = f"{r['retain_accuracy'] / teacher_acc:.2f}" if teacher_acc else "-"
        fid = f"{r['fid']:.2f}" if r["fid"] is not None else "-"
        lines.append(
            f"| {name} | {pct(r['leakage_7'])} | {pct(r['leakage_7_heldout'])} | {pct(r['prompt_attack'])} | "
            f"{pct(r['attack_plain'])} | {pct(r.get('soft_prompt_attack'))} | {pct(r['embedding_attack'])} | "
            f"{pct(r['retain_accuracy'])} | {rel} | {fid} | "
            f"{r['wall_s']} | {r['robust_s'] if r['robust_s'] is not None else '-'} | {r['attack_s']} |"
        )
    f = flat_finetune(result["settings"]["finetune"])
    lines += [
        "",
        f"Finetune: {f['steps']} steps, lower_lr {f['lower_lr']}, upper_lr {f['upper_lr']}, K={f['upper_every']}, "
        f"batch {f['batch_size']}, ESD from the anchor prompt: {f.get('esd_from_anchor', False)}; robust: "
        f"{f['robust_attack_steps']} steps of the {f.get('robust_attack', 'prefix')} attack on "
        f"{f['robust_prefix_tokens']} prefix tokens per upper step ('+robust-prefix': the discrete search), "
        f"retain weight {f['robust_retain_weight']}.",
        f"Attack budget: prefix attack {a['prefix_tokens']} tokens x {a['steps']} steps ({a['candidates']} swaps "
        f"checked per step among the top {a['topk']} tokens, judged every {a['select_every']} steps on "
        f"{a['select_images']} images, "
        f"{a['batch']} noised concept latents per prompt) on {a['n_prompts']} prompts, {a['images_per_prompt']} "
        f"images each; soft-prompt attack {a.get('soft_steps', 0)} Adam steps (lr {a.get('soft_lr')}) on the same "
        f"prefix and loss; concept inversion {a['inversion_steps']} steps (lr {a['inversion_lr']}). "
        f"Leakage: {result['settings']['n_per_prompt']} images per prompt, DDIM 25 steps, guidance 5.",
        "Attack success = share of generations the digits judge labels 7. '(same prompts, no prefix)' is the "
        "leakage of the attacked prompts without their prefix under the same seeds.",
        "Targets: leakage <= 2%, held-out <= 5%, prefix attack <= 15% with the robust option, retain >= 95% "
        "of the teacher's. Wall times are from 2 CPU cores shared with other jobs (noisy).",
        "",
    ]
    if "int8" in result:
        q = result["int8"]
        r = rows[q["row"]]
        lines += [
            f"## {q['row']} through export and int8 (ONNX Runtime, CPU)",
            "",
            "| model | leakage 7 | held-out leakage | prefix attack (prompts found on PyTorch) | retain acc | judge FID |",
            "|---|---|---|---|---|---|",
            f"| PyTorch | {pct(r['leakage_7'])} | {pct(r['leakage_7_heldout'])} | {pct(r['prompt_attack'])} | "
            f"{pct(r['retain_accuracy'])} | {r['fid']:.2f} |",
        ]
        pairs = (
            ("leakage_7", "leakage_7"),
            ("leakage_7_heldout", "leakage_7_heldout"),
            ("prompt_attack_transfer", "prompt_attack"),
            ("retain_accuracy", "retain_accuracy"),
        )
        changes = []
        for name in ("onnx_fp32", "onnx_int8"):
            m = q[name]
            change = max(abs(m[k] - r[base]) for k, base in pairs) * 100
            changes.append(f"{name} {change:.1f}")
            lines.append(
                f"| {name} | {pct(m['leakage_7'])} | {pct(m['leakage_7_heldout'])} | "
                f"{pct(m['prompt_attack_transfer'])} | {pct(m['retain_accuracy'])} | {m['fid']:.2f} |"
            )
        n, a_n = result["settings"]["n_per_prompt"], a["images_per_prompt"] * a["n_prompts"]
        counts = {k: v * n for k, v in result["settings"]["prompts"].items()}
        lines += [
            "",
            "Int8: static QDQ, Conv + MatMul, 16 calibration feeds (the default recipe's form). Same seeds as "
            f"the PyTorch row. Largest change of a figure against PyTorch, in points (target <= 1): "
            f"{', '.join(changes)}. One image is {100 / counts['erase']:.2f} points of leakage, "
            f"{100 / counts['heldout']:.2f} of held-out leakage, {100 / a_n:.2f} of attack success, "
            f"{100 / counts['retain']:.2f} of retain accuracy.",
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
