"""The digits judge: which digit an image shows, fitted only on real digits the generator never saw.

An RBF support-vector classifier on 8x8 pixels, refitted at load (about half a second) from the
data that ships inside scikit-learn, so nothing is pickled and the judge is identical on every
machine. Images of any size reach it through `digits.downsample` (area averaging to 8x8); it is
fitted on the real 8x8 digits, on the same digits sent through upsample -> downsample (the path
generated 16x16 images take) and on half-pixel shifts of those, so the generator's slightly
blurred, slightly off-centre drawings are judged like real ones.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np

from benchmarks.testbed import digits

logger = logging.getLogger(__name__)

SVC_C = 5.0
SVC_GAMMA = 0.05
N_FEATURES = 20  # principal components of the judge-fit digits: the feature space of judge FID
SOFTMAX_SCALE = 4.0


@dataclass(frozen=True)
class Judgement:
    """labels (N,) of class names ("0".."9"); probs (N, 10), rows sum to 1, columns = classes."""

    labels: np.ndarray
    probs: np.ndarray


class DigitsJudge:
    """Classifies digit images. images: (N, H, W) or (N, H, W, C) floats in [0, 1], any size."""

    name = "digits"
    classes: tuple[str, ...] = digits.LABELS

    def __init__(self, classifier, projection_mean: np.ndarray, projection: np.ndarray):
        self._classifier = classifier
        self._mean = projection_mean
        self._projection = projection  # (64, N_FEATURES)

    @staticmethod
    def to_vectors(images: np.ndarray) -> np.ndarray:
        """(N, H, W[, C]) in [0, 1] -> (N, 64): the judge's input, grey 8x8."""
        x = np.asarray(images, dtype=np.float32)
        if x.ndim not in (3, 4):
            raise ValueError(f"judge expects images (N, H, W) or (N, H, W, C), got shape {x.shape}")
        if x.size and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
            raise ValueError(
                f"judge expects floats in [0, 1], got range [{x.min():.3f}, {x.max():.3f}]; "
                "pass images as a pipeline returns them with output_type='np'"
            )
        small = digits.downsample(x)
        return small.reshape(len(small), -1)

    def classify(self, images: np.ndarray) -> Judgement:
        """Labels and class scores (softmax of one-vs-rest decision values; argmax = label)."""
        vectors = self.to_vectors(images)
        if len(vectors) == 0:
            return Judgement(np.array([], dtype="<U1"), np.zeros((0, len(self.classes))))
        scores = self._classifier.decision_function(vectors) * SOFTMAX_SCALE
        scores -= scores.max(axis=1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=1, keepdims=True)
        labels = np.asarray(self.classes)[probs.argmax(axis=1)]
        return Judgement(labels, probs)

    def features(self, images: np.ndarray) -> np.ndarray:
        """(N, N_FEATURES): projection on the principal components of real digits (for FID)."""
        return (self.to_vectors(images) - self._mean) @ self._projection

    def reference_images(self, labels=None, size: int = 8) -> np.ndarray:
        """(M, size, size) real held-out digits (never seen by the generator) of `labels`
        (default all): the real side of judge FID. Pass the generated images' size so real
        digits take the same upsample -> downsample path (the blur of that path alone moves
        FID far more than the real-vs-real sampling noise)."""
        split = digits.load_split()
        keep = np.ones(len(split.heldout_labels), bool)
        if labels is not None:
            keep = np.isin(split.heldout_labels.astype(str), [str(label) for label in labels])
        images = split.heldout_images[keep]
        return images if size == 8 else digits.upsample(images, size)

    def accuracy(self, images: np.ndarray, labels) -> float:
        """Share of images judged as their label (labels: ints or class names)."""
        truth = np.asarray([str(label) for label in labels])
        return float((self.classify(images).labels == truth).mean())


def _training_views(images: np.ndarray) -> list[np.ndarray]:
    """(N, 8, 8) -> views the judge learns from: as is, via 16x16, and half-pixel shifts."""
    up = digits.upsample(images)
    views = [images, digits.downsample(up)]
    for shift in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        views.append(digits.downsample(np.roll(up, shift, axis=(1, 2))))
    return views


@functools.lru_cache(maxsize=1)
def load_judge() -> DigitsJudge:
    """Fit the judge on the judge-fit part of the held-out digits (deterministic, ~0.5 s)."""
    from sklearn.svm import SVC

    split = digits.load_split()
    views = _training_views(split.judge_fit_images)
    x = np.concatenate([v.reshape(len(v), -1) for v in views])
    y = np.tile(split.judge_fit_labels, len(views))
    classifier = SVC(C=SVC_C, gamma=SVC_GAMMA, decision_function_shape="ovr").fit(x, y)
    real = split.judge_fit_images.reshape(len(split.judge_fit_images), -1).astype(np.float64)
    mean = real.mean(axis=0)
    _, _, vt = np.linalg.svd(real - mean, full_matrices=False)
    return DigitsJudge(classifier, mean.astype(np.float32), vt[:N_FEATURES].T.astype(np.float32))


def judge_report() -> dict[str, float]:
    """The judge's accuracy on real digits it was not fitted on, directly and via 16x16."""
    judge = load_judge()
    split = digits.load_split()
    via16 = lambda im: digits.downsample(digits.upsample(im))  # noqa: E731
    return {
        "judge_eval_accuracy": judge.accuracy(split.judge_eval_images, split.judge_eval_labels),
        "judge_eval_accuracy_via_16x16": judge.accuracy(via16(split.judge_eval_images), split.judge_eval_labels),
        "generator_split_accuracy_via_16x16": judge.accuracy(via16(split.generator_images), split.generator_labels),
        "n_judge_fit": int(len(split.judge_fit_images)),
        "n_judge_eval": int(len(split.judge_eval_images)),
    }
