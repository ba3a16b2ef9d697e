"""`compress`: prune, distill while unlearning, quantize and export a diffusion model.

Exit codes: 0 ok, 1 a gate failed (parity, regression), 2 bad input (nothing left behind),
3 training diverged (the run folder keeps the stages sealed before it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from toolchain.cache import ENV as CACHE_ENV

EXAMPLES = """\
examples:
  compress --target onnx                      embedded digits model -> runs/compress/deploy/onnx/
  compress --target coreml                    Core ML packages for Apple's Swift pipeline
  compress --target ort                       ORT format + required_operators.config (Android)
  compress --target qnn                       Qualcomm NPU: fixed-shape graphs + HTP context binaries
  compress --target executorch                ExecuTorch .pte programs (XNNPACK) for Android and iOS
  compress --target onnx --dry-run            print the plan, touch nothing
  compress --target onnx prune.ratio=0.5      override any recipe key with key=value
  compress --target onnx --model ./sd-1-5 --out runs/sd15 benchmark.judge=none
  compress --target onnx --erase 7            score digit 7's leakage at every stage
  compress --target onnx --from-stage export  re-run export and everything after it
  compress validate configs/recipes/tiny.yaml check a recipe without loading a model
  compress bench runs/compress                 re-measure a finished run's report
  compress bench runs/compress --baseline benchmarks/results/baseline-default.json
                                              the CI gate: exit 1 on a regression

exit codes: 0 ok, 1 a gate failed (parity, regression), 2 bad input (one line; nothing
  written), 3 training diverged (lower the learning rates; earlier sealed stages are kept)
