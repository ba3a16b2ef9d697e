"""What every backend's sampler returns: a `Generator`, `generate(prompts, seed) -> images`
(N, H, W, C) floats in [0, 1], one image per prompt; and the sampling defaults."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Generator = Callable[[list[str], int], np.ndarray]
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE_SCALE = 5.0  # the digits-world recipe value; see toolchain/assets/digits-sd/README.md
