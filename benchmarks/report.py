"""The run's report: `report.json` (the versioned contract in DESIGN.md) and `report.md`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


def write_report(report: dict[str, Any], folder: Path) -> None:
    """Write report.json and a human-readable report.md into `folder`."""
    report = {"schema_version": SCHEMA_VERSION, **report}
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "report.md").write_text(render_markdown(report))


def _fmt(value: Any) -> str:
    if value is None or value == {} or value == []:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    return str(value)


def _share(share: Any, n: Any) -> Any:
    """A share with its image count and 95% Wilson interval, e.g. `0.0714 (1/14, 0.013–0.315)`;
    the bare share where the report predates the counts."""
    from benchmarks.leakage import wilson_interval

    if not isinstance(share, float | int) or isinstance(share, bool) or not n or math.isnan(share):
        return share
    low, high = wilson_interval(round(share * n), n)
    return f"{share:.4g} ({round(share * n)}/{n}, {low:.3f}–{high:.3f})"


def _stage_row(stage: dict[str, Any]) -> dict[str, Any]:
    """A stage entry with every share (leakage, retain accuracy, held-out leakage, attack success)
    written with its image count and interval, attack figures pulled up to one column each."""
    attack = stage.get("attack") or {}
    row = {
        **stage,
        "leakage": {
            k: _share(v, (stage.get("leakage_n") or {}).get(k)) for k, v in (stage.get("leakage") or {}).items()
        },
        "retain_accuracy": _share(stage.get("retain_accuracy"), stage.get("retain_n")),
    }
    for key in ("heldout_leakage", "prompt_attack", "soft_prompt_attack", "embedding_attack"):
        row[key] = {k: _share(a.get(key), a.get(f"{key}_n")) for k, a in attack.items()}
    return row


def _table(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return lines + [""]


def render_markdown(report: dict[str, Any]) -> str:
    plots = set(report.get("plots", []))
    lines = _header(report)
    lines += _stages_section(report, plots)
    lines += _side_by_side_section(report)
    lines += _latency_section(report, plots)
    lines += _memory_section(report)
    lines += ["## Parity (each format against its reference)", ""]
    lines += _table(
        report.get("parity", []), ["component", "format", "reference", "max_abs_err", "psnr_db", "tolerance"]
    )
    lines += _guidance_section(report)
    lines += _htp_section(report)
    if report.get("usability"):
        lines += [
            "## Phone accelerators (ONNX Runtime's usability check: partitions and the share of nodes each takes)",
            "",
        ]
        columns = ["stage", "component", "execution_provider", "partitions", "coverage", "nodes"]
        blocked = ["nodes_blocked_by_dynamic_shapes", "of_which_absent_optional_input", "unsupported_ops"]
        accepted = ["partitions_absent_inputs_accepted", "coverage_absent_inputs_accepted"]
        lines += _table(report["usability"], columns + blocked + accepted)
        lines += [
            "NNAPI and Core ML EP rows are ONNX Runtime's estimate from its op lists. It counts a node with an "
            "absent optional input (Resize's roi) as blocked by a dynamic shape, which the providers' own "
            "`IsInputSupported` accepts: the last two columns give the figures under that rule. QNN rows are the "
            "session's own node assignment on the HTP backend.",
            "",
        ]
    return "\n".join(lines)


def _htp_section(report: dict[str, Any]) -> list[str]:
    """The share of a QNN deliverable's images drawn through the HTP backend itself."""
    rows = [
        {"stage": s["name"], "concept": label, "images": s["htp"]["leakage_n"][label], "leakage": share,
         "same_label_as_cpu": s["htp"]["agreement"][label],
         "same_leakage_call_as_cpu": s["htp"].get("concept_agreement", {}).get(label)}
        for s in report.get("stages", []) if s.get("htp")
        for label, share in s["htp"]["leakage"].items()
    ]  # fmt: skip
    if not rows:
        return []
    lines = [
        "## Through the QNN HTP backend (simulator on x86)",
        "",
        "The stage's other images ran its QNN graphs on ONNX Runtime's CPU provider; these were drawn on the HTP "
        "backend itself, with the judge's agreement between the two on the same seeds.",
        "",
    ]
    return lines + _table(
        rows, ["stage", "concept", "images", "leakage", "same_label_as_cpu", "same_leakage_call_as_cpu"]
    )


def _guidance_section(report: dict[str, Any]) -> list[str]:
    """Per compressed UNet and timestep band: its guidance signal against the fp32 model's."""
    rows = [
        {"component": g["component"], "format": g["format"], "reference": g.get("reference"), **band}
        for g in report.get("guidance", [])
        for band in g["bands"]
    ]
    if not rows:
        return []
    floors = {(g["cosine_floor"], tuple(g["norm_ratio_range"])) for g in report["guidance"]}
    floor = "; ".join(f"cosine >= {c}, norm ratio in [{lo}, {hi}]" for c, (lo, hi) in sorted(floors))
    lines = [
        "## Guidance fidelity (eps(x, c) - eps(x, ∅) against the fp32 model, held-out trajectory feeds)",
        "",
        f"Gate, every band: {floor}.",
        "",
    ]
    columns = ["component", "format", "reference", "band", "t_min", "t_max", "images", "cosine", "cosine_min"]
    return lines + _table(rows, columns + ["norm_ratio"])


