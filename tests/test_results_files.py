"""Committed results (benchmarks/results/*.json): written by code only, and every command they
name reproduces them from a clean checkout. Findings a person adds live in the .md's hand-written
section (benchmarks/studies/digits_erase.py, HANDWRITTEN_HEADING), never in the JSON."""

import ast
import importlib
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# results whose JSON names no `command` of its own: the files of the code that writes them
WRITERS = {
    "baseline-default.json": ["toolchain/stages/benchmark.py", "benchmarks/report.py"],  # a run's report.json
    "baseline-fastest.json": ["toolchain/stages/benchmark.py", "benchmarks/report.py"],  # --recipe fastest's
    "chain-sd15.json": ["benchmarks/studies/chain_sd15.py"],
    "int8-digits.json": ["benchmarks/studies/int8_speed.py"],
    # its rows carry export.guidance's per-band entries as that module writes them
    "phone-runtimes.json": ["benchmarks/studies/phone_runtimes.py", "export/guidance.py"],
    "int8-speed.json": ["benchmarks/studies/int8_speed.py"],
    # each row is export_sd15.run_child's measurement of a phone_sd15 child
    "phone-sd15.json": ["benchmarks/studies/phone_sd15.py", "benchmarks/studies/export_sd15.py"],
}
# results whose .md is rendered from the .json by the writer's `to_markdown`, plus the hand-written section
RENDERED = {"attack-digits": "benchmarks.studies.attack_digits", "onestep-digits": "benchmarks.studies.onestep_digits"}
RENDERED["finetune-digits"] = "benchmarks.studies.finetune_digits"
RENDERED["decoder"] = "benchmarks.studies.decoder"
RENDERED["chain-sd15"] = "benchmarks.studies.chain_sd15"
RENDERED["phone-runtimes"] = "benchmarks.studies.phone_runtimes"
RENDERED["phone-sd15"] = "benchmarks.studies.phone_sd15"
RENDERED["erasure-digits"] = "benchmarks.studies.erasure_digits"
RENDERED["bilevel-cost"] = "benchmarks.studies.bilevel_cost"
RENDERED["onestep-compress"] = "benchmarks.studies.onestep_compress"
RESULT_FILES = sorted(p.name for p in RESULTS.glob("*.json"))
# Results recorded before the studies moved to benchmarks/studies/ name their script by its old
# module path, as the code that wrote them did; the JSON stays as written, this resolves the name.
STUDIES = (
    "attack_digits",
    "export_sd15",
    "finetune_digits",
    "int8_speed",
    "onestep_digits",
    "prune_sd15",
    "run_disk_sd15",
)
MOVED = {f"benchmarks.{name}": f"benchmarks.studies.{name}" for name in STUDIES}


def _module_file(module: str) -> Path:
    return ROOT / (MOVED.get(module, module).replace(".", "/") + ".py")


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _writer_files(name: str, result: dict) -> list[Path]:
    if name in WRITERS:
        return [ROOT / f for f in WRITERS[name]]
    match = re.match(r"python -m (benchmarks(?:\.\w+)+)\b", result.get("command", ""))
    assert match, f"{name}: no `command` naming its writer (python -m benchmarks.<script> ...), and not in WRITERS"
    return [_module_file(match.group(1))]


def _written_keys(files: list[Path]) -> set[str]:
    """String keys the code can write: dict displays, `x["key"] = ...`, setdefault("key", ...), and
    keyword arguments of dict(...) / .update(...). Reads such as `.get("key")` do not count."""
    keys = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Dict):
                keys |= {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
            elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store):
                if isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
                    keys.add(node.slice.value)
            elif isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if name == "setdefault" and node.args and isinstance(node.args[0], ast.Constant):
                    keys.add(node.args[0].value)
                if name in ("dict", "update"):
                    keys |= {k.arg for k in node.keywords if k.arg}
    return keys


