"""Finetuning: distil the pruned student from the unpruned teacher while unlearning concepts, or
(`mode=sfd`) turn it into a k-step generator that forgets them. Stage `finetune` is the adapter.

Method: "Efficient Fine-Tuning and Concept Suppression for Pruned Diffusion Models" (Shirkavand
et al., CVPR 2025; code `rezashkv/unlearn-ft`). Notation: S = student (the input, pruned), T =
teacher (the run's source, the unpruned pipeline, frozen).

Lower level (recovers quality):  L_ft = w_diff·L_diff + w_out·L_outKD + w_feat·L_featKD
- L_diff: denoising loss against the true target (epsilon or v, read from the scheduler config)
  with min-SNR weighting γ: w_t = min(SNR_t, γ)/SNR_t (epsilon), min(SNR_t, γ)/(SNR_t + 1) (v).
- L_outKD = MSE(S(x_t,t,c), T(x_t,t,c)) on the same x_t, t, c.
- L_featKD: mean MSE between student and teacher outputs of every down block, the mid block and
  every up block (forward hooks). Channel pruning makes widths differ: `feature_kd="project"`
  compares through a learned 1x1 conv per block (student width -> teacher width), trained with
  the student by the lower optimiser and thrown away at the end; `"matching"` skips such blocks.
- Data: the retain prompts (every other concept of the erased concepts' judge, or
  `retain_prompts`), x_0 = latents of the *teacher's own* DDIM samples of them, generated once per
  (teacher, prompts, seed, sampler settings) into the cross-run cache (`shared_teacher_samples`;
  every process of a multi-process launch draws its share), so a resumed or repeated run reuses them;
  or, with `retain_data`, the VAE latents of an image+caption folder with its captions.
  `prompt_dropout` of the prompts become "" so classifier-free guidance keeps working.

Upper level (unlearning): any `toolchain.unlearning` objective on forget batches (x_t = noised
teacher samples of the erase prompts, or the concept file's `images`, or teacher samples of the
anchor prompt for `ablation`); it may change only the `trainable` subset (bilevel-penalty: it
names the upper variables, see below). EraseDiff adds its retain term and its constrained
first-order step here.
Robust option (`robust`, in the manner of AdvUnlearn, Zhang et al. 2024, `OPTML-Group/AdvUnlearn`):
before every upper step, `robust.attack_steps` steps of an attack from `toolchain.attacks` find
`robust.prefix_tokens` prefix tokens per forget example that make the current student's
prediction match the teacher's concept prediction (the inner maximisation): continuous prefix
embeddings (`robust.attack=embedding`, AdvUnlearn's own soft-prompt attack) or the discrete token
search (`prefix`). The upper objective is then taken with those attacked prompts for
`robust.attacked_share` of the batch (the rest keep the plain prompts), plus
`robust.retain_weight`·MSE(S(x_t,c_r), T(x_t,c_r)) on a retain batch (AdvUnlearn's utility term).
Its extra wall time is `robust` in the summary.

Modes (same number of steps `steps` in each; `sfd` has its own loop, sfd.py):
- distill: lower steps only.
- sequential: `steps − M` lower steps, then M upper steps (M = unlearn_steps or steps // K).
- bilevel (the official code's solver): one set of weights, two AdamW optimisers; every step one
  lower step, every K-th step (`upper_every`) one upper step.
- bilevel-penalty (the paper's text, made to work as BOME, Liu et al. 2022, "BOME! Bilevel
  Optimization Made Easy", `Cranial-XIX/BOME`): the paper's penalty form on one shared set of
  weights has ∇θ L_ft(ϑ) = 0, so its inner steps would never reach θ. Here the variables are split:
  upper θ_u = the `trainable` subset ("full" is refused), lower ϑ = the rest of the UNet and the
  feature projections. Every step: ϑ_K = `penalty.inner_steps` L_ft steps from ϑ on a copy (θ_u fixed;
  AdamW at lower_lr whose moments persist, as BOME's inner optimiser does); the value-function gap
  q = L_ft(θ_u, ϑ) − L_ft(θ_u, ϑ_K) on one retain batch (ϑ_K a constant), whose θ_u-gradient
  ∇θ_u L_ft(θ_u, ϑ) − ∇θ_u L_ft(θ_u, ϑ_K) carries the inner solution; then every parameter moves
  along d = ∇L_CU + λ∇q with BOME's λ = max(η − <∇L_CU, ∇q>/|∇q|², 0) (φ = η|∇q|², η =
  `penalty.eta`), through one AdamW with a θ_u group at upper_lr and a ϑ group at lower_lr (BOME
  uses SGD). As in BOME the upper loss's gradient reaches ϑ too: the constraint, not a mask, keeps
  ϑ on the distillation. The log holds q (`gap`) and λ (`penalty_lambda`). Costs penalty.inner_steps + 2
  lower passes and one upper pass per step, and two gradient-sized buffers. Digits defaults: K = 2
  (EraseDiff's authors' K for the same kind of inner problem), η = 0.5 (BOME's toy default).

Scale and robustness: HF Accelerate (mixed precision, any device; several processes with
`accelerate launch --multi_gpu` on GPUs, or `torchrun --nproc_per_node N` with
ACCELERATE_USE_CPU=1 on CPUs (gloo; `accelerate launch --cpu` needs mpirun for N > 1). Each
process takes its slice of the same global batch, so N processes reproduce one. Gradient
accumulation is done here, not by accelerate: two objectives share one model and accelerate's
counter assumes one. Every batch is drawn from a generator seeded by (seed, step, stream), so a run restarted
from a checkpoint (`checkpoints/`, every `checkpoint_every` steps: Accelerate's `save_state` of
the prepared models and optimisers, plus the step) ends with the same weights as an
uninterrupted one. Losses go to `losses.jsonl`; a NaN/inf loss or one
above `max_loss` raises `TrainingDivergedError`, keeping the last good checkpoint.

Modules, bottom to top: data.py (concepts, prompts, teacher samples, image folders, seeded
batches), losses.py (block features, DistillStudent, min-SNR, denoising loss), checkpoints.py,
state.py (the Accelerator, prepared models and optimisers, micro-batches, gradient accumulation),
robust.py, steps.py (lower and upper steps, EraseDiff), penalty.py (BOME), loop.py (`train`),
sfd.py (Score Forgetting Distillation, `train_onestep`).
"""