def _header(report: dict[str, Any]) -> list[str]:
    """Title, model, warnings and the device profile."""
    from benchmarks.side_by_side import headline

    model = report.get("model", {})
    lines = ["# diffusion-compress report", ""]
    line = headline(report)
    if line:
        lines += [f"**{line}**", ""]
    lines += [
        f"- model: `{model.get('source')}`",
        f"- target: {model.get('target')}, recipe: `{model.get('recipe')}`",
        f"- erase: {', '.join(model.get('erase', [])) or 'none'}",
        "",
    ]
    for warning in report.get("warnings", []):
        lines.append(f"> **Warning:** {warning}")
    if report.get("warnings"):
        lines.append("")
    profile = report.get("device_profile")
    if profile:
        lines += [
            f"- device profile: **{profile.get('name')}** ({profile.get('description')}); "
            f"threads {profile.get('threads_used') or 'default'}, providers {', '.join(profile.get('providers_used', []))}"
            + (", emulated on this machine" if profile.get("emulated") else ""),
            "",
        ]
    return lines


def _stages_section(report: dict[str, Any], plots: set[str]) -> list[str]:
    """Stage table with shares, counts and intervals; the judge; accuracy per label; quality plots."""
    lines = ["## Stages", ""]
    stage_rows = [_stage_row(s) for s in report.get("stages", [])]
    attacked = any("prompt_attack" in a for s in report.get("stages", []) for a in (s.get("attack") or {}).values())
    lines += _table(
        stage_rows,
        ["name", "params", "size_bytes", "leakage", "heldout_leakage"]
        + (["prompt_attack", "soft_prompt_attack", "embedding_attack"] if attacked else [])
        + ["retain_accuracy", "fid", "wall_s"],
    )
    if any(s.get("retain_n") or s.get("leakage_n") for s in report.get("stages", [])):
        lines += [
            "Shares: value (images judged as the concept or as prompted / images judged, 95% Wilson interval).",
            "",
        ]
    if attacked:
        lines += [
            "prompt_attack / soft_prompt_attack / embedding_attack: share of images judged as the erased concept "
            "under the white-box prefix-prompt attack / its continuous form / concept inversion; exported stages "
            "run the prompts found on the last PyTorch stage (report.json `attack.<label>.attacked_on`).",
            "",
        ]
    judge = report.get("judge")
    if judge:
        details = ", ".join(f"{k} {v}" for k, v in judge.items() if k != "judge")
        lines += [f"Judge: **{judge.get('judge')}**" + (f" ({details})" if details else ""), ""]
        lines += ["heldout_leakage: leakage on the concept's held-out phrasings, which no training step used.", ""]
    if report.get("per_label_accuracy"):
        lines += ["## Judge accuracy per label", ""]
        counts = report.get("per_label_n") or {}
        rows = [
            {"stage": s, **{k: _share(v, (counts.get(s) or {}).get(k)) for k, v in acc.items()}}
            for s, acc in report["per_label_accuracy"].items()
        ]
        labels = sorted({k for acc in report["per_label_accuracy"].values() for k in acc})
        lines += _table(rows, ["stage", *labels])
    if "quality.png" in plots:
        lines += ["![leakage and retain accuracy per stage](quality.png)", ""]
    if "samples.png" in plots:
        lines += ["![sample images per stage, erased concepts in red](samples.png)", ""]
    return lines


SIDE_COLUMNS = ["component", "batch", "method", "source_ms", "deliverable_ms", "speedup", "size_ratio"]


def _side_by_side_section(report: dict[str, Any]) -> list[str]:
    side = report.get("side_by_side")
    if not side:
        return []
    how = {name: side[name] for name in ("source", "deliverable")}
    lines = ["## Side by side with the source", ""]
    for name, info in how.items():
        guided = f"guidance {info['guidance_scale']}" if info.get("guidance_scale") is not None else "no guidance"
        lines.append(f"- {name} (`{info['stage']}`): {info['steps']} UNet steps per image, {guided}")
    lines += [
        f"- {side['runtime']} on {side['provider']}, threads {side['threads'] or 'default'}, the two timed in turns",
        "",
    ]
    return lines + _table(side.get("rows", []), [*SIDE_COLUMNS, "repeats"])


LATENCY_COLUMNS = ["runtime", "profile", "stage", "component", "batch", "steps", "method", "median_ms", "p90_ms"]


def _latency_section(report: dict[str, Any], plots: set[str]) -> list[str]:
    lines = ["## Latency", ""]
    lines += _table(report.get("latency", []), [*LATENCY_COLUMNS, "load_ms", "provider"])
    if "latency.png" in plots:
        lines += ["![latency per runtime and component](latency.png)", ""]
    return lines


def _memory_section(report: dict[str, Any]) -> list[str]:
    if not report.get("memory"):
        return []
    lines = ["## Peak memory (fresh process per model)", ""]
    rows = [
        {
            **m,
            "peak_rss_mib": m["peak_rss_bytes"] / 2**20 if m.get("peak_rss_bytes") else None,
            "runtime_rss_mib": m["runtime_rss_bytes"] / 2**20 if m.get("runtime_rss_bytes") else None,
            "cuda_peak_mib": m["cuda_peak_bytes"] / 2**20 if m.get("cuda_peak_bytes") else None,
        }
        for m in report["memory"]
    ]
    columns = ["runtime", "profile", "stage", "component", "peak_rss_mib", "runtime_rss_mib", "cuda_peak_mib"]
    lines += _table(rows, columns + (["over_budget"] if any("over_budget" in m for m in rows) else []))
    return lines + ["runtime_rss: the process after importing the runtime, before the model was loaded.", ""]
