"""Recipe -> target profile -> `key=value` overrides -> one typed, validated `RunConfig`.

Every knob is a dataclass field with a default and a docstring-like comment. Unknown keys, wrong
types and out-of-range values are errors at load time, before any model is touched, and the
message names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
TARGETS = ("onnx", "ort", "coreml", "qnn", "executorch")
COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")


class ConfigError(ValueError):
    """A recipe, profile or override is invalid; the message names the key and the fix."""


@dataclass(frozen=True)
class PruneConfig:
    """Structural pruning of the UNet (stage `prune`).

    channels: Diff-Pruning-style channel/head pruning (torch-pruning); bk-base / bk-small /
    bk-tiny: BK-SDM block removal of SD-1.x/2.x UNets (the ratio/importance/taylor keys apply to
    channels only).
    """

    method: Literal["channels", "bk-base", "bk-small", "bk-tiny", "none"] = "channels"  # "none" skips the stage
    ratio: float = 0.3  # channels: share of channels removed per layer, in [0, 1)
    importance: Literal["magnitude", "taylor", "random"] = "magnitude"  # channel importance criterion
    global_pruning: bool = False  # channels: rank all layers together instead of per layer
    # channels: module-name prefix -> its own ratio, e.g. {"mid_block": 0.5, "up_blocks.3": 0.1}
    block_ratios: dict[str, float] = field(default_factory=dict)
    taylor_steps: int = 50  # taylor: timesteps sampled evenly over [0, T), visited low to high noise
    taylor_stop: float = 0.05  # taylor: stop once the loss falls below this share of its maximum
    taylor_batch: int = 4  # taylor: random calibration latents per timestep
    taylor_prompts: list[str] = field(default_factory=lambda: [""])  # taylor: text condition ("" = unconditional)
    seed: int = 0  # taylor: calibration latents and noise

    def __post_init__(self):
        if not 0.0 <= self.ratio < 1.0:
            raise ConfigError(f"prune.ratio={self.ratio}: must be in [0, 1), e.g. prune.ratio=0.3")
        for prefix, ratio in self.block_ratios.items():
            if not 0.0 <= ratio < 1.0:
                raise ConfigError(
                    f"prune.block_ratios.{prefix}={ratio}: must be in [0, 1), e.g. prune.block_ratios={{mid_block: 0.5}}"
                )
        if self.block_ratios and self.method != "channels":
            raise ConfigError(
                f"prune.block_ratios is set but prune.method={self.method!r} removes whole blocks; "
                "use prune.method=channels or drop prune.block_ratios"
            )
        if self.taylor_steps < 1:
            raise ConfigError(f"prune.taylor_steps={self.taylor_steps}: must be >= 1, e.g. prune.taylor_steps=50")
        if not 0.0 <= self.taylor_stop < 1.0:
            raise ConfigError(f"prune.taylor_stop={self.taylor_stop}: must be in [0, 1), e.g. prune.taylor_stop=0.05")
        if self.taylor_batch < 1:
            raise ConfigError(f"prune.taylor_batch={self.taylor_batch}: must be >= 1, e.g. prune.taylor_batch=4")
        if not self.taylor_prompts:
            raise ConfigError('prune.taylor_prompts is empty; pass at least one prompt, e.g. prune.taylor_prompts=[""]')


@dataclass(frozen=True)
class ConceptPruneConfig:
    """ConceptPrune: zero the FFN weights skilled for the erased concepts (stage `concept_prune`).

    Training-free and unstructured (no speed-up); the concepts come from `erase`.
    """

    enabled: bool = False  # run the stage (needs at least one --erase concept)
    skill_ratio: float = 0.01  # share of each ff.net.2 row scored as skilled per step (paper: 0.01-0.02)
    timesteps: int = 10  # the first tau sampling steps whose skilled weights are united
    steps: int = 50  # DDIM steps of the scoring run (the paper samples 50)
    guidance_scale: float = 7.5  # classifier-free guidance of the scoring run
    seed: int = 0  # initial latent shared by every prompt

    def __post_init__(self):
        if not 0.0 < self.skill_ratio < 1.0:
            raise ConfigError(
                f"concept_prune.skill_ratio={self.skill_ratio}: must be in (0, 1), e.g. concept_prune.skill_ratio=0.01"
            )
        if self.steps < 1:
            raise ConfigError(f"concept_prune.steps={self.steps}: must be >= 1, e.g. concept_prune.steps=50")
        if not 1 <= self.timesteps <= self.steps:
            raise ConfigError(
                f"concept_prune.timesteps={self.timesteps}: must be in [1, concept_prune.steps={self.steps}], "
                "e.g. concept_prune.timesteps=10"
            )
        if self.guidance_scale < 0:
            raise ConfigError(f"concept_prune.guidance_scale={self.guidance_scale}: must be >= 0, e.g. 7.5")


FINETUNE_MODES = ("distill", "sequential", "bilevel", "bilevel-penalty", "sfd")  # "auto" resolves to one of these
# The registered objectives of toolchain.unlearning, listed here so loading a config imports no
# torch; a test checks that both lists agree.
OBJECTIVE_NAMES = ("ablation", "all-but-one", "erasediff", "esd", "override")
# Objective names that were renamed: old name -> why and what to use.
RENAMED_OBJECTIVES = {
    "sfd": "is now `override` (the same loss, MSE(S(x_t,c_f), sg[T(x_t,c_override)])); Score Forgetting "
    "Distillation itself needs a generator: finetune.mode=sfd",
}


def _at_least(section: str, cfg, names: tuple[str, ...], low: int | float, strict: bool = False) -> None:
    """ConfigError naming `finetune.<section>.<name>` when a field is below `low` (or not above it)."""
    for name in names:
        value = getattr(cfg, name)
        if value < low or (strict and not value > low):
            bound = f"> {low}" if strict else f">= {low}"
            raise ConfigError(f"{section}.{name}={value}: must be {bound}")


@dataclass(frozen=True)
class EsdConfig:
    """ESD (`objective: esd`): target T(x_t, base) − η·(T(x_t, c) − T(x_t, base))."""

    eta: float = 1.0  # negative-guidance strength η
    from_anchor: bool = False  # base = the concept's anchor prompt instead of ""

    def __post_init__(self):
        _at_least("finetune.esd", self, ("eta",), 0)


@dataclass(frozen=True)
class AllButOneConfig:
    """All-but-One (`objective: all-but-one`)."""

    beta: float = 1.0  # weight of the unconditional-score term

    def __post_init__(self):
        _at_least("finetune.all_but_one", self, ("beta",), 0)


@dataclass(frozen=True)
class EraseDiffConfig:
    """EraseDiff (`objective: erasediff`): the step on L_r + λ(L_f − L_f*), λ fixed."""

    lambda_bome: float = 0.1  # λ (the authors' lambda_bome default 0.1)
    inner_steps: int = 0  # steps estimating min L_f on a copy (log only)

    def __post_init__(self):
        if self.lambda_bome < 0:
            raise ConfigError(
                f"finetune.erasediff.lambda_bome={self.lambda_bome}: must be >= 0, e.g. 0.1 (EraseDiff's λ is fixed)"
            )
        _at_least("finetune.erasediff", self, ("inner_steps",), 0)


@dataclass(frozen=True)
class PenaltyConfig:
    """mode=bilevel-penalty (BOME)."""

    # K inner L_ft steps on a fresh copy of the lower variables per outer step (EraseDiff's
    # authors' K_steps default; BOME's experiments use 10 on far cheaper lower problems)
    inner_steps: int = 2
    eta: float = 0.5  # η of BOME's multiplier λ = max(η − <∇L_CU, ∇q>/|∇q|², 0) (BOME's toy default 0.5)

    def __post_init__(self):
        _at_least("finetune.penalty", self, ("inner_steps",), 1)
        _at_least("finetune.penalty", self, ("eta",), 0)


@dataclass(frozen=True)
class RobustConfig:
    """AdvUnlearn-style robust upper level: before every upper step, `attack_steps` steps of an
    attack (toolchain.attacks) find `prefix_tokens` prefix tokens that bring the concept back in
    the current student; the unlearning loss is taken on the attacked prompts, plus
    retain_weight·MSE(S, T) on retain prompts. Costs about `attack_steps` extra forward/backward
    passes per upper step (robust.attack_s in the summary)."""

    enabled: bool = False
    # embedding: continuous prefix embeddings (AdvUnlearn's soft-prompt attack, Adam lr attack_lr);
    # prefix: the discrete token search of the prefix attack (attack_candidates swaps per step)
    attack: Literal["embedding", "prefix"] = "embedding"
    attack_steps: int = 8  # attack steps per upper step (AdvUnlearn: 30 on SD)
    prefix_tokens: int = 3  # adversarial prefix tokens (UnlearnDiffAtk / AdvUnlearn: 5)
    attack_lr: float = 0.005  # embedding: Adam lr of the prefix embeddings (AdvUnlearn: 1e-3 on SD)
    attack_candidates: int = 8  # prefix: single-token swaps checked per example and attack step
    attacked_share: float = 0.5  # share of a forget batch conditioned on attacked prompts (rest plain)
    retain_weight: float = 1.0  # weight of the retain term MSE(S(x_t,c_r), T(x_t,c_r))

    def __post_init__(self):
        _at_least("finetune.robust", self, ("attack_steps", "prefix_tokens", "attack_candidates"), 1)
        if not 0.0 <= self.attacked_share <= 1.0:
            raise ConfigError(f"finetune.robust.attacked_share={self.attacked_share}: must be in [0, 1], e.g. 0.5")
        _at_least("finetune.robust", self, ("attack_lr",), 0, strict=True)
        _at_least("finetune.robust", self, ("retain_weight",), 0)


@dataclass(frozen=True)
class SfdConfig:
    """mode=sfd: Score Forgetting Distillation to a k-step generator (toolchain.finetune.sfd).

    Defaults from tqch/score-forgetting-distillation's SD run (run_sfd.sh) unless noted; the lrs
    are the digits model's (paper SD-1.5: generator 1e-6, fake score 3e-6; Adam betas (0, 0.999)).
    """

    steps: int = 1  # generator calls per image k; timesteps t_i = t_init·(1 − i/k), i < k
    timesteps: list[int] = field(default_factory=list)  # explicit decreasing timesteps (overrides the two above)
    init_timestep: int = 625  # t_init, the generation timestep (SD 625, CIFAR-10 440)
    alpha: float = 1.0  # SiD α: L_G = (y_r − y_f)ᵀ[(y_r − x_g) − α(y_r − y_f)] / w (SD 1, CIFAR-10 1.2)
    guidance: float = 4.5  # classifier-free guidance inside the loss: fake training, fake and teacher eval
    tmin: int = 20  # diffusion timesteps of the score evaluations, uniform in [tmin, tmax)
    tmax: int = 980
    remain_weight: float = 1.0  # weight of the retain-prompt terms (sg_remain = g_remain)
    forget_weight: float = 1.0  # weight of the forget→override terms (SD 1.0; code default 0.01)
    generator_lr: float = 2e-4  # Adam lr of the generator G
    fake_lr: float = 2e-4  # Adam lr of the fake-score network
    fake_init: Literal["teacher", "student"] = "teacher"  # fake score starts as a copy of this (SiD: teacher)
    # teacher's override estimate guided away from the forget prompt (SFD's negative prompt, use_neg[2])
    negative_forget: bool = False

    def __post_init__(self):
        _at_least("finetune.sfd", self, ("steps",), 1)
        if not 0 < self.init_timestep < 1000:
            raise ConfigError(f"finetune.sfd.init_timestep={self.init_timestep}: must be in (0, 1000), e.g. 625")
        if self.steps > self.init_timestep:
            raise ConfigError(
                f"finetune.sfd.steps={self.steps} > sfd.init_timestep={self.init_timestep}: timesteps would repeat"
            )
        ts = list(self.timesteps)
        if ts and (any(not 0 <= t < 1000 for t in ts) or any(a <= b for a, b in zip(ts, ts[1:], strict=False))):
            raise ConfigError(
                f"finetune.sfd.timesteps={ts}: must be strictly decreasing timesteps in [0, 1000), e.g. [625, 312]"
            )
        if not 0 <= self.tmin < self.tmax <= 1000:
            raise ConfigError(
                f"finetune.sfd.tmin={self.tmin}, sfd.tmax={self.tmax}: need 0 <= tmin < tmax <= 1000, e.g. 20, 980"
            )
        _at_least("finetune.sfd", self, ("generator_lr", "fake_lr"), 0, strict=True)
        _at_least("finetune.sfd", self, ("alpha", "guidance", "remain_weight", "forget_weight"), 0)
        if self.remain_weight + self.forget_weight == 0:
            raise ConfigError(
                "finetune.sfd.remain_weight and sfd.forget_weight are both 0: the sfd loss would be empty"
            )

    @property
    def schedule(self) -> list[int]:
        """The generator's timesteps t_1 > ... > t_k."""
        if self.timesteps:
            return [int(t) for t in self.timesteps]
        return [int(self.init_timestep * (1 - i / self.steps)) for i in range(self.steps)]


