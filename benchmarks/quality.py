"""Image-quality numbers that need no reference model: judge-feature FID and copy detection.

FID here is the Fréchet distance between Gaussians fitted to a judge's features (for the digits
world: 20 principal components of real 8x8 digits) of generated and of real images; it says
whether the generated distribution looks like the real one, on the judge's terms. The
nearest-neighbour check says whether samples are new drawings rather than copies of training
images. numpy and scipy only; heavy libraries stay out of import time.
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) for Gaussians (mu (D,), sigma (D, D))."""
    from scipy import linalg

    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # Near-singular covariances (few samples): regularise as the reference FID code does.
        offset = np.eye(len(mu1)) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def feature_fid(features: np.ndarray, real_features: np.ndarray) -> float:
    """FID between two feature sets (N, D) and (M, D); needs at least 2 rows each."""
    if len(features) < 2 or len(real_features) < 2:
        raise ValueError(f"FID needs at least 2 images per side, got {len(features)} and {len(real_features)}")
    f, r = np.asarray(features, np.float64), np.asarray(real_features, np.float64)
    return frechet_distance(f.mean(0), np.cov(f, rowvar=False), r.mean(0), np.cov(r, rowvar=False))


def judge_fid(images: np.ndarray, real_images: np.ndarray, judge) -> float:
    """FID of `images` against `real_images` in `judge.features` space.

    images, real_images: (N, H, W) or (N, H, W, C) floats in [0, 1], any size the judge takes.
    With few images (tens) the number is biased upwards; compare FIDs at equal N.
    """
    return feature_fid(judge.features(images), judge.features(real_images))


def nearest_neighbour_distances(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(N,) Euclidean distance from each image to its nearest reference image.

    images (N, D...) and reference (M, D...) are flattened; pass both at the same size and
    value range (e.g. 8x8 in [0, 1]). A generator that copies its training set has distances
    near 0, far below those of unseen real images to the same training set.
    """
    a = np.asarray(images, np.float64).reshape(len(images), -1)
    b = np.asarray(reference, np.float64).reshape(len(reference), -1)
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(d2.min(axis=1), 0.0))
