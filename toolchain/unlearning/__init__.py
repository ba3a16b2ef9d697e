"""Unlearning objectives: the pluggable upper level of the `finetune` stage.

Each objective is a function registered with `@register_objective(name)` in an explicitly
imported module of this package (no package walking). It computes the upper loss of one batch
of forget prompts:

    loss = objective(student, teacher, batch, settings)

- `student(x_t, t, emb) -> (B, C, h, w)`: the pruned UNet being trained (gradients flow).
- `teacher(x_t, t, emb) -> (B, C, h, w)`: the frozen unpruned UNet (called under no_grad).
- `batch`: a `ForgetBatch` of noised latents and prompt embeddings (shapes below).
- `settings`: the objective's own sub-config (`FinetuneConfig.objective_settings`: `EsdConfig`,
  `AllButOneConfig`, `EraseDiffConfig`; None for objectives without knobs).

All outputs are in the model's own prediction space (epsilon or v). Which parameters an
upper step may change is chosen by `trainable_parameters(unet, subset)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

OBJECTIVES: dict[str, Callable] = {}
# Which teacher samples an objective noises for its x_t: the forget prompts' or the anchor's.
OBJECTIVE_LATENTS: dict[str, str] = {}
TRAINABLE_SUBSETS = ("full", "cross_attention", "non_cross_attention")


@dataclass
class ForgetBatch:
    """One upper-level batch. B = batch size, L = tokens, D = text width.

    x_t: (B, C, h, w) noised latents; t: (B,) timesteps; cond: (B, L, D) forget-prompt
    embeddings; uncond: (B, L, D) empty-prompt embeddings; anchor: (B, L, D) anchor / override /
    replacement / pseudo prompt embeddings (`ConceptConfig.anchor_prompt`; "" when unset);
    plain: (B, L, D) the forget prompts' own embeddings where `cond` holds attacked ones (the
    robust option), else None. The student is asked with `cond`, the teacher with `teacher_cond`
    (AdvUnlearn's ESD target asks the original model about the plain prompt).
    """

    x_t: torch.Tensor
    t: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor
    anchor: torch.Tensor
    plain: torch.Tensor | None = None

    @property
    def teacher_cond(self) -> torch.Tensor:
        return self.cond if self.plain is None else self.plain


def register_objective(name: str, latents: str = "forget"):
    """Register an objective under `name`; `latents` says whose teacher samples give its x_t."""

    def decorate(fn: Callable) -> Callable:
        if name in OBJECTIVES:
            raise ValueError(f"unlearning objective {name!r} is registered twice")
        OBJECTIVES[name] = fn
        OBJECTIVE_LATENTS[name] = latents
        return fn

    return decorate


def objective_names() -> list[str]:
    return sorted(OBJECTIVES)


def get_objective(name: str) -> Callable:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown unlearning objective {name!r}; use one of {objective_names()}")
    return OBJECTIVES[name]


def trainable_parameters(unet: torch.nn.Module, subset: str) -> list[tuple[str, torch.nn.Parameter]]:
    """The (name, parameter) pairs an upper step may change.

    "cross_attention": the `attn2` (text cross-attention) modules only (ESD-x, Concept
    Ablation); "non_cross_attention": everything else (ESD-u, EraseDiff's `noxattn`); "full": all.
    """
    if subset not in TRAINABLE_SUBSETS:
        raise ValueError(f"unknown trainable subset {subset!r}; use one of {list(TRAINABLE_SUBSETS)}")
    chosen = []
    for name, param in unet.named_parameters():
        cross = ".attn2." in f".{name}"
        if subset == "full" or (subset == "cross_attention") == cross:
            chosen.append((name, param))
    if not chosen:
        raise ValueError(f"trainable subset {subset!r} selects no parameter of this UNet (it has no attn2?)")
    return chosen


# Explicit imports register the built-in objectives.
from toolchain.unlearning import ablation, all_but_one, erasediff, esd, override  # noqa: E402,F401

__all__ = [
    "ForgetBatch",
    "OBJECTIVES",
    "OBJECTIVE_LATENTS",
    "TRAINABLE_SUBSETS",
    "get_objective",
    "objective_names",
    "register_objective",
    "trainable_parameters",
]