# Flat keys of the one-class FinetuneConfig before the sub-configs: old key -> new key.
MOVED_FINETUNE_KEYS = {
    "esd_eta": "esd.eta",
    "esd_from_anchor": "esd.from_anchor",
    "abo_beta": "all_but_one.beta",
    "erasediff_lambda": "erasediff.lambda_bome",
    "erasediff_inner_steps": "erasediff.inner_steps",
    "inner_steps": "penalty.inner_steps",
    "penalty_eta": "penalty.eta",
    **{
        f"robust_{k}": f"robust.{k}"
        for k in (
            "attack",
            "attack_steps",
            "prefix_tokens",
            "attack_lr",
            "attack_candidates",
            "attacked_share",
            "retain_weight",
        )
    },
    **{
        f"sfd_{k}": f"sfd.{k}"
        for k in (
            "steps",
            "timesteps",
            "init_timestep",
            "alpha",
            "guidance",
            "tmin",
            "tmax",
            "remain_weight",
            "forget_weight",
            "generator_lr",
            "fake_lr",
            "fake_init",
            "negative_forget",
        )
    },
}


@dataclass(frozen=True)
class FinetuneConfig:
    """Distill the pruned student from the unpruned teacher, optionally unlearning `erase`.

    Lower level (every mode): L_ft = w_diff·L_diff + w_out·L_outKD + w_feat·L_featKD.
    Upper level (sequential / bilevel / bilevel-penalty): the unlearning `objective`, which
    receives only its own sub-config (`objective_settings`: `esd`, `erasediff`, `all_but_one`).
    bilevel-penalty (BOME): `trainable` names the upper variables, the rest of the UNet the lower
    ones (`penalty`). mode=sfd: Score Forgetting Distillation of the student into a k-step
    generator that also forgets (`sfd`); the lower-level and objective fields do not apply.
    Learning rates default to values that work on the digits model (3.3M params, 16x16 px);
    the paper's SD-2.1 values are lower_lr=1e-6, upper_lr=5e-6, warmup_steps=250.
    """

    enabled: bool = False  # run the stage
    # "auto": bilevel when --erase names concepts, distill otherwise (resolved by `resolve_finetune`)
    mode: Literal["auto", "distill", "sequential", "bilevel", "bilevel-penalty", "sfd"] = "bilevel"
    objective: str = "esd"  # upper loss: esd, ablation, erasediff, override, all-but-one
    # what upper steps change; bilevel-penalty: the upper variables (the rest are the lower ones), not "full"
    trainable: Literal["full", "cross_attention", "non_cross_attention"] = "full"
    steps: int = 1000  # optimiser steps in total (sequential: distill steps + unlearn_steps)
    batch_size: int = 16  # global batch of one lower step (split over processes)
    upper_batch_size: int = 16  # global batch of one upper step
    gradient_accumulation_steps: int = 1  # micro-batches per step (batch_size must divide evenly)
    lower_lr: float = 1e-4  # AdamW lr of the lower (distillation) optimiser; paper 1e-6
    upper_lr: float = 5e-4  # AdamW lr of the upper (unlearning) optimiser; paper 5e-6
    warmup_steps: int = 0  # linear lr warm-up of the lower optimiser; paper 250
    upper_every: int = 10  # bilevel: one upper step every K lower steps (code K=10, paper text K=20)
    unlearn_steps: int = 0  # sequential: unlearning steps at the end; 0 = steps // upper_every
    w_diff: float = 1.0  # weight of the denoising loss
    w_out: float = 2.0  # weight of output distillation
    w_feat: float = 0.1  # weight of block-feature distillation
    snr_gamma: float = 5.0  # min-SNR weighting of L_diff; 0 disables it
    feature_kd: Literal["project", "matching"] = "project"  # pruned widths: learned 1x1 conv, or skip
    prompt_dropout: float = 0.1  # share of retain prompts replaced by "" (keeps CFG working)
    retain_prompts: list[str] = field(default_factory=list)  # empty: every other concept of the judge
    retain_judge: str = "digits"  # judge whose concepts give the retain prompts when nothing is erased
    # image+caption folder (metadata.jsonl with file_name/text, or name.txt beside each image)
    # whose VAE latents and captions replace the teacher's samples of the retain prompts
    retain_data: str = ""
    samples_per_prompt: int = 8  # teacher samples (x_0 latents) per prompt, generated once
    sample_steps: int = 25  # DDIM steps of the teacher samples
    sample_guidance: float = 5.0  # guidance scale of the teacher samples
    esd: EsdConfig = field(default_factory=EsdConfig)
    all_but_one: AllButOneConfig = field(default_factory=AllButOneConfig)
    erasediff: EraseDiffConfig = field(default_factory=EraseDiffConfig)
    penalty: PenaltyConfig = field(default_factory=PenaltyConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # accelerate mixed precision
    gradient_checkpointing: bool = False  # UNet gradient checkpointing (saves memory on CUDA)
    checkpoint_every: int = 100  # save weights + optimiser states every N steps
    max_loss: float = 1e4  # a loss above this (or NaN/inf) stops the run
    seed: int = 0
    sfd: SfdConfig = field(default_factory=SfdConfig)

    def __post_init__(self):
        if self.mode not in (*FINETUNE_MODES, "auto"):
            raise ConfigError(f"finetune.mode={self.mode!r}: use one of {list(FINETUNE_MODES)}")
        if self.objective in RENAMED_OBJECTIVES:
            raise ConfigError(f"finetune.objective={self.objective} {RENAMED_OBJECTIVES[self.objective]}")
        if self.objective not in OBJECTIVE_NAMES:
            raise ConfigError(f"finetune.objective={self.objective!r}: use one of {list(OBJECTIVE_NAMES)}")
        if self.mode == "bilevel-penalty" and self.trainable == "full":
            raise ConfigError(
                "finetune.mode=bilevel-penalty splits the UNet into upper (finetune.trainable) and lower variables "
                "(the rest); set finetune.trainable=cross_attention or non_cross_attention"
            )
        counts = ("steps", "batch_size", "upper_batch_size", "gradient_accumulation_steps", "upper_every")
        _at_least("finetune", self, (*counts, "samples_per_prompt", "sample_steps", "checkpoint_every"), 1)
        _at_least("finetune", self, ("unlearn_steps", "warmup_steps"), 0)
        if self.mode == "sequential" and self.unlearn_steps >= self.steps:
            raise ConfigError(
                f"finetune.unlearn_steps={self.unlearn_steps} >= finetune.steps={self.steps}: "
                "sequential needs distillation steps first; lower unlearn_steps"
            )
        for name in ("batch_size", "upper_batch_size"):
            if getattr(self, name) % self.gradient_accumulation_steps:
                raise ConfigError(
                    f"finetune.{name}={getattr(self, name)} is not divisible by "
                    f"finetune.gradient_accumulation_steps={self.gradient_accumulation_steps}"
                )
        _at_least("finetune", self, ("lower_lr", "upper_lr", "max_loss"), 0, strict=True)
        _at_least("finetune", self, ("w_diff", "w_out", "w_feat", "snr_gamma"), 0)
        if self.w_diff + self.w_out + self.w_feat == 0:
            raise ConfigError("finetune.w_diff, w_out and w_feat are all 0: the lower loss would be empty")
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ConfigError(f"finetune.prompt_dropout={self.prompt_dropout}: must be in [0, 1), e.g. 0.1")

    @property
    def objective_settings(self):
        """What the upper objective receives: its own sub-config (None for ablation and override)."""
        return {"esd": self.esd, "erasediff": self.erasediff, "all-but-one": self.all_but_one}.get(self.objective)

    @property
    def unlearns(self) -> bool:
        """Whether the run forgets concepts (needs --erase); mode=sfd with sfd.forget_weight=0 is
        plain one-step distillation (SiD)."""
        return self.mode != "distill" and not (self.mode == "sfd" and self.sfd.forget_weight == 0)

    @property
    def sequential_unlearn_steps(self) -> int:
        return self.unlearn_steps or max(1, self.steps // self.upper_every)


def resolve_finetune(cfg: FinetuneConfig, erase: list[str]) -> FinetuneConfig:
    """Settle finetune.mode=auto: unlearn (bilevel) when concepts are erased, else distill only."""
    if cfg.mode != "auto":
        return cfg
    return dataclasses.replace(cfg, mode="bilevel" if erase else "distill")


def check_finetune(cfg: FinetuneConfig, erase: list[str]) -> None:
    """Run-level checks (call from `plan()`): an unlearning mode needs concepts to erase, and
    every erase concept needs prompts (`load_concept` refuses an empty `erase_prompts`)."""
    if not cfg.enabled:
        return
    if cfg.unlearns and not erase:
        raise ConfigError(
            f"finetune.mode={cfg.mode} unlearns a concept but nothing is erased; pass --erase CONCEPT "
            "or use finetune.mode=distill (mode=sfd: finetune.sfd.forget_weight=0 forgets nothing)"
        )
    for name in erase:
        if not load_concept(name).erase_prompts:
            raise ConfigError(f"--erase {name}: the concept has no erase_prompts; list the prompts that name it")


@dataclass(frozen=True)
class DecoderConfig:
    """A tiny VAE decoder distilled from the pipeline's own (stage `decoder`, toolchain/finetune/decoder.py):
    convolutional, no attention (diffusers' AutoencoderTiny, the TAESD layout), one level per level
    of the VAE it replaces; trained on the model's own latents (the teacher samples finetune uses)
    to draw the images the VAE draws."""

    enabled: bool = False
    channels: int = 64  # width of every level (TAESD: 64)
    blocks: int = 3  # residual conv blocks per level (TAESD: 3; the last level has 1)
    steps: int = 2000
    batch_size: int = 16
    lr: float = 1.0e-3
    structure_weight: float = 1.0  # weight of the edge and multi-scale terms beside the pixel L1
    encoder_weight: float = 1.0  # its encoder is distilled too (img2img in PyTorch), weight of its loss
    held_out: float = 0.1  # share of latents kept out of training to measure the decoder
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 0

    def __post_init__(self):
        for name in ("channels", "blocks", "steps", "batch_size"):
            if isinstance(getattr(self, name), bool) or getattr(self, name) < 1:
                raise ConfigError(f"decoder.{name}={getattr(self, name)}: must be >= 1")
        if not self.lr > 0:
            raise ConfigError(f"decoder.lr={self.lr}: must be > 0, e.g. 1e-3")
        for name in ("structure_weight", "encoder_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"decoder.{name}={getattr(self, name)}: must be >= 0")
        if not 0 < self.held_out < 1:
            raise ConfigError(f"decoder.held_out={self.held_out}: must be in (0, 1), e.g. 0.1")


@dataclass(frozen=True)
class ExportConfig:
    """Export to the target's format with a parity gate against PyTorch (stage `export`)."""

    opset: int = 17  # ONNX opset; 14 is the lowest that carries every op the UNet needs
    components: list[str] = field(default_factory=lambda: ["text_encoder", "unet", "vae_decoder"])
    # max abs error allowed per component vs PyTorch; missing components use the exporter default
    tolerance: dict[str, float] = field(default_factory=dict)
    # --target ort: "Fixed" bakes CPU-provider optimisations into the .ort files (ONNX Runtime's
    # advice for mobile); "Runtime" saves them for replay with NNAPI / Core ML execution providers
    ort_optimization: Literal["Fixed", "Runtime"] = "Fixed"
    # every graph fixed to the rows the app feeds (a guided pair per UNet call, one image per VAE
    # decode) with its shape arithmetic folded, what NNAPI / the Core ML EP take (export/fixed_shapes.py)
    fixed_shapes: bool = False

    def __post_init__(self):
        if self.opset < 14:
            raise ConfigError(f"export.opset={self.opset}: the lowest supported opset is 14, e.g. export.opset=17")
        bad = sorted(set(self.components) - set(COMPONENTS)) + sorted(set(self.tolerance) - set(COMPONENTS))
        if bad:
            raise ConfigError(f"export components {bad} are unknown; choose from {list(COMPONENTS)}")
        if "unet" not in self.components:
            raise ConfigError("export.components must include unet")


QUANT_MODES = ("dynamic", "static")
QUANT_FORMATS = ("QOperator", "QDQ")
WEIGHT_TYPES = ("QInt8", "QUInt8")
# Op types onnxruntime 1.31's quantizers know (union of its IntegerOps, QLinearOps and QDQ registries).
QUANTIZABLE_OP_TYPES = (
    "Add", "ArgMax", "Attention", "AveragePool", "BatchNormalization", "Clip", "Concat", "Conv", "ConvTranspose",
    "CumSum", "EmbedLayerNormalization", "Flatten", "Gather", "GatherElements", "Gemm", "GlobalAveragePool",
    "InstanceNormalization", "LSTM", "LayerNormalization", "LeakyRelu", "MatMul", "MaxPool", "Mul", "Pad", "Relu",
    "Reshape", "Resize", "Sigmoid", "Slice", "Softmax", "Split", "Squeeze", "TopK", "Transpose", "Unsqueeze", "Where",
)  # fmt: skip


@dataclass(frozen=True)
class QuantizeConfig:
    """Int8 (ONNX Runtime quantization) and/or fp16 for the exported ONNX folder (stage `quantize`)."""

    enabled: bool = False  # int8-quantize `components` (fp16 is the separate `fp16` switch)
    # Default = the fastest int8 formulation measured that passes the digits quality bars
    # (benchmarks/results/int8-speed.md, int8-digits.md; x86 AVX512-VNNI, ORT 1.31, 1 thread):
    # static (calibrated) QDQ, per-channel weights, Conv + MatMul only. Mid-size SD-1.x UNet:
    # 0.70x fp32 latency, 0.28x size, PSNR 41.7 dB vs fp32; static QDQ on all ops is as fast but
    # 10 dB worse, dynamic int8 on all ops or Conv is 2.6-3.1x *slower* than fp32 (ConvInteger).
    # On the 3.3M-param digits UNet (8x8 latent) no int8 variant beats fp32 (this one 1.08x):
    # quantize/dequantize overhead outweighs the small convolutions.
    mode: Literal["dynamic", "static"] = "static"
    components: list[str] = field(default_factory=lambda: ["unet"])  # which to quantize
    per_channel: bool = True  # one weight scale per output channel
    # ONNX op types to quantize; [] = every op type ORT can (adds Q/DQ around Add, Mul, Softmax...)
    op_types: list[str] = field(default_factory=lambda: ["Conv", "MatMul"])
    weight_type: Literal["QInt8", "QUInt8"] = "QInt8"  # int8 weights, uint8 activations: x86 VNNI's u8s8
    # static only. QUInt16 (QDQ; W8A16) keeps the guidance signal where uint8 activations crush it (digits
    # UNet: guidance cosine 0.999 vs 0.35-0.40, export.guidance) but runs no faster than fp32 on a CPU
    activation_type: Literal["QUInt8", "QUInt16"] = "QUInt8"
    # static only; mode=dynamic always writes QOperator, its one form, whatever this says. QDQ is
    # the int8 form ORT's NNAPI, XNNPACK and QNN execution providers take
    quant_format: Literal["QOperator", "QDQ"] = "QDQ"
    calibration_prompts: int = 20  # prompts whose DDIM trajectories calibrate (static); from the recipe
    calibration_steps: int = 25  # DDIM steps per calibration trajectory
    calibration_feeds: int = 16  # UNet feeds kept, evenly spaced over the trajectory
    calibration_guidance_scale: float = 5.0  # the recipe's guidance (digits world: 5.0)
    calibration_seed: int = 0
    # prompts used when the recipe erases no concept (its concepts' prompts come first otherwise)
    calibration_text: list[str] = field(default_factory=list)
    exclude_nodes: list[str] = field(default_factory=list)  # node names kept fp32 (sensitive layers)
    psnr_floor_db: float = 20.0  # int8 gate: PSNR vs the fp32 ONNX component (export.quantize)
    fp16: bool = False  # fp16 weights and compute (fp32 inputs and outputs) for the components not int8
    # Guidance gate on the UNet, int8 or fp16 (export.guidance): its eps(x, c) - eps(x, ∅) against the
    # fp32 model's on held-out trajectory feeds, per timestep band: cosine >= this floor ...
    guidance_cosine_floor: float = 0.98
    guidance_norm_ratio: list[float] = field(default_factory=lambda: [0.8, 1.25])  # ... and norm ratio in range

    def __post_init__(self):
        if self.mode not in QUANT_MODES:
            raise ConfigError(
                f"quantize.mode={self.mode!r}: must be one of {list(QUANT_MODES)}, e.g. quantize.mode=static"
            )
        if self.quant_format not in QUANT_FORMATS:
            raise ConfigError(f"quantize.quant_format={self.quant_format!r}: must be one of {list(QUANT_FORMATS)}")
        if self.weight_type not in WEIGHT_TYPES:
            raise ConfigError(f"quantize.weight_type={self.weight_type!r}: must be one of {list(WEIGHT_TYPES)}")
        if self.activation_type == "QUInt16" and (self.mode, self.quant_format) != ("static", "QDQ"):
            raise ConfigError(
                "quantize.activation_type=QUInt16 needs quantize.mode=static and quantize.quant_format=QDQ"
            )
        bad = sorted(set(self.components) - set(COMPONENTS))
        if bad or not self.components or len(set(self.components)) != len(self.components):
            raise ConfigError(
                f"quantize.components={list(self.components)}: each must be one of {list(COMPONENTS)}, "
                "at least one, no repeats, e.g. quantize.components=[unet]"
            )
        bad = sorted(set(self.op_types) - set(QUANTIZABLE_OP_TYPES))
        if bad:
            raise ConfigError(
                f"quantize.op_types {bad}: not op types ONNX Runtime quantizes; choose from "
                f"{list(QUANTIZABLE_OP_TYPES)}, or [] for all"
            )
        for key in ("calibration_prompts", "calibration_steps", "calibration_feeds"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"quantize.{key}={value!r}: must be an integer >= 1")
        if not self.calibration_guidance_scale >= 1.0:
            raise ConfigError(
                f"quantize.calibration_guidance_scale={self.calibration_guidance_scale!r}: must be >= 1.0 "
                "(the runner draws with classifier-free guidance), e.g. 5.0"
            )
        if not self.psnr_floor_db >= 0:
            raise ConfigError(f"quantize.psnr_floor_db={self.psnr_floor_db!r}: must be a number >= 0 (dB), e.g. 20")
        if any(not isinstance(n, str) or not n for n in self.exclude_nodes):
            raise ConfigError("quantize.exclude_nodes: every entry must be a non-empty ONNX node name")
        _check_guidance_floors("quantize", self.guidance_cosine_floor, self.guidance_norm_ratio)


def _check_guidance_floors(section: str, cosine_floor: float, norm_ratio: list[float]) -> None:
    if not -1.0 <= cosine_floor <= 1.0:
        raise ConfigError(f"{section}.guidance_cosine_floor={cosine_floor!r}: must be in [-1, 1], e.g. 0.98")
    if len(norm_ratio) != 2 or not 0 < norm_ratio[0] <= 1.0 <= norm_ratio[1]:
        raise ConfigError(
            f"{section}.guidance_norm_ratio={list(norm_ratio)!r}: must be [low, high] with 0 < low <= 1 <= high, "
            "e.g. [0.8, 1.25]"
        )


QNN_PRECISIONS = ("fp16", "w8a16", "w8a8")


@dataclass(frozen=True)
class QnnConfig:
    """Models for Qualcomm's NPU through ONNX Runtime's QNN execution provider (`--target qnn`,
    stage `qnn`); calibration and the guidance gate's floors come from the quantize section."""

    # The UNet's precision on the HTP. fp16 by default: on the digits UNet it matched fp32 to 78.8 dB
    # on the HTP backend (guidance cosine 0.999), while the W8A16 QDQ graph that matches fp32 to 60 dB
    # on ONNX Runtime's CPU provider measured 24 dB and guidance cosine 0.01 on the HTP
    # (benchmarks/results/phone-runtimes.md; cause not isolated)
    precision: Literal["fp16", "w8a16", "w8a8"] = "fp16"
    soc: str = "SM8750"  # the SoC the context binaries are compiled for (toolchain.runtime.qnn.SOCS)
    context_binaries: bool = True  # <component>/model_ctx.onnx: loads on the phone without compiling
    # images per erased concept drawn through the HTP backend itself by the benchmark (the rest run
    # the same graphs on ONNX Runtime's CPU provider: the HTP simulator takes ~1.5 s per digits UNet call)
    htp_images: int = 4
    psnr_floor_db: dict[str, float] = field(default_factory=dict)  # per precision, over export.qnn's floors

    def __post_init__(self):
        if isinstance(self.htp_images, bool) or self.htp_images < 1:
            raise ConfigError(f"qnn.htp_images={self.htp_images!r}: must be >= 1 (HTP is never skipped)")
        bad = sorted(set(self.psnr_floor_db) - set(QNN_PRECISIONS))
        if bad:
            raise ConfigError(f"qnn.psnr_floor_db keys {bad}: choose from {list(QNN_PRECISIONS)}")


EXECUTORCH_PRECISIONS = ("fp32", "int8", "8da4w")


@dataclass(frozen=True)
class ExecuTorchConfig:
    """ExecuTorch programs with the XNNPACK delegate (`--target executorch`, stage `executorch`);
    calibration and the guidance gate's floors come from the quantize section."""

    # The UNet's precision. fp32 by default: XNNPACK's 8-bit UNet (PT2E, int8 activations) keeps 20+ dB
    # output parity but crushes the guidance signal as ORT's uint8 int8 does (digits UNet:
    # benchmarks/results/phone-runtimes.md), which the guidance gate refuses. 8da4w: torchao's dynamic
    # int8 activations + int4 weights on the Linear layers only (no calibration)
    precision: Literal["fp32", "int8", "8da4w"] = "fp32"
    psnr_floor_db: dict[str, float] = field(default_factory=dict)  # per precision, over export.executorch's floors

    def __post_init__(self):
        bad = sorted(set(self.psnr_floor_db) - set(EXECUTORCH_PRECISIONS))
        if bad:
            raise ConfigError(f"executorch.psnr_floor_db keys {bad}: choose from {list(EXECUTORCH_PRECISIONS)}")


@dataclass(frozen=True)
class CoreMLConfig:
    """Core ML conversion for `--target coreml` (stage `coreml`): ML programs for Apple's
    StableDiffusion Swift package."""

    precision: Literal["fp16", "fp32"] = "fp16"  # compute precision of every component
    compression: Literal["none", "int8", "palettize4", "palettize6", "palettize8"] = "none"
    compress_components: list[str] = field(default_factory=lambda: ["unet"])
    attention: Literal["original", "split_einsum"] = "original"  # split_einsum suits the Neural Engine
    minimum_deployment_target: Literal["iOS17", "iOS18"] = "iOS17"

    def __post_init__(self):
        bad = sorted(set(self.compress_components) - {"text_encoder", "unet", "vae_decoder"})
        if bad:
            raise ConfigError(f"coreml.compress_components {bad}: choose from text_encoder, unet, vae_decoder")


@dataclass(frozen=True)
class BenchmarkConfig:
    """Measurements written to report.json (stage `benchmark`)."""

    batch: int = 2  # UNet batch: 2 = one image with classifier-free guidance
    warmup: int = 2  # untimed runs before timing
    repeats: int = 10  # timed runs; median and p90 are reported
    threads: int = 0  # intra-op threads for torch and onnxruntime; 0 = library default
    eval_images_per_prompt: int = 2  # images per prompt for leakage / accuracy (judged models)
    eval_steps: int = 25  # DDIM steps for evaluation images
    guidance_scale: float = 5.0  # classifier-free guidance scale for evaluation images
    seed: int = 0
    # judge that scores generated images: "auto" = the erased concepts' judge, else the one the
    # model folder names in judge.json (the embedded digits model does); "none" = no scoring
    judge: str = "auto"
    # runtime profile (configs/devices/<name>.yaml or a YAML path): threads, providers, memory budget
    profile: str = "desktop-cpu"
    # CLIP zero-shot judge (concept files with `judge: clip`): a local CLIP folder, or a hub id
    # (e.g. openai/clip-vit-large-patch14) where the network allows; each class text is
    # clip_template with the concept label in place of {}
    clip_model: str = ""
    clip_template: str = "{}"
    # time the deliverable against the unpruned fp32 source exported to the same runtime, in turns
    # (report.json `side_by_side`, report.md's first line); the source's export is cached across runs
    side_by_side: bool = True
    side_by_side_ms: float = 3000.0  # each side-by-side row takes turns until the slower model ran this long

    def __post_init__(self):
        for name in ("batch", "repeats", "eval_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"benchmark.{name}={getattr(self, name)}: must be >= 1")
        for name in ("warmup", "threads", "eval_images_per_prompt"):
            if getattr(self, name) < 0:
                raise ConfigError(f"benchmark.{name}={getattr(self, name)}: must be >= 0")
        if not self.side_by_side_ms >= 0:
            raise ConfigError(f"benchmark.side_by_side_ms={self.side_by_side_ms}: must be >= 0, e.g. 3000")
        if "{}" not in self.clip_template:
            raise ConfigError(f"benchmark.clip_template={self.clip_template!r}: must contain {{}} for the label")


@dataclass(frozen=True)
class AttackConfig:
    """White-box attacks on erasure, run by the benchmark stage on every PyTorch stage's model
    (toolchain/attacks/): a discrete prefix-prompt attack (UnlearnDiffAtk-style), a soft-prompt
    attack (continuous prefix embeddings, what AdvUnlearn trains against) and concept inversion (one
    learned token embedding); the exported model is measured with the found discrete prompts.
    Cost per stage: about `steps` + `soft_steps` + `inversion_steps` forward/backward passes of the
    UNet at batch n_prompts·batch (resp. batch), plus generation of 3·n_prompts·images_per_prompt
    images."""

    enabled: bool = False  # run the attacks (needs --erase and a judge)
    prefix_tokens: int = 3  # k adversarial prefix tokens (UnlearnDiffAtk: 5 on SD)
    steps: int = 30  # prefix-attack steps (the budget): one gradient pass + one batched swap check each
    candidates: int = 8  # single-token swaps checked exactly per prompt and step
    topk: int = 8  # swaps are drawn among each position's top-k tokens by the embedding gradient
    select_every: int = 10  # judge the current prefixes every N steps and at the end; 0 = only at the end
    select_images: int = 2  # images per prompt of each judging (other seeds than the reported figure)
    n_prompts: int = 7  # attacked prompts per concept: its erase_prompts, cycled
    images_per_prompt: int = 4  # generations judged per attacked prompt
    batch: int = 8  # noised concept latents per prompt in the attack objective
    concept_images: int = 4  # original-model samples per concept prompt (the "concept images")
    inversion_steps: int = 100  # concept-inversion steps; 0 = no embedding attack
    inversion_lr: float = 0.005  # Adam lr of the inverted token embedding
    soft_steps: int = 30  # soft-prompt attack: Adam steps on continuous prefix embeddings; 0 = off
    soft_lr: float = 0.005  # its Adam lr
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.prefix_tokens, bool) or self.prefix_tokens < 1:
            raise ConfigError(
                f"attack.prefix_tokens={self.prefix_tokens}: the prefix attack needs at least 1 token, "
                "e.g. attack.prefix_tokens=3"
            )
        for name in ("steps", "inversion_steps", "soft_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"attack.{name}={getattr(self, name)}: must be >= 0, e.g. attack.{name}=40")
        for name in (
            "n_prompts",
            "images_per_prompt",
            "batch",
            "concept_images",
            "candidates",
            "topk",
            "select_images",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"attack.{name}={getattr(self, name)}: must be >= 1")
        if self.select_every < 0:
            raise ConfigError(f"attack.select_every={self.select_every}: must be >= 0, e.g. attack.select_every=10")
        for name in ("inversion_lr", "soft_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"attack.{name}={getattr(self, name)}: must be > 0, e.g. 0.005")


@dataclass(frozen=True)
class RunConfig:
    """Everything one `compress` run needs; stage sections are hashed into fingerprints."""

    target: Literal["onnx", "ort", "coreml", "qnn", "executorch"] = "onnx"
    description: str = ""  # what the recipe is for (shown by `compress validate`)
    erase: list[str] = field(default_factory=list)  # concepts to erase (names or aliases)
    prune: PruneConfig = field(default_factory=PruneConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    concept_prune: ConceptPruneConfig = field(default_factory=ConceptPruneConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)  # a distilled tiny VAE decoder (optional)
    export: ExportConfig = field(default_factory=ExportConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    coreml: CoreMLConfig = field(default_factory=CoreMLConfig)
    qnn: QnnConfig = field(default_factory=QnnConfig)
    executorch: ExecuTorchConfig = field(default_factory=ExecuTorchConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)  # white-box attacks in the benchmark stage


# ----------------------------------------------------------------------------------------------
# What a stage receives: its section plus exactly the run-wide settings it reads. The runner hashes
# all of it into the stage's fingerprint (the section's fields first, then the others by name).


@dataclass(frozen=True)
class FinetuneSettings:
    finetune: FinetuneConfig
    erase: list[str]
    data: dict[str, str] | None = None  # content hash of every image folder the stage trains on


@dataclass(frozen=True)
class DecoderSettings:
    decoder: DecoderConfig
    finetune: FinetuneConfig  # its prompts and sampler settings pick the teacher samples (a cache hit after finetune)
    erase: list[str]


@dataclass(frozen=True)
class ConceptPruneSettings:
    concept_prune: ConceptPruneConfig
    erase: list[str]


@dataclass(frozen=True)
class QuantizeSettings:
    quantize: QuantizeConfig
    erase: list[str]  # their prompts calibrate the int8 UNet and gate its leakage


@dataclass(frozen=True)
class QnnSettings:
    qnn: QnnConfig
    quantize: QuantizeConfig  # calibration trajectories and the guidance gate's floors
    erase: list[str]  # their prompts calibrate the UNet


@dataclass(frozen=True)
class ExecuTorchSettings:
    executorch: ExecuTorchConfig
    quantize: QuantizeConfig  # calibration trajectories and the guidance gate's floors
    erase: list[str]  # their prompts calibrate the UNet


@dataclass(frozen=True)
class BenchmarkSettings:
    benchmark: BenchmarkConfig
    erase: list[str]
    attack: AttackConfig
    target: str = "onnx"
    recipe: str = ""  # the recipe's description, shown in the report


# ----------------------------------------------------------------------------------------------
# Building typed configs from plain dicts


def _check_type(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            choices = ", ".join(repr(a) for a in typing.get_args(hint))
            raise ConfigError(f"{key}={value!r}: must be one of {choices}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_type(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r}: must be a list, e.g. {key}=[a,b]")
        (item,) = typing.get_args(hint)
        return [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: must be a mapping, e.g. {key}={{a: 1}}")
        kt, vt = typing.get_args(hint)
        return {_check_type(k, kt, key): _check_type(v, vt, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # `--erase 7` and `erase: [7]` both mean the concept named "7"
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key}={value!r}: must be of type {hint.__name__}")
    return value


def from_dict(cls, data: Any, prefix: str = ""):
    """Build dataclass `cls` from `data`, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'recipe'}: must be a mapping of keys to values, got {type(data).__name__}")
    if cls is FinetuneConfig:
        _refuse_flat_keys(data, prefix)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]}; valid keys here: {', '.join(names)}")
    kwargs = {k: _check_type(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def _refuse_flat_keys(data: dict, prefix: str) -> None:
    """A recipe written for the flat FinetuneConfig fails with the key's new name, not 'unknown key'."""
    where = f"{prefix}." if prefix else ""
    if isinstance(data.get("robust"), bool):
        raise ConfigError(f"{where}robust={str(data['robust']).lower()} is now {where}robust.enabled")
    for key in data:
        if key in MOVED_FINETUNE_KEYS:
            raise ConfigError(f"{where}{key} is now {where}{MOVED_FINETUNE_KEYS[key]}")


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------------------------
# Recipes, target profiles and overrides


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of keys to values")
    return data


def resolve_recipe(name_or_path: str | None) -> Path:
    """A recipe is a YAML path or the name of a shipped recipe (`default`, `tiny`)."""
    if name_or_path is None:
        return CONFIG_DIR / "recipes" / "default.yaml"
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"--recipe {name_or_path}: no such file")
        return path
    shipped = CONFIG_DIR / "recipes" / f"{name_or_path}.yaml"
    if not shipped.is_file():
        names = sorted(p.stem for p in (CONFIG_DIR / "recipes").glob("*.yaml"))
        raise ConfigError(f"--recipe {name_or_path}: no such recipe; pass a YAML file or one of {names}")
    return shipped


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """`prune.ratio=0.5` -> {"prune": {"ratio": 0.5}}; values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. prune.ratio=0.5")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected key=value, e.g. prune.ratio=0.5")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    nested: dict[str, Any] = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested


def load_config(
    recipe: str | None = None,
    target: str | None = None,
    overrides: list[str] = (),
    erase: list[str] = (),
) -> tuple[RunConfig, dict[str, Any]]:
    """Merge recipe, target profile and overrides; return the typed config and its sources."""
    recipe_path = resolve_recipe(recipe)
    data = read_yaml(recipe_path)
    target = target or data.get("target", "onnx")
    if target not in TARGETS:
        raise ConfigError(f"--target {target}: unknown target; choose one of {list(TARGETS)}")
    profile_path = CONFIG_DIR / "targets" / f"{target}.yaml"
    data = deep_merge(data, read_yaml(profile_path))
    data["target"] = target
    for text in overrides:
        data = deep_merge(data, parse_override(text))
    if erase:
        data["erase"] = list(data.get("erase", [])) + list(erase)
    cfg = from_dict(RunConfig, data)
    return cfg, {"recipe": str(recipe_path), "target_profile": str(profile_path), "overrides": list(overrides)}


# ----------------------------------------------------------------------------------------------
# Concepts


# The judges `benchmarks.leakage` registers (a test keeps the two lists equal; config stays light).
JUDGE_NAMES = ("clip", "digits", "nudenet")


@dataclass(frozen=True)
class ConceptConfig:
    """A concept to erase: its prompts, the judge that recognises it, and a safe anchor."""

    name: str
    judge: str  # registered judge name (benchmarks.leakage), e.g. "digits"
    label: str  # what the judge outputs for this concept
    erase_prompts: list[str]
    aliases: list[str] = field(default_factory=list)
    heldout_prompts: list[str] = field(default_factory=list)  # phrasings no training step uses
    retain_prompts: dict[str, list[str]] = field(default_factory=dict)  # judge label -> prompts
    anchor_prompt: str = ""  # anchor / override / replacement concept
    # folder of images of the concept (captions optional: the erase prompts in turn); when set,
    # finetune noises these instead of the teacher's samples of the concept
    images: str = ""

    def __post_init__(self):
        if not self.erase_prompts:
            raise ConfigError(f"concept {self.name}: erase_prompts is empty; list the prompts that name it")
        if self.judge not in JUDGE_NAMES:
            raise ConfigError(f"concept {self.name}: judge={self.judge!r}; use one of {list(JUDGE_NAMES)}")


def load_concept(name: str) -> ConceptConfig:
    """Resolve `--erase NAME` to a concept file: a path, a file stem, or an alias inside one."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"--erase {name}: no such concept file")
        return from_dict(ConceptConfig, read_yaml(path), path.stem)
    folder = CONFIG_DIR / "concepts"
    for candidate in sorted(folder.glob("*.yaml")):
        data = read_yaml(candidate)
        if name == candidate.stem or name == data.get("name") or name in data.get("aliases", []):
            return from_dict(ConceptConfig, data, candidate.stem)
    known = sorted(p.stem for p in folder.glob("*.yaml"))
    raise ConfigError(f"--erase {name}: no concept file names it; pass a YAML file or one of {known}")
