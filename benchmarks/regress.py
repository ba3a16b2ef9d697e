"""Regression gate: compare a run's report.json with a committed baseline.

    regressions = compare(report, baseline, Tolerances(speedup_ratio=1.5))
    # `compress bench runs/ci --baseline benchmarks/results/baseline-default.json` exits 1 on any

Checked, each row keyed so the same measurement is compared (stage / runtime / profile /
component / batch / method): the deliverable's speed-up over the source (ratio; absolute latency
median_ms only with `absolute_latency`, as a ratio with an absolute allowance for sub-millisecond
rows), peak RSS (ratio), per stage (the exported,
quantized and ORT models' rows too) leakage per erased concept, held-out leakage and attack
success (+points), retain accuracy (-points), judge FID (+absolute), size (+percent), and export
parity (max_abs_err against the row's own tolerance).

The gate fails closed: a metric the baseline has and the report lacks, or reports as null
(unjudged) or NaN, fails with the metric named, so an empty or half-measured report cannot pass;
`allow_missing` (`--allow-missing KEY`) lets an intended schema change through. Reports that
erase different concepts are not comparable and fail too.

Shares are counted in images, so a points tolerance finer than one image cannot be resolved: it
would silently mean "no change at all". With n the baseline's image count (`leakage_n`,
`retain_n`, `<attack>_n`), an explicit leakage_points / retain_points below 100/n is refused
(ConfigError, exit 2); the defaults are 2 / 3 points or one image, whichever is larger. A report
that judged fewer images than its baseline (or gives no count where the baseline does) fails
(`FEWER IMAGES`): a smaller sample would otherwise widen its own gate.
Speed is gated as the deliverable's speed-up over the source (`side_by_side` rows: both models
timed in turns in one run, benchmarks/side_by_side.py): each speed-up >= the baseline's /
`speedup_ratio` (an `info` row where the baseline's deliverable ran under `latency_ms`, 1 ms:
there the ratio is timer noise). A ratio measured within one run holds on a shared machine where absolute times do
not: the same digits UNet forward took 28 ms one day and 37-72 ms within minutes another, and a CI
run measured the source UNet 1.4x slower while a fixed CPU probe ran 10% faster. So absolute
latencies are shown as `info` rows (a missing or NaN one still fails); `absolute_latency=True`
(`--absolute-latency`, for a quiet, dedicated machine) gates them too, each limit scaled for CPU
rows by the ratio of the two runs' `machine.speed_probe_ms` (a fixed CPU workload timed around the
latency rows) where both carry one.
Latency and speed-ups are compared only when both reports come from the same machine (CPU model
and core count in `report["machine"]`); on another machine their rows say "other machine" and do
not fail, since a ratio to another computer's speed measures the computer, not the change.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from toolchain.config import ConfigError


@dataclass(frozen=True)
class Tolerances:
    """How much worse than the baseline a report may be; `--tolerance key=value` overrides."""

    latency_ratio: float = 1.5  # current median_ms <= baseline x this ...
    latency_ms: float = 1.0  # ... or <= baseline + this: sub-millisecond rows are timer and scheduler noise
    # (and speed-ups of components whose baseline deliverable ran under this are shown, not gated)
    memory_ratio: float = 1.5  # current peak_rss_bytes <= baseline x this
    leakage_points: float | None = None  # leakage, held-out leakage, attack success (points) <= baseline + this
    retain_points: float | None = None  # retain accuracy (points) >= baseline - this; unset: DEFAULT_POINTS
    fid_increase: float = 0.25  # judge FID <= baseline + this (absolute)
    size_percent: float = 5.0  # size_bytes <= baseline x (1 + this / 100)
    parity_ratio: float = 1.0  # max_abs_err <= the row's tolerance x this
    speedup_ratio: float = 1.3  # side-by-side speed-up >= baseline / this

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


# leakage_points / retain_points left unset: these points, or one image where the sample is smaller
DEFAULT_POINTS = {"leakage_points": 2.0, "retain_points": 3.0}
PASSING = ("ok", "other machine", "missing (allowed)", "info")
SPEED_PROBE = "speed_probe_ms"


@dataclass(frozen=True)
class Regression:
    """One compared metric; `failed` marks a regression (the row is also printed when it passed)."""

    metric: str
    baseline: float | None
    current: float | None
    limit: float | None
    verdict: str  # "ok", "REGRESSION", "MISSING", "NaN", "BASELINE NaN", "NO LIMIT", "DIFFERS", or a PASSING one
    # ("info": a figure shown for the reader, compared with nothing)

    @property
    def failed(self) -> bool:
        return self.verdict not in PASSING


def _key(row: dict[str, Any], fields: tuple[str, ...]) -> str:
    return "/".join(str(row[f]) for f in fields if row.get(f) is not None)


_LATENCY_KEY = ("runtime", "profile", "stage", "component", "batch", "method", "steps")
_MEMORY_KEY = ("runtime", "profile", "stage", "component")
_SIDE_KEY = ("component", "batch", "method")
_PARITY_KEY = ("component", "format", "reference")
# report.json `attack.<label>` figures that are shares of images judged as the concept
ATTACK_SHARES = ("heldout_leakage", "plain", "prompt_attack", "soft_prompt_attack", "embedding_attack")


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _check(metric: str, baseline: float | None, current: float | None, limit: float | None, upper: bool) -> Regression:
    """Fail closed: an absent, null (unjudged) or NaN figure, or one without a limit, is a failure."""
    if _is_nan(baseline):
        return Regression(metric, baseline, current, limit, "BASELINE NaN")
    if current is None:
        return Regression(metric, baseline, None, limit, "MISSING")
    if _is_nan(current):
        return Regression(metric, baseline, current, limit, "NaN")
    if limit is None:
        return Regression(metric, baseline, current, None, "NO LIMIT")
    worse = current > limit if upper else current < limit
    return Regression(metric, baseline, current, limit, "REGRESSION" if worse else "ok")


def _share_check(metric: str, base: float, now: float | None, counts: tuple, tol: Tolerances, name: str, more: str):
    """A share of images against the baseline, with the tolerance `name` resolved at the baseline's
    image count (`counts` = (baseline n, report n); None where a report predates the counts). A
    report that judged fewer images than its baseline fails: fewer images would widen the gate."""
    base_n, now_n = (int(c) if c else None for c in counts)
    if base_n and now is not None and not (now_n and now_n >= base_n):
        return Regression(metric, base, now, None, f"FEWER IMAGES ({now_n or 'no count'} < {base_n})")
    n = base_n or now_n
    one_image = 100 / n if n else 0.0
    points = getattr(tol, name)
    if points is None:
        points = max(DEFAULT_POINTS[name], one_image)
    elif points < one_image - 1e-9:
        least = math.ceil(round(one_image * 10, 6)) / 10
        raise ConfigError(
            f"{name}={points:g} is below one image ({one_image:.1f} points at {n} images, {metric}): "
            f"raise it to at least {least:g} or evaluate more images ({more})"
        )
    slack = 1e-9  # one image exactly at the limit passes despite float rounding
    upper = name == "leakage_points"
    limit = base + points / 100 + slack if upper else base - points / 100 - slack
    return _check(metric, base, now, limit, upper)


def _stage_rows(name: str, base: dict[str, Any], now: dict[str, Any], tol: Tolerances) -> list[Regression]:
    """Every gated figure of one stage entry (source, prune, finetune, export, quantize, ort...)."""
    rows: list[Regression] = []
    if base.get("size_bytes"):
        b = base["size_bytes"]
        rows.append(_check(f"size_bytes {name}", b, now.get("size_bytes"), b * (1 + tol.size_percent / 100), True))
    eval_more = "benchmark.eval_images_per_prompt"
    for label, b in (base.get("leakage") or {}).items():
        if b is None:
            continue
        c = (now.get("leakage") or {}).get(label)
        counts = ((base.get("leakage_n") or {}).get(label), (now.get("leakage_n") or {}).get(label))
        rows.append(_share_check(f"leakage {name}/{label}", b, c, counts, tol, "leakage_points", eval_more))
    for label, attacks in (base.get("attack") or {}).items():
        current = (now.get("attack") or {}).get(label) or {}
        for kind, b in attacks.items():  # shares like leakage; wall_s, budgets and prompts are not gated
            if kind in ATTACK_SHARES and isinstance(b, float | int) and not isinstance(b, bool):
                more = eval_more if kind == "heldout_leakage" else "attack.images_per_prompt"
                counts = (attacks.get(f"{kind}_n"), current.get(f"{kind}_n"))
                rows.append(
                    _share_check(f"{kind} {name}/{label}", b, current.get(kind), counts, tol, "leakage_points", more)
                )
    if base.get("retain_accuracy") is not None:
        counts = (base.get("retain_n"), now.get("retain_n"))
        metric = f"retain_accuracy {name}"
        rows.append(
            _share_check(
                metric, base["retain_accuracy"], now.get("retain_accuracy"), counts, tol, "retain_points", eval_more
            )
        )
    if base.get("fid") is not None:
        rows.append(_check(f"fid {name}", base["fid"], now.get("fid"), base["fid"] + tol.fid_increase, True))
    return rows


def _allowed(metric: str, keys: tuple[str, ...]) -> bool:
    """KEY names a metric exactly, its kind (`fid`, `leakage`, `latency`...) or a glob (`leakage quantize/*`)."""
    return any(metric == k or metric.startswith(k + " ") or fnmatchcase(metric, k) for k in keys)


def check_all(
    report: dict[str, Any],
    baseline: dict[str, Any],
    tol: Tolerances,
    allow_missing: tuple[str, ...] = (),
    absolute_latency: bool = False,
) -> list[Regression]:
    """Every comparison, passed or not, in report order; raises ConfigError for a tolerance finer
    than one image of the samples compared. `allow_missing`: metrics (see `_allowed`) whose absence
    from the report is intended; `absolute_latency`: gate absolute latencies too (else `info`)."""
    rows: list[Regression] = []
    erase_now, erase_base = (r.get("model", {}).get("erase") for r in (report, baseline))
    if erase_base is not None and sorted(erase_now or []) != sorted(erase_base):
        rows.append(Regression("model erase", ",".join(erase_base), ",".join(erase_now or []), None, "DIFFERS"))
    current_stages = {s["name"]: s for s in report.get("stages", [])}
    for base in baseline.get("stages", []):
        rows += _stage_rows(base["name"], base, current_stages.get(base["name"], {}), tol)
    same_machine = _machine(report) == _machine(baseline)
    rows += _speedup_rows(report, baseline, tol, same_machine)
    rows += _latency_rows(report, baseline, tol, same_machine, absolute_latency)
    current = {_key(r, _MEMORY_KEY): r for r in report.get("memory", [])}
    for base in baseline.get("memory", []):
        key, b = _key(base, _MEMORY_KEY), base.get("peak_rss_bytes")
        if b is not None:
            c = current.get(key, {}).get("peak_rss_bytes")
            rows.append(_check(f"memory {key}", b, c, b * tol.memory_ratio, True))
    current = {_key(r, _PARITY_KEY): r for r in report.get("parity", [])}
    for base in baseline.get("parity", []):
        key = _key(base, _PARITY_KEY)
        now = current.get(key, {})
        tolerance = now.get("tolerance", base.get("tolerance"))
        limit = None if tolerance is None else tolerance * tol.parity_ratio
        rows.append(_check(f"parity {key} max_abs_err", base.get("max_abs_err"), now.get("max_abs_err"), limit, True))
    return [
        dataclasses.replace(r, verdict="missing (allowed)")
        if r.verdict == "MISSING" and _allowed(r.metric, allow_missing)
        else r
        for r in rows
    ]


def _unmeasured(metric: str, b: float, c: Any, same_machine: bool) -> Regression | None:
    """The row of a figure not compared: missing or NaN (fails), or from another machine (passes)."""
    if c is None or _is_nan(c):
        return _check(metric, b, c, None, True)
    return None if same_machine else Regression(metric, b, c, None, "other machine")


def _speedup_rows(report, baseline, tol: Tolerances, same_machine: bool) -> list[Regression]:
    """The deliverable's speed-up over the source, per component and per image: >= baseline / speedup_ratio."""
    side_base, side_now = (r.get("side_by_side") or {} for r in (baseline, report))
    runtime = side_base.get("runtime")
    current = {_key(r, _SIDE_KEY): r for r in side_now.get("rows", []) if side_now.get("runtime") == runtime}
    rows = []
    for base in side_base.get("rows", []):
        key, b = _key(base, _SIDE_KEY), base.get("speedup")
        if b is None:
            continue
        metric, c = f"speedup {runtime}/{key}", current.get(key, {}).get("speedup")
        row = _unmeasured(metric, b, c, same_machine)
        if row is None and base.get("deliverable_ms", 0) < tol.latency_ms:  # a ratio of timer noise
            row = Regression(metric, b, c, None, "info")
        rows.append(row or _check(metric, b, c, b / tol.speedup_ratio, False))
    return rows


