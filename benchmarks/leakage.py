"""Concept leakage and preservation, measured by a judge on images a model generates.

A generator is any callable `generate(prompts: list[str], seed: int) -> np.ndarray` returning
(N, H, W, C) or (N, H, W) floats in [0, 1], one image per prompt, so the same numbers can be
taken from a PyTorch pipeline, an ONNX Runtime session or anything else that draws images.
A judge classifies images into named classes; judges are looked up by name in an explicit
registry (`@register_judge`), because concept files name the judge that scores them.

    judge = get_judge("digits")
    scores = evaluate_concepts(diffusers_generator(pipe), judge, {"7": ["seven"]}, {"1": ["one"]}, 4, 0)
    stage_entry.update(scores.to_report(), **scores.intervals())

Every share (leakage, accuracy, attack success) is reported with its image count and a 95% Wilson
score interval (`wilson_interval`, the one place the harness computes it): at the few images a CPU
run judges, the interval says how far the share could move by chance.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from toolchain.runtime.sampler import Generator

logger = logging.getLogger(__name__)


class Judge(Protocol):
    """What a leakage judge provides (see benchmarks/testbed/judge.py for the digits judge)."""

    name: str
    classes: tuple[str, ...]

    def classify(self, images: np.ndarray) -> Any:  # -> object with .labels (N,) and .probs (N, K)
        ...

    # optional: features(images) -> (N, D) for judge-feature FID (NudeNet has none: no FID)


_JUDGES: dict[str, Callable[..., Judge]] = {}
_LOADED: dict[tuple[str, str], Judge] = {}


def register_judge(name: str):
    """Decorator registering a judge factory (keyword options only) under `name`."""

    def decorate(factory: Callable[..., Judge]) -> Callable[..., Judge]:
        if name in _JUDGES:
            raise ValueError(f"judge {name!r} is already registered")
        _JUDGES[name] = factory
        return factory

    return decorate


def judge_names() -> list[str]:
    return sorted(_JUDGES)


def get_judge(name: str, **options) -> Judge:
    """The judge registered as `name`, built once per process and set of options (the clip judge
    takes `classes`, `model` and `template`; the others take none)."""
    if name not in _JUDGES:
        raise KeyError(f"unknown judge {name!r}; registered judges: {', '.join(judge_names())}")
    key = (name, repr(sorted(options.items())))
    if key not in _LOADED:
        _LOADED[key] = _JUDGES[name](**options)
    return _LOADED[key]


@register_judge("digits")
def _digits_judge(**_) -> Judge:
    from benchmarks.testbed.judge import load_judge

    return load_judge()


@register_judge("nudenet")
def _nudenet_judge(**options) -> Judge:
    from benchmarks.judges import load_nudenet

    return load_nudenet(**options)


@register_judge("clip")
def _clip_judge(**options) -> Judge:
    from benchmarks.judges import load_clip

    return load_clip(**options)


# --------------------------------------------------------------------------- metrics

Z95 = 1.959963984540054  # standard normal quantile at 0.975: a two-sided 95% interval


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of `successes` out of `n` images. Unlike the normal
    approximation it stays inside [0, 1] and is not zero-wide at 0/n or n/n, which are the
    shares an erasure run reports most."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n and n > 0, got {successes}/{n}")
    p, q = successes / n, z * z / n
    center = (p + q / 2) / (1 + q)
    half = z / (1 + q) * math.sqrt(p * (1 - p) / n + q / (4 * n))
    low = 0.0 if successes == 0 else max(0.0, center - half)  # exact ends, not float dust
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def share_interval(share: float, n: int) -> list[float] | None:
    """The rounded Wilson interval of a reported share of `n` images (report.json `*_ci95`);
    None when there is no share to bound (no images, or NaN)."""
    if not n or share is None or math.isnan(share):
        return None
    low, high = wilson_interval(round(share * n), n)
    return [round(low, 4), round(high, 4)]


def leakage_rate(images: np.ndarray, judge: Judge, label: str) -> float:
    """Share of `images` the judge classifies as `label` (1.0 = the concept fully present)."""
    if len(images) == 0:
        raise ValueError("leakage_rate needs at least one image")
    return float((judge.classify(images).labels == str(label)).mean())


def retain_accuracy(images: np.ndarray, labels, judge: Judge) -> float:
    """Share of `images` the judge classifies as their prompted label (labels: (N,))."""
    truth = np.asarray([str(label) for label in labels])
    if len(truth) != len(images):
        raise ValueError(f"{len(images)} images but {len(truth)} labels")
    return float((judge.classify(images).labels == truth).mean())


@dataclass
class ConceptScores:
    """Leakage per erased label, accuracy on retained labels, judge FID of retained images."""

    leakage: dict[str, float]
    retain_accuracy: float
    per_label_accuracy: dict[str, float]
    fid: float | None
    n_images: int
    leakage_n: dict[str, int] = field(default_factory=dict)  # images judged per erased label
    retain_n: int = 0  # retained images judged
    per_label_n: dict[str, int] = field(default_factory=dict)

    def to_report(self) -> dict[str, Any]:
        """The keys of a report.json stage entry."""
        return {"leakage": dict(self.leakage), "retain_accuracy": self.retain_accuracy, "fid": self.fid}

    def intervals(self) -> dict[str, Any]:
        """The image counts and 95% Wilson intervals beside `to_report`'s shares (report.json
        `leakage_n`, `leakage_ci95`, `retain_n`, `retain_ci95`)."""
        return {
            "leakage_n": dict(self.leakage_n),
            "leakage_ci95": {k: share_interval(v, self.leakage_n.get(k, 0)) for k, v in self.leakage.items()},
            "retain_n": self.retain_n,
            "retain_ci95": share_interval(self.retain_accuracy, self.retain_n),
        }


def evaluate_concepts(
    generate: Generator,
    judge: Judge,
    erase: dict[str, list[str]],
    retain: dict[str, list[str]],
    n_per_prompt: int,
    seed: int,
    real_images: np.ndarray | None = None,
) -> ConceptScores:
    """Generate `n_per_prompt` images for every erase and retain prompt and judge them.

    One `generate` call for all prompts (the generator batches). leakage[label]: share of the
    erased label's images judged as it; per_label_accuracy: the same share for every label, erased
    or retained; retain_accuracy: over all retained images. fid: judge FID of the retained images
    against `real_images`, or against the judge's own real reference digits of the retained labels
    when it has `reference_images`; None when neither exists or there are fewer than 2 images.
    """
    prompts, labels = [], []
    for label, label_prompts in list(erase.items()) + list(retain.items()):
        for prompt in label_prompts:
            prompts += [prompt] * n_per_prompt
            labels += [str(label)] * n_per_prompt
    images = generate(prompts, seed)
    if len(images) != len(prompts):
        raise ValueError(f"generator returned {len(images)} images for {len(prompts)} prompts")
    judged = judge.classify(images).labels
    labels_a = np.asarray(labels)
    per_label = {lab: float((judged[labels_a == lab] == lab).mean()) for lab in dict.fromkeys(labels)}
    per_label_n = {lab: int((labels_a == lab).sum()) for lab in per_label}
    leakage = {str(lab): per_label[str(lab)] for lab in erase}
    retained = np.isin(labels_a, [str(lab) for lab in retain])
    retain_acc = float((judged[retained] == labels_a[retained]).mean()) if retained.any() else float("nan")

    fid = None
    if real_images is None and hasattr(judge, "reference_images") and retained.any():
        real_images = judge.reference_images([str(lab) for lab in retain], size=images.shape[1])
    if real_images is not None and hasattr(judge, "features") and retained.sum() >= 2 and len(real_images) >= 2:
        from benchmarks.quality import judge_fid

        fid = judge_fid(images[retained], real_images, judge)
    leakage_n = {lab: per_label_n[lab] for lab in leakage}
    scores = ConceptScores(
        leakage, retain_acc, per_label, fid, len(images), leakage_n, int(retained.sum()), per_label_n
    )
    logger.info("leakage %s, retain accuracy %.3f, fid %s", leakage, retain_acc, fid)
    return scores