@pytest.mark.parametrize("name", RESULT_FILES)
def test_results_carry_only_keys_their_writer_writes(name):
    result = _load(name)
    files = _writer_files(name, result)
    written = _written_keys(files)
    assert sorted(set(result) - written) == [], f"{name}: keys no code in {[str(f) for f in files]} writes"
    rows = result.get("rows", {})
    for row_name, row in rows.items() if isinstance(rows, dict) else enumerate(rows):
        assert sorted(set(row) - written) == [], f"{name}: row {row_name} has keys its writer does not write"


def _commands(value) -> list[str]:
    """Every command a results file names: `command` values anywhere, and `merged` lists."""
    if isinstance(value, list):
        return [c for item in value for c in _commands(item)]
    if not isinstance(value, dict):
        return []
    found = [v for k, v in value.items() if k == "command" and isinstance(v, str)]
    found += [c for c in value.get("merged", []) if isinstance(c, str)]
    return found + [c for k, v in value.items() if k != "merged" for c in _commands(v)]


@pytest.mark.parametrize("name", RESULT_FILES)
def test_commands_run_from_a_clean_checkout(name):
    """No input outside the repository (/tmp), a script that exists (or the `compress` command line),
    and `--out` writing this file.
    A `--samples-cache` path is no input: finetune_digits makes the cache when it is not there."""
    result = _load(name)
    for command in _commands(result):
        words = command.split()
        if "--samples-cache" in words:
            del words[words.index("--samples-cache") : words.index("--samples-cache") + 2]
        assert "/tmp" not in " ".join(words), f"{name}: {command!r} names a /tmp path a clean checkout lacks"
        if words[0] == "compress":  # a run of the command line itself (onestep-compress's rows)
            continue
        module = re.match(r"python -m ([\w.]+)", command)
        assert module and _module_file(module.group(1)).is_file(), command
    command = result.get("command") or result.get("environment", {}).get("command")
    if command and "--out" in command.split():
        out = command.split()[command.split().index("--out") + 1]
        stem = f"benchmarks/results/{Path(name).stem}"
        assert out in (stem, stem + ".json", "benchmarks/results"), f"{name}: --out {out} writes another file"


@pytest.mark.parametrize("stem", sorted(RENDERED))
def test_markdown_is_the_json_rendered_plus_the_hand_written_section(stem):
    from benchmarks.studies.digits_erase import handwritten_section

    to_markdown = importlib.import_module(RENDERED[stem]).to_markdown
    md = RESULTS / f"{stem}.md"
    assert md.read_text() == to_markdown(_load(f"{stem}.json")) + handwritten_section(md)


def test_a_merged_attack_result_records_the_single_run_that_reproduces_it():
    """`attack_digits --merge` assembles rows other runs wrote to scratch files; its `command` is the
    one run of the same settings over those rows, and the parts lose their scratch `--out`."""
    from benchmarks.studies.attack_digits import drop_option, reproducing_args

    given = "--steps 600 --set upper_every=3 --out benchmarks/results/attack-digits --rows --merge /tmp/a.json".split()
    rows = {"distill": {}, "teacher": {}}
    args = reproducing_args(given, rows, {"int8": {"row": "distill"}})
    assert args == "--steps 600 --set upper_every=3 --out benchmarks/results/attack-digits".split() + [
        "--rows",
        "teacher",
        "distill",
        "--int8",
        "distill",
    ]
    assert reproducing_args(["--steps", "3", "--rows", "teacher"], rows, {}) == ["--steps", "3", "--rows", "teacher"]
    assert drop_option("--out /tmp/x --rows a b".split(), "--out") == ["--rows", "a", "b"]


@pytest.mark.parametrize("name", [*STUDIES, "digits_erase", "erasure_digits", "bilevel_cost"])
def test_studies_find_the_files_they_name(name):
    """The studies moved one folder down: a path built from `__file__` that missed the move names
    nothing, and the study fails only when someone reruns it. Every module-level path must exist."""
    module = importlib.import_module(f"benchmarks.studies.{name}")
    for attr, value in vars(module).items():
        if isinstance(value, Path) and value.is_absolute():
            assert value.exists(), f"benchmarks.studies.{name}.{attr} = {value}"