def _latency_rows(report, baseline, tol: Tolerances, same_machine: bool, absolute: bool) -> list[Regression]:
    """Absolute latencies: `info` unless `absolute`; then limits scaled by the machines' speed probes."""
    speed = _speed_ratio(report, baseline) if absolute else 1.0
    rows = []
    if speed != 1.0:
        probes = [r["machine"][SPEED_PROBE] for r in (baseline, report)]
        rows.append(Regression(f"machine {SPEED_PROBE} (CPU latency limits x{speed:.2f})", *probes, None, "info"))
    current = {_key(r, _LATENCY_KEY): r for r in report.get("latency", [])}
    for base in baseline.get("latency", []):
        key, b = _key(base, _LATENCY_KEY), base.get("median_ms")
        if b is None:
            continue
        metric, c = f"latency {key}", current.get(key, {}).get("median_ms")
        row = _unmeasured(metric, b, c, same_machine or not absolute)
        if row is None and not absolute:
            row = Regression(metric, b, c, None, "info")
        if row is None:
            scale = speed if _on_cpu(base) else 1.0
            row = _check(metric, b, c, max(b * scale * tol.latency_ratio, b * scale + tol.latency_ms), True)
        rows.append(row)
    return rows


def _machine(report: dict[str, Any]) -> dict[str, Any]:
    """The machine's identity: everything in `report["machine"]` but its measured speed."""
    return {k: v for k, v in report.get("machine", {}).items() if k != SPEED_PROBE}


def _speed_ratio(report: dict[str, Any], baseline: dict[str, Any]) -> float:
    """How much slower this run's machine ran the speed probe than the baseline's; 1.0 (limits
    unscaled) unless both probes are finite positive numbers."""
    now, base = (r.get("machine", {}).get(SPEED_PROBE) for r in (report, baseline))
    usable = all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in (now, base)
    )
    return now / base if usable else 1.0


def _on_cpu(row: dict[str, Any]) -> bool:
    """A latency row measured on the CPU (torch `cpu`, ONNX Runtime's CPUExecutionProvider...)."""
    return "cpu" in str(row.get("provider", "")).lower()


def compare(
    report: dict[str, Any],
    baseline: dict[str, Any],
    tolerances: Tolerances | None = None,
    allow_missing: tuple[str, ...] = (),
    absolute_latency: bool = False,
) -> list[Regression]:
    """The regressions of `report` against `baseline` (empty: the gate passes)."""
    rows = check_all(report, baseline, tolerances or Tolerances(), allow_missing, absolute_latency)
    return [r for r in rows if r.failed]


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
