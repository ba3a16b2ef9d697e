"""The digits world's data: scikit-learn's handwritten digits, their fixed splits, and prompts.

Everything here is deterministic and offline. Real digits are 8x8 in [0, 16]; the generator works
at 16x16 (bilinear upsampling, see `upsample`), and the judge reads any size back at 8x8 by area
averaging (`downsample`), so real and generated images reach the judge through the same path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
LABELS = tuple(str(d) for d in range(10))
IMAGE_SIZE = 16  # pixel size of the generator; real digits are 8x8
SPLIT_SEED = 0
GENERATOR_SHARE = 0.7  # share of the 1797 digits the generator trains on
JUDGE_FIT_SHARE = 2 / 3  # share of the held-out part the judge is fitted on; the rest evaluates it
ANCHOR_PROMPT = "a handwritten digit"

# {w}: the digit as a word ("seven"), {n}: as a numeral ("7"), {aw}: "a"/"an" + word.
TRAIN_TEMPLATES = (
    "a handwritten digit {w}",
    "the number {n}",
    "{n}",
    "a drawing of {aw}",
    "{w}",
    "handwritten {n}",
    "the digit {w}",
)
# The generator also trains on these, but unlearning recipes never see them: they measure
# whether an erased concept comes back through a paraphrase.
HELDOUT_TEMPLATES = (
    "an image of the numeral {w}",
    "digit {n} written by hand",
    "a picture of the number {w}",
)


def _fill(template: str, digit: int) -> str:
    word = DIGIT_WORDS[digit]
    article = "an" if word[0] in "aeiou" else "a"
    return template.format(w=word, n=str(digit), aw=f"{article} {word}")


def train_prompts(digit: int) -> list[str]:
    """Phrasings of `digit` that unlearning recipes may train on."""
    return [_fill(t, digit) for t in TRAIN_TEMPLATES]


def heldout_prompts(digit: int) -> list[str]:
    """Phrasings of `digit` kept away from unlearning, used to evaluate paraphrase leakage."""
    return [_fill(t, digit) for t in HELDOUT_TEMPLATES]


def all_prompts(digit: int) -> list[str]:
    """Every phrasing the generator trains on for `digit`."""
    return train_prompts(digit) + heldout_prompts(digit)


def vocabulary_words() -> list[str]:
    """Every word of every prompt, lower case, in first-seen order (for the tokenizer)."""
    seen: dict[str, None] = {}
    for digit in range(10):
        for prompt in all_prompts(digit):
            for word in prompt.lower().split():
                seen.setdefault(word, None)
    for word in ANCHOR_PROMPT.split():
        seen.setdefault(word, None)
    return list(seen)


@dataclass(frozen=True)
class DigitsSplit:
    """Fixed split of `load_digits()`: images (N, 8, 8) float32 in [0, 1], labels (N,) int64.

    generator: what the diffusion model trains on; judge_fit / judge_eval: the held-out part,
    which the generator never sees, split again to fit and evaluate the judge.
    """

    generator_images: np.ndarray
    generator_labels: np.ndarray
    judge_fit_images: np.ndarray
    judge_fit_labels: np.ndarray
    judge_eval_images: np.ndarray
    judge_eval_labels: np.ndarray

    @property
    def heldout_images(self) -> np.ndarray:
        return np.concatenate([self.judge_fit_images, self.judge_eval_images])

    @property
    def heldout_labels(self) -> np.ndarray:
        return np.concatenate([self.judge_fit_labels, self.judge_eval_labels])


def _stratified_permutation_split(
    labels: np.ndarray, share: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (first, second) with `share` of every class in `first`; stratified so every
    digit is equally represented on both sides."""
    first, second = [], []
    for label in range(10):
        idx = np.flatnonzero(labels == label)
        idx = idx[rng.permutation(len(idx))]
        cut = int(round(share * len(idx)))
        first.append(idx[:cut])
        second.append(idx[cut:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


def load_split(seed: int = SPLIT_SEED) -> DigitsSplit:
    """The fixed generator / judge-fit / judge-eval split of scikit-learn's digits."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)
    labels = data.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    gen_idx, held_idx = _stratified_permutation_split(labels, GENERATOR_SHARE, rng)
    fit_rel, eval_rel = _stratified_permutation_split(labels[held_idx], JUDGE_FIT_SHARE, rng)
    fit_idx, eval_idx = held_idx[fit_rel], held_idx[eval_rel]
    return DigitsSplit(
        images[gen_idx], labels[gen_idx],
        images[fit_idx], labels[fit_idx],
        images[eval_idx], labels[eval_idx],
    )  # fmt: skip


def upsample(images: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """(N, 8, 8) in [0, 1] -> (N, size, size), bilinear (half-pixel centres)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.asarray(images, dtype=np.float32))[:, None]
    y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return y[:, 0].clamp(0, 1).numpy()


def downsample(images: np.ndarray, size: int = 8) -> np.ndarray:
    """(N, H, W) or (N, H, W, C) in [0, 1] -> (N, size, size) grey, by area averaging.

    Channels are averaged (the generator draws grey digits in RGB). Area averaging is the
    natural inverse of `upsample` for integer factors and works at any input size.
    """
    import torch
    import torch.nn.functional as F

    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 4:
        x = x.mean(axis=-1)
    if x.ndim != 3:
        raise ValueError(f"expected images (N, H, W) or (N, H, W, C), got shape {x.shape}")
    if x.shape[1:] == (size, size):
        return x
    t = torch.from_numpy(np.ascontiguousarray(x))[:, None]
    return F.interpolate(t, size=(size, size), mode="area")[:, 0].numpy()


def to_model_range(images: np.ndarray) -> np.ndarray:
    """(N, H, W) in [0, 1] -> (N, 3, H, W) in [-1, 1], the VAE's input (grey as RGB)."""
    x = np.asarray(images, dtype=np.float32) * 2.0 - 1.0
    return np.repeat(x[:, None], 3, axis=1)


def concept_spec(digit: int) -> dict:
    """The concept file content for `digit` (the schema configs/concepts/*.yaml use)."""
    label = str(digit)
    return {
        "name": f"digit-{label}",
        "aliases": [label, DIGIT_WORDS[digit]],
        "judge": "digits",
        "label": label,
        "erase_prompts": train_prompts(digit),
        "heldout_prompts": heldout_prompts(digit),
        "retain_prompts": {str(o): train_prompts(o)[:2] for o in range(10) if o != digit},
        "anchor_prompt": ANCHOR_PROMPT,
    }


def _yaml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _yaml_list(items: list[str]) -> str:
    return "[" + ", ".join(_yaml_str(s) for s in items) + "]"


def write_concept_files(folder: str | Path) -> list[Path]:
    """Write configs/concepts/digit-0.yaml ... digit-9.yaml (hand-formatted, stable YAML)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for digit in range(10):
        spec = concept_spec(digit)
        lines = [
            f"# Erase the digit {digit} from the digits-world model: compress --target onnx --erase {digit}",
            f"name: {spec['name']}",
            f"aliases: {_yaml_list(spec['aliases'])}",
            f"judge: {spec['judge']}",
            f"label: {_yaml_str(spec['label'])}",
            f"erase_prompts: {_yaml_list(spec['erase_prompts'])}",
            f"heldout_prompts: {_yaml_list(spec['heldout_prompts'])}",
            "retain_prompts:  # label -> prompts: the other nine digits, 2 phrasings each",
        ]
        lines += [f"  {_yaml_str(k)}: {_yaml_list(v)}" for k, v in spec["retain_prompts"].items()]
        lines.append(
            f"anchor_prompt: {_yaml_str(spec['anchor_prompt'])}"
            "  # anchor / override / replacement concept (ablation, SFD, All-but-One)"
        )
        path = folder / f"digit-{digit}.yaml"
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return paths


if __name__ == "__main__":
    import sys

    for p in write_concept_files(sys.argv[1] if len(sys.argv) > 1 else "configs/concepts"):
        print(p)
