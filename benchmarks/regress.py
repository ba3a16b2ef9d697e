"""Regression gate: compare a run's report.json with a committed baseline.

    regressions = compare(report, baseline, Tolerances(latency_ratio=2.0))
    # `compress bench runs/ci --baseline benchmarks/results/baseline-default.json` exits 1 on any

Checked, each row keyed so the same measurement is compared (stage / runtime / profile /
component / batch / method): latency median_ms (ratio, with an absolute allowance for
sub-millisecond rows: CI machines are noisy), peak RSS (ratio),
leakage per erased concept (+points), retain accuracy (-points), judge FID (+absolute), size
(+percent) and export parity (max_abs_err against the row's own tolerance). A metric the
baseline has and the report lacks is listed as "missing" but does not fail: targets and profiles
differ between runs; a gate that needs it should run the same command as the baseline.
Latency is compared only when both reports come from the same machine (CPU model and core count
in `report["machine"]`); on another machine its rows say "other machine" and do not fail, since a
ratio to another computer's speed measures the computer, not the change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from toolchain.config import ConfigError


@dataclass(frozen=True)
class Tolerances:
    """How much worse than the baseline a report may be; `--tolerance key=value` overrides."""

    latency_ratio: float = 1.5  # current median_ms <= baseline x this ...
    latency_ms: float = 1.0  # ... or <= baseline + this: sub-millisecond rows are timer and scheduler noise
    memory_ratio: float = 1.5  # current peak_rss_bytes <= baseline x this
    leakage_points: float = 2.0  # leakage and attack success (percent points) <= baseline + this
    retain_points: float = 3.0  # retain accuracy (percent points) >= baseline - this
    fid_increase: float = 0.25  # judge FID <= baseline + this (absolute)
    size_percent: float = 5.0  # size_bytes <= baseline x (1 + this / 100)
    parity_ratio: float = 1.0  # max_abs_err <= the row's tolerance x this

    @classmethod
    def from_overrides(cls, overrides: list[str]) -> Tolerances:
        names = [f.name for f in dataclasses.fields(cls)]
        values = {}
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or key not in names:
                raise ConfigError(f"--tolerance {item!r}: use key=value with key one of {', '.join(names)}")
            try:
                values[key] = float(value)
            except ValueError:
                raise ConfigError(f"--tolerance {item!r}: {value!r} is not a number") from None
            if values[key] < 0:
                raise ConfigError(f"--tolerance {item!r}: must be >= 0")
        return cls(**values)


@dataclass(frozen=True)
class Regression:
    """One compared metric; `failed` marks a regression (the row is also printed when it passed)."""

    metric: str
    baseline: float | None
    current: float | None
    limit: float | None
    verdict: str  # "ok", "REGRESSION", "missing", "other machine"

    @property
    def failed(self) -> bool:
        return self.verdict == "REGRESSION"


def _key(row: dict[str, Any], fields: tuple[str, ...]) -> str:
    return "/".join(str(row[f]) for f in fields if row.get(f) is not None)


_LATENCY_KEY = ("runtime", "profile", "stage", "component", "batch", "method", "steps")
_MEMORY_KEY = ("runtime", "profile", "stage", "component")
_PARITY_KEY = ("component", "format", "reference")
# report.json `attack.<label>` figures that are shares of images judged as the concept
ATTACK_SHARES = ("heldout_leakage", "plain", "prompt_attack", "soft_prompt_attack", "embedding_attack")


def _check(metric: str, baseline: float | None, current: float | None, limit: float | None, upper: bool) -> Regression:
    if current is None:
        return Regression(metric, baseline, None, limit, "missing")
    if limit is None:
        return Regression(metric, baseline, current, None, "ok")
    worse = current > limit if upper else current < limit
    return Regression(metric, baseline, current, limit, "REGRESSION" if worse else "ok")


def check_all(report: dict[str, Any], baseline: dict[str, Any], tol: Tolerances) -> list[Regression]:
    """Every comparison, passed or not, in report order."""
    rows: list[Regression] = []
    current_stages = {s["name"]: s for s in report.get("stages", [])}
    for base in baseline.get("stages", []):
        name, now = base["name"], current_stages.get(base["name"], {})
        if base.get("size_bytes"):
            b = base["size_bytes"]
            rows.append(_check(f"size_bytes {name}", b, now.get("size_bytes"), b * (1 + tol.size_percent / 100), True))
        for label, b in (base.get("leakage") or {}).items():
            c = (now.get("leakage") or {}).get(label)
            rows.append(_check(f"leakage {name}/{label}", b, c, b + tol.leakage_points / 100, True))
        for label, attacks in (base.get("attack") or {}).items():
            for kind, b in attacks.items():  # shares like leakage; wall_s, budgets and prompts are not gated
                c = ((now.get("attack") or {}).get(label) or {}).get(kind)
                if kind in ATTACK_SHARES and isinstance(b, float | int) and not isinstance(b, bool):
                    rows.append(_check(f"{kind} {name}/{label}", b, c, b + tol.leakage_points / 100, True))
        if base.get("retain_accuracy") is not None:
            b = base["retain_accuracy"]
            rows.append(
                _check(f"retain_accuracy {name}", b, now.get("retain_accuracy"), b - tol.retain_points / 100, False)
            )
        if base.get("fid") is not None:
            rows.append(_check(f"fid {name}", base["fid"], now.get("fid"), base["fid"] + tol.fid_increase, True))
    same_machine = report.get("machine") == baseline.get("machine")
    for section, keys, field, ratio in (
        ("latency", _LATENCY_KEY, "median_ms", tol.latency_ratio),
        ("memory", _MEMORY_KEY, "peak_rss_bytes", tol.memory_ratio),
    ):
        current = {_key(r, keys): r for r in report.get(section, [])}
        for base in baseline.get(section, []):
            key = _key(base, keys)
            b, c = base.get(field), current.get(key, {}).get(field)
            if b is None:
                continue
            if section == "latency" and not same_machine:
                rows.append(Regression(f"{section} {key}", b, c, None, "other machine"))
            else:
                limit = max(b * ratio, b + tol.latency_ms) if section == "latency" else b * ratio
                rows.append(_check(f"{section} {key}", b, c, limit, True))
    current = {_key(r, _PARITY_KEY): r for r in report.get("parity", [])}
    for base in baseline.get("parity", []):
        key = _key(base, _PARITY_KEY)
        now = current.get(key, {})
        tolerance = now.get("tolerance", base.get("tolerance"))
        limit = None if tolerance is None else tolerance * tol.parity_ratio
        rows.append(_check(f"parity {key} max_abs_err", base.get("max_abs_err"), now.get("max_abs_err"), limit, True))
    return rows


def compare(report: dict[str, Any], baseline: dict[str, Any], tolerances: Tolerances | None = None) -> list[Regression]:
    """The regressions of `report` against `baseline` (empty: the gate passes)."""
    return [r for r in check_all(report, baseline, tolerances or Tolerances()) if r.failed]


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_table(rows: list[Regression]) -> str:
    """A plain-text table: metric | baseline | current | limit | verdict."""
    cells = [("metric", "baseline", "current", "limit", "verdict")]
    cells += [(r.metric, _fmt(r.baseline), _fmt(r.current), _fmt(r.limit), r.verdict) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
