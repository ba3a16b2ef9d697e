"""What the digits-world erasure benchmarks (finetune_digits, attack_digits, onestep_digits) share:
the "erase 7 from a 30%-channel-pruned student" setup, writing OUT.json/OUT.md, and the markdown
header that names the command, machine and versions."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class EraseSeven:
    """The embedded digits pipeline (its UNet is the teacher), a pruned copy of the teacher to
    train from, its pruning record, the digits judge and the concept's prompt sets."""

    seven: Any  # ConceptConfig of digit 7
    pipe: Any
    teacher: Any
    student0: Any
    record: Any
    judge: Any
    erase: dict[str, list[str]]
    heldout: dict[str, list[str]]
    retain: dict[str, list[str]]


def erase_seven(prune_ratio: float = 0.3) -> EraseSeven:
    from benchmarks.leakage import get_judge
    from toolchain.config import load_concept
    from toolchain.models.io import EMBEDDED_MODEL, load_pipeline
    from toolchain.pruning.channels import prune_unet_channels

    seven = load_concept("7")
    pipe = load_pipeline(EMBEDDED_MODEL)
    student0 = copy.deepcopy(pipe.unet)
    record = prune_unet_channels(student0, prune_ratio)
    return EraseSeven(
        seven=seven,
        pipe=pipe,
        teacher=pipe.unet,
        student0=student0,
        record=record,
        judge=get_judge("digits"),
        erase={"7": seven.erase_prompts},
        heldout={"7": seven.heldout_prompts},
        retain=dict(seven.retain_prompts),
    )


def write_result(out: Path | None, result: dict, to_markdown: Callable[[dict], str]) -> None:
    """OUT.json and OUT.md (nothing when `out` is None)."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(to_markdown(result))


def markdown_header(title: str, result: dict) -> list[str]:
    """Title, command and machine/versions lines of a result's markdown."""
    return [
        f"# {title}",
        "",
        f"Command: `{result['command']}`  ",
        *[f"Rows merged from: `{command}`  " for command in result.get("merged", [])],
        f"Machine: {result['machine']['platform']}, 1 torch thread; versions: "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        "",
    ]


# A results .md is rendered from its .json by code; findings a person adds go below this heading,
# which a re-render keeps (a results .json carries no hand-written text).
HANDWRITTEN_HEADING = "## Hand-written notes (not produced by the script)"


def handwritten_section(md: Path) -> str:
    """The hand-written part of an existing OUT.md, from HANDWRITTEN_HEADING to the end, preceded by
    the blank line that separates it from the rendered part; "" when the file or heading is absent.
    Render a result as `to_markdown(result) + handwritten_section(md)`."""
    text = md.read_text() if md.is_file() else ""
    start = text.find(HANDWRITTEN_HEADING)
    return "" if start < 0 else "\n" + text[start:]


def finetune_config(items: list[str], **fixed):
    """FinetuneConfig from `fixed` plus `--set key=value` items (YAML values; a dotted key sets a
    sub-config: `esd.eta=2.0`). Commands recorded before the sub-configs name flat keys
    (`esd_eta=2.0`, `robust=true`); they are read under their new names, so they still run."""
    from toolchain.config import MOVED_FINETUNE_KEYS, FinetuneConfig, deep_merge, from_dict, parse_override

    data: dict[str, Any] = dict(fixed)
    for item in items:
        key, sep, value = item.partition("=")
        key = "robust.enabled" if key == "robust" else MOVED_FINETUNE_KEYS.get(key, key)
        data = deep_merge(data, parse_override(f"{key}{sep}{value}"))
    return from_dict(FinetuneConfig, data, "finetune")


def flat_finetune(fields: dict) -> dict:
    """A results file's finetune settings under the flat names of before the sub-configs
    (`esd_eta`, `robust_attack_steps`, ...), so files written before and after render alike."""
    from toolchain.config import MOVED_FINETUNE_KEYS

    flat = dict(fields)
    for old, new in MOVED_FINETUNE_KEYS.items():
        section, leaf = new.split(".")
        if old not in flat and isinstance(fields.get(section), dict) and leaf in fields[section]:
            flat[old] = fields[section][leaf]
    if isinstance(fields.get("robust"), dict):
        flat["robust"] = fields["robust"]["enabled"]
    return flat