"""


def _run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compress",
        description="Make a Stable Diffusion pipeline small and fast for a phone, export it, and "
        "report latency, size, parity and concept leakage. Subcommands: validate, bench "
        "(`compress validate --help`).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--target",
        metavar="{onnx,ort,coreml,qnn,executorch}",
        help="deployment format (default: the recipe's, else onnx)",
    )
    parser.add_argument("--model", help="diffusers pipeline folder (default: the embedded digits model)")
    parser.add_argument("--recipe", help="recipe YAML or shipped recipe name (default: default)")
    parser.add_argument("--out", default="runs/compress", help="run folder (default: runs/compress)")
    parser.add_argument("--erase", nargs="+", default=[], metavar="CONCEPT", help="concept names or concept YAML files")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--force", action="store_true", help="re-run every stage even if sealed")
    parser.add_argument("--from-stage", metavar="NAME", help="re-run this stage and everything after it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="cross-run cache: the source's export for side-by-side timing, teacher samples "
        "(default: $COMPRESS_CACHE, else ~/.cache/diffusion-compress)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. prune.ratio=0.5")
    return parser


def _validate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compress validate",
        description="Validate recipes, target profiles or concept files without loading a model.",
    )
    parser.add_argument("files", nargs="+", type=Path, help="YAML files (their folder says their kind)")
    return parser


def _bench_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compress bench",
        description="Re-measure a finished run and print its report; with --baseline, compare it with a "
        "baseline report.json and exit 1 on a regression (the CI gate).",
        epilog="examples:\n"
        "  compress bench runs/compress\n"
        "  compress bench runs/compress --profile cuda\n"
        "  compress bench runs/compress/03-export --runtime onnxruntime   one stage, one runtime\n"
        "  compress bench runs/ci --baseline benchmarks/results/baseline-default.json --tolerance speedup_ratio=1.5\n"
        "  compress bench runs/ci/report.json --baseline old.json     compare without re-measuring\n"
        "  compress bench runs/ci --baseline old.json --allow-missing 'leakage quantize/*'   an intended change\n"
        "\nexit codes: 0 ok, 1 a regression beyond the tolerances, 2 bad input",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "path",
        type=Path,
        help="a run folder written by `compress`, one sealed stage folder of it (that stage and its "
        "ancestors are measured), or a report.json to compare as is",
    )
    parser.add_argument(
        "--runtime",
        action="append",
        choices=("torch", "onnxruntime", "ort", "coreml"),
        help="measure only the models of this runtime (repeatable; default: every one in the run)",
    )
    parser.add_argument("--json", action="store_true", help="print report.json instead of the markdown table")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument(
        "--profile",
        help="device profile: a configs/devices name or a YAML path (default: $COMPRESS_DEVICE_PROFILE or desktop-cpu)",
    )
    parser.add_argument("--baseline", type=Path, help="baseline report.json; exit 1 when the run regressed against it")
    parser.add_argument(
        "--tolerance",
        action="append",
        default=[],
        metavar="key=value",
        help="override a tolerance of the gate, e.g. latency_ratio=2 (keys: see benchmarks/regress.py); "
        "leakage_points / retain_points below one image of the samples compared are refused",
    )
    parser.add_argument(
        "--absolute-latency",
        action="store_true",
        help="gate absolute latencies too (a quiet, dedicated machine); by default speed is gated as the "
        "deliverable's speed-up over the source, timed in turns in one run, and absolute times are shown",
    )
    parser.add_argument(
        "--allow-missing",
        action="append",
        default=[],
        metavar="KEY",
        help="let a baseline metric be absent or unjudged in the report (an intended schema change): a metric "
        "name as the table prints it, its kind (e.g. fid), or a glob ('leakage quantize/*'); repeatable",
    )
    return parser


def _configure_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # torchao (imported by diffusers and ExecuTorch) warns about every CUDA kernel library a CPU build lacks
    logging.getLogger("torchao").setLevel(logging.ERROR)


def _cmd_run(args: argparse.Namespace) -> int:
    from toolchain import pipeline
    from toolchain.config import load_config
    from toolchain.models.io import resolve_model

    # `--erase 7 prune.ratio=0.5`: nargs="+" also swallows the overrides; no concept has a "="
    erase = [e for e in args.erase if "=" not in e]
    overrides = [e for e in args.erase if "=" in e] + args.overrides
    cfg, sources = load_config(args.recipe, args.target, overrides, erase)
    model = resolve_model(args.model)
    out = Path(args.out).resolve()
    stages = pipeline.plan(cfg)
    if args.dry_run:
        print(pipeline.describe_plan(cfg, model, out, stages))
        return 0
    if args.cache_dir:  # through the environment, so every process of a multi-process launch sees it
        os.environ[CACHE_ENV] = str(Path(args.cache_dir).expanduser().resolve())
    chain = pipeline.run(cfg, model, out, force=args.force, from_stage=args.from_stage, progress=not args.no_progress)
    if not chain:  # a process other than 0 of a multi-process launch: process 0 reports
        return 0
    print(f"deployable: {out / 'deploy' / cfg.target}")
    print(f"report:     {out / 'report.json'}")
    return 0


def _cmd_validate(argv: list[str]) -> int:
    from toolchain.validate import validate_file

    args = _validate_parser().parse_args(argv)
    for path in args.files:
        kind = validate_file(path)
        print(f"ok  {path} ({kind[:-1]})")
    return 0


def _read_report(path: Path) -> dict:
    from toolchain.config import ConfigError

    if not path.is_file():
        raise ConfigError(f"{path}: no such report; pass a report.json written by `compress`")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not JSON ({exc}); pass a report.json written by `compress`") from None
    if not isinstance(report, dict) or "schema_version" not in report:
        raise ConfigError(f"{path}: not a compress report.json (no schema_version)")
    return report


def _cmd_bench(argv: list[str]) -> int:
    from benchmarks.regress import Tolerances, check_all, format_table
    from toolchain import artifact as art
    from toolchain.config import BenchmarkSettings, ConfigError, RunConfig, from_dict
    from toolchain.errors import GateError
    from toolchain.pipeline import RunContext
    from toolchain.stages import benchmark

    args = _bench_parser().parse_args(argv)
    tolerances = Tolerances.from_overrides(args.tolerance)  # bad input fails before any measuring
    baseline = _read_report(args.baseline) if args.baseline else None
    if (args.tolerance or args.allow_missing) and baseline is None:
        raise ConfigError("--tolerance and --allow-missing need --baseline FILE")
    # a baseline that gates nothing, or a tolerance its samples cannot resolve, fails before measuring
    if baseline is not None and not check_all(baseline, baseline, tolerances):
        raise ConfigError(f"{args.baseline}: no metric to compare; record the baseline from a finished run")
    if args.profile:
        from toolchain.device_config import load_device_profile

        load_device_profile(args.profile)
    if args.runtime and "coreml" in args.runtime:
        raise ConfigError(
            "--runtime coreml: Core ML predictions run only on macOS; there, `pytest device_tests` "
            "compiles the .mlpackages and times them per compute unit (see device_tests/README.md)"
        )
    run_dir, last = args.path, None
    if (run_dir / art.MANIFEST).is_file() and (run_dir.parent / "00-source").is_dir():
        run_dir, last = run_dir.parent, run_dir.name  # one stage of a run: it and its ancestors
    if run_dir.is_file():
        if args.profile or args.runtime:
            raise ConfigError(f"--profile and --runtime re-measure a run folder; {run_dir} is a report file")
        report = _read_report(run_dir)
        text = json.dumps(report, indent=2) if args.json else None
    else:
        folders = sorted(p for p in run_dir.glob("[0-9][0-9]-*") if (p / art.MANIFEST).is_file())
        chain = [art.load(p) for p in folders if not p.name.endswith("-benchmark")]
        if last is not None and not last.endswith("-benchmark"):
            chain = chain[: [a.path.name for a in chain].index(last) + 1]
        if not chain or chain[0].stage != "source":
            raise ConfigError(f"{run_dir}: not a finished compress run (no sealed 00-source); run `compress` first")
        sealed_report = folders[-1] if folders[-1].name.endswith("-benchmark") else None
        if sealed_report is None:
            raise ConfigError(f"{run_dir}: no sealed benchmark stage; run `compress` to the end first")
        sealed = art.load(sealed_report)
        run_wide = ("erase", "attack", "target", "recipe")
        section = {k: v for k, v in sealed.config.items() if k not in run_wide}
        cfg = from_dict(
            RunConfig,
            {"erase": sealed.config.get("erase", []), "benchmark": section, "attack": sealed.config.get("attack", {})},
        )
        target, recipe = sealed.config.get("target", "onnx"), sealed.config.get("recipe", "")
        settings = BenchmarkSettings(cfg.benchmark, list(cfg.erase), cfg.attack, target, recipe)
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            ctx = RunContext(run_dir=run_dir, out_dir=Path(tmp), chain=chain, progress=True)
            runtimes = set(args.runtime) if args.runtime else None
            benchmark.run(chain[-1], settings, ctx, profile=args.profile, runtimes=runtimes)
            report = json.loads((Path(tmp) / "report.json").read_text())
            text = json.dumps(report, indent=2) if args.json else (Path(tmp) / "report.md").read_text()
    if baseline is None:
        print(text)
        return 0
    rows = check_all(report, baseline, tolerances, tuple(args.allow_missing), args.absolute_latency)
    print(format_table(rows))
    failed = [f"{r.metric} ({r.verdict})" for r in rows if r.failed]
    if failed:
        raise GateError(f"{len(failed)} failure(s) against {args.baseline}: {', '.join(failed)}")
    allowed = sum(r.verdict == "missing (allowed)" for r in rows)
    print(
        f"no regression against {args.baseline} ({len(rows) - allowed} metrics compared"
        + (f", {allowed} allowed missing)" if allowed else ")")
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    from toolchain.config import ConfigError
    from toolchain.errors import GateError, TrainingDivergedError
    from toolchain.models.io import ModelError

    argv = list(sys.argv[1:] if argv is None else argv)
    for library in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):  # their import-time warnings are noise
        os.environ.setdefault(library, "error")
    commands = {"validate": _cmd_validate, "bench": _cmd_bench}
    try:
        if argv and argv[0] in commands:
            _configure_logging(quiet="-q" in argv)
            return commands[argv[0]](argv[1:])
        args = _run_parser().parse_args(argv)
        _configure_logging(args.quiet)
        if args.no_progress:  # also diffusers' own bars ("Loading pipeline components")
            from diffusers.utils import logging as diffusers_logging

            diffusers_logging.disable_progress_bar()
        return _cmd_run(args)
    except (ConfigError, ModelError) as exc:
        print(f"compress: error: {exc}", file=sys.stderr)
        return 2
    except GateError as exc:
        print(f"compress: gate failed: {exc}", file=sys.stderr)
        return 1
    except TrainingDivergedError as exc:
        print(f"compress: training diverged: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("compress: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
