"""PNG plots for the run's report: latency per runtime/component, leakage and retain accuracy
per stage, and a sample grid of erased vs retained prompts per stage.

matplotlib is imported inside the functions (Agg backend, no display needed) so that
`import benchmarks.plots` stays light. Each function writes one PNG and returns its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

LATENCY_PNG = "latency.png"
QUALITY_PNG = "quality.png"
SAMPLES_PNG = "samples.png"
ATTACK_PNG = "attack.png"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_plot(latency: list[dict[str, Any]], path: Path) -> Path:
    """Median (bar) and p90 (whisker) ms per row, log scale: per-image rows dwarf components."""
    plt = _pyplot()
    rows = sorted(latency, key=lambda r: (r["component"] == "image", r["runtime"], r.get("stage", ""), r["component"]))
    labels = [
        f"{r['runtime']} {r.get('stage', '')} {r['component']}"
        + (f" ({r.get('method')}, {r.get('steps')} steps)" if r["component"] == "image" else f" b{r.get('batch')}")
        for r in rows
    ]
    medians = np.array([r["median_ms"] for r in rows], dtype=float)
    p90 = np.array([r.get("p90_ms") or r["median_ms"] for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.5))
    colors = ["tab:orange" if r["component"] == "image" else "tab:blue" for r in rows]
    ax.barh(range(len(rows)), medians, xerr=[np.zeros_like(p90), np.maximum(p90 - medians, 0)], color=colors)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    if len(rows) and medians.min() > 0:
        ax.set_xscale("log")
    profile = rows[0].get("profile", "") if rows else ""
    ax.set_xlabel("median ms (whisker: p90)")
    ax.set_title(f"Latency, profile {profile}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _wilson_errors(values: list[float], counts: list[int | None]) -> np.ndarray:
    """(2, N) distances from each share to its 95% Wilson interval's ends, for `bar(yerr=...)`;
    zero where the share has no image count (reports written before the counts) or is missing."""
    from benchmarks.leakage import share_interval

    errors = np.zeros((2, len(values)))
    for i, (value, n) in enumerate(zip(values, counts, strict=True)):
        interval = share_interval(float(value), int(n)) if n and value is not None else None
        if interval is not None:
            errors[:, i] = max(value - interval[0], 0.0), max(interval[1] - value, 0.0)
    return errors


def _bars(ax, x: np.ndarray, series: list[tuple[str, list, list]]) -> None:
    """Grouped bars, one group per x, each share with its 95% Wilson interval as a whisker."""
    width = 0.8 / len(series)
    for i, (name, values, counts) in enumerate(series):
        errors = _wilson_errors(values, counts)
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=name, yerr=errors, capsize=2, ecolor="0.3")


def quality_plot(stages: list[dict[str, Any]], path: Path) -> Path:
    """Leakage per erased concept and retain accuracy per judged stage (0..1, higher retain is better),
    whiskers the 95% Wilson intervals where the report has image counts."""
    plt = _pyplot()
    judged = [s for s in stages if s.get("retain_accuracy") is not None]
    labels = sorted({k for s in judged for k in (s.get("leakage") or {})})
    series = [
        (
            f"leakage {k}",
            [(s.get("leakage") or {}).get(k, np.nan) for s in judged],
            [(s.get("leakage_n") or {}).get(k) for s in judged],
        )
        for k in labels
    ]
    for k in labels:
        attacks = [(s.get("attack") or {}).get(k) or {} for s in judged]
        held = [a.get("heldout_leakage", np.nan) for a in attacks]
        if not np.isnan(held).all():
            series.append((f"leakage {k}, held-out phrasings", held, [a.get("heldout_leakage_n") for a in attacks]))
    series.append(("retain accuracy", [s["retain_accuracy"] for s in judged], [s.get("retain_n") for s in judged]))
    fig, ax = plt.subplots(figsize=(max(4, 1.5 * len(judged) + 2), 3.5))
    x = np.arange(len(judged))
    _bars(ax, x, series)
    ax.set_xticks(x, [s["name"] for s in judged])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of images (whisker: 95% interval)")
    ax.set_title("Leakage (erased, lower is better) and retain accuracy per stage")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def sample_grid(samples: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """One row per stage, one column per label: {"label", "erased", "prompt", "image" (H, W[, 3]) in [0, 1]}."""
    plt = _pyplot()
    stages = list(samples)
    columns = max(len(v) for v in samples.values())
    fig, axes = plt.subplots(len(stages), columns, figsize=(1.3 * columns + 1, 1.4 * len(stages) + 0.5), squeeze=False)
    for r, stage in enumerate(stages):
        for c in range(columns):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(samples[stage]):
                continue
            sample = samples[stage][c]
            image = np.clip(np.asarray(sample["image"], dtype=np.float32), 0, 1)
            ax.imshow(image.squeeze(), cmap="gray" if image.squeeze().ndim == 2 else None, vmin=0, vmax=1)
            mark = "erased " if sample["erased"] else ""
            ax.set_title(f"{mark}{sample['label']}", fontsize=7, color="tab:red" if sample["erased"] else "black")
        axes[r][0].text(-0.15, 0.5, stage, transform=axes[r][0].transAxes, ha="right", va="center", fontsize=8)
    fig.suptitle("Samples per stage (erased concepts in red)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def attack_plot(stages: list[dict[str, Any]], path: Path, title: str = "per stage") -> Path:
    """Per stage (or per method: any named rows) and erased concept: plain leakage beside the
    prefix-attack, soft-prompt-attack and concept-inversion success (transferred prompts on exported stages); the
    stage an attack ran on is in the label; whiskers the 95% Wilson intervals where counts exist."""
    plt = _pyplot()
    attacked = [s for s in stages if any("prompt_attack" in a for a in (s.get("attack") or {}).values())]
    labels = sorted({k for s in attacked for k, a in s["attack"].items() if "prompt_attack" in a})
    series = []
    for k in labels:
        leakage = [(s.get("leakage") or {}).get(k, np.nan) for s in attacked]
        series.append((f"leakage {k}", leakage, [(s.get("leakage_n") or {}).get(k) for s in attacked]))
        for key, name in (
            ("prompt_attack", "prefix attack"),
            ("soft_prompt_attack", "soft-prompt attack"),
            ("embedding_attack", "concept inversion"),
        ):
            figures = [s["attack"].get(k) or {} for s in attacked]
            values = [np.nan if a.get(key) is None else a[key] for a in figures]
            series.append((f"{name} {k}", values, [a.get(f"{key}_n") for a in figures]))
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(attacked) + 2), 3.5))
    x = np.arange(len(attacked))
    _bars(ax, x, series)
    names = []
    for s in attacked:
        on = {(a or {}).get("attacked_on") for a in s["attack"].values()} - {None, s["name"]}
        names.append(s["name"] + (f"\n(prompts from {', '.join(sorted(on))})" if on else ""))
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share judged as the concept (whisker: 95%)")
    ax.set_title(f"Leakage and attack success {title} (lower is better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(report: dict[str, Any], samples: dict[str, list[dict[str, Any]]], folder: Path) -> list[str]:
    """Every plot the report has data for, into `folder`; returns the file names written."""
    written = []
    if report.get("latency"):
        written.append(latency_plot(report["latency"], folder / LATENCY_PNG).name)
    if any(s.get("retain_accuracy") is not None for s in report.get("stages", [])):
        written.append(quality_plot(report["stages"], folder / QUALITY_PNG).name)
    if any("prompt_attack" in a for s in report.get("stages", []) for a in (s.get("attack") or {}).values()):
        written.append(attack_plot(report["stages"], folder / ATTACK_PNG).name)
    if samples:
        written.append(sample_grid(samples, folder / SAMPLES_PNG).name)
    return written