from toolchain.finetune.checkpoints import (
    CHECKPOINTS,
    LOSSES_FILE,
    latest_checkpoint,
    load_checkpoint,
    restart_losses,
    save_checkpoint,
)
from toolchain.finetune.data import (
    SAMPLES_FILE,
    Examples,
    TrainingData,
    check_config,
    encode_images,
    encode_prompts,
    lower_batch,
    prepare_data,
    read_image_folder,
    retain_prompt_list,
    sampled_prompts,
    shared_teacher_samples,
    training_examples,
    upper_batch,
)
from toolchain.finetune.loop import train
from toolchain.finetune.losses import (
    DistillStudent,
    block_names,
    denoising_loss,
    forward_with_features,
    kd_block_widths,
    min_snr_weights,
)
from toolchain.finetune.penalty import bome_direction
from toolchain.finetune.sfd import (
    FewStepGenerator,
    fake_score_loss,
    generator_loss,
    guided_output,
    prompt_data,
    sfd_batch,
    train_onestep,
)

__all__ = [
    "CHECKPOINTS",
    "LOSSES_FILE",
    "SAMPLES_FILE",
    "DistillStudent",
    "Examples",
    "FewStepGenerator",
    "TrainingData",
    "block_names",
    "bome_direction",
    "check_config",
    "denoising_loss",
    "encode_images",
    "encode_prompts",
    "fake_score_loss",
    "forward_with_features",
    "generator_loss",
    "guided_output",
    "kd_block_widths",
    "latest_checkpoint",
    "load_checkpoint",
    "lower_batch",
    "min_snr_weights",
    "prepare_data",
    "prompt_data",
    "read_image_folder",
    "restart_losses",
    "retain_prompt_list",
    "sampled_prompts",
    "shared_teacher_samples",
    "save_checkpoint",
    "sfd_batch",
    "train",
    "train_onestep",
    "training_examples",
    "upper_batch",
]
