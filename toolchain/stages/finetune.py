"""Stage `finetune`: distil the pruned student from the unpruned teacher while unlearning concepts.

Method: "Efficient Fine-Tuning and Concept Suppression for Pruned Diffusion Models" (Shirkavand
et al., CVPR 2025; code `rezashkv/unlearn-ft`). Notation: S = student (the input, pruned), T =
teacher (`ctx.chain[0]`, the unpruned source pipeline, frozen).

Lower level (recovers quality):  L_ft = w_diff·L_diff + w_out·L_outKD + w_feat·L_featKD
- L_diff: denoising loss against the true target (epsilon or v, read from the scheduler config)
  with min-SNR weighting γ: w_t = min(SNR_t, γ)/SNR_t (epsilon), min(SNR_t, γ)/(SNR_t + 1) (v).
- L_outKD = MSE(S(x_t,t,c), T(x_t,t,c)) on the same x_t, t, c.
- L_featKD: mean MSE between student and teacher outputs of every down block, the mid block and
  every up block (forward hooks). Channel pruning makes widths differ: `feature_kd="project"`
  compares through a learned 1x1 conv per block (student width -> teacher width), trained with
  the student by the lower optimiser and thrown away at the end; `"matching"` skips such blocks.
- Data: the retain prompts (every other concept of the erased concepts' judge, or
  `retain_prompts`), x_0 = latents of the *teacher's own* DDIM samples of them, generated once
  and cached in the output folder (`teacher_samples.safetensors`), so a resumed run reuses them;
  or, with `retain_data`, the VAE latents of an image+caption folder with its captions.
  `prompt_dropout` of the prompts become "" so classifier-free guidance keeps working.

Upper level (unlearning): any `toolchain.unlearning` objective on forget batches (x_t = noised
teacher samples of the erase prompts, or the concept file's `images`, or teacher samples of the
anchor prompt for `ablation`); it may change only the `trainable` subset (bilevel-penalty: it
names the upper variables, see below). EraseDiff adds its retain term and its constrained
first-order step here.
Robust option (`robust`, in the manner of AdvUnlearn, Zhang et al. 2024, `OPTML-Group/AdvUnlearn`):
before every upper step, `robust_attack_steps` steps of an attack from toolchain/attacks.py find
`robust_prefix_tokens` prefix tokens per forget example that make the current student's
prediction match the teacher's concept prediction (the inner maximisation): continuous prefix
embeddings (`robust_attack=embedding`, AdvUnlearn's own soft-prompt attack) or the discrete token
search (`prefix`). The upper objective is then taken with those attacked prompts for
`robust_attacked_share` of the batch (the rest keep the plain prompts), plus
`robust_retain_weight`·MSE(S(x_t,c_r), T(x_t,c_r)) on a retain batch (AdvUnlearn's utility term).
Its extra wall time is `robust` in the summary.

Modes (same number of steps `steps` in each):
- distill: lower steps only.
- sequential: `steps − M` lower steps, then M upper steps (M = unlearn_steps or steps // K).
- bilevel (the official code's solver): one set of weights, two AdamW optimisers; every step one
  lower step, every K-th step (`upper_every`) one upper step.
- bilevel-penalty (the paper's text, made to work as BOME, Liu et al. 2022, "BOME! Bilevel
  Optimization Made Easy", `Cranial-XIX/BOME`): the paper's penalty form on one shared set of
  weights has ∇θ L_ft(ϑ) = 0, so its inner steps would never reach θ. Here the variables are split:
  upper θ_u = the `trainable` subset ("full" is refused), lower ϑ = the rest of the UNet and the
  feature projections. Every step: ϑ_K = `inner_steps` L_ft steps from ϑ on a copy (θ_u fixed;
  AdamW at lower_lr whose moments persist, as BOME's inner optimiser does); the value-function gap
  q = L_ft(θ_u, ϑ) − L_ft(θ_u, ϑ_K) on one retain batch (ϑ_K a constant), whose θ_u-gradient
  ∇θ_u L_ft(θ_u, ϑ) − ∇θ_u L_ft(θ_u, ϑ_K) carries the inner solution; then every parameter moves
  along d = ∇L_CU + λ∇q with BOME's λ = max(η − <∇L_CU, ∇q>/|∇q|², 0) (φ = η|∇q|², η =
  `penalty_eta`), through one AdamW with a θ_u group at upper_lr and a ϑ group at lower_lr (BOME
  uses SGD). As in BOME the upper loss's gradient reaches ϑ too: the constraint, not a mask, keeps
  ϑ on the distillation. The log holds q (`gap`) and λ (`penalty_lambda`). Costs inner_steps + 2
  lower passes and one upper pass per step, and two gradient-sized buffers. Digits defaults: K = 2
  (EraseDiff's authors' K for the same kind of inner problem), η = 0.5 (BOME's toy default).

Scale and robustness: HF Accelerate (mixed precision, any device; several processes with
`accelerate launch --multi_gpu` on GPUs, or `torchrun --nproc_per_node N` with
ACCELERATE_USE_CPU=1 on CPUs (gloo; `accelerate launch --cpu` needs mpirun for N > 1). Each
process takes its slice of the same global batch, so N processes reproduce one. Gradient
accumulation is done here, not by accelerate: two objectives share one model and accelerate's
counter assumes one. Every batch is drawn from a generator seeded by (seed, step), so a run restarted from a
checkpoint (`checkpoints/`, every `checkpoint_every` steps: safetensors + optimiser tensors) ends
with the same weights as an uninterrupted one. Losses go to `losses.jsonl`; a NaN/inf loss or one
above `max_loss` raises `TrainingDivergedError`, keeping the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from toolchain.artifact import Artifact, folder_size
from toolchain.config import CONFIG_DIR, ConceptConfig, ConfigError, FinetuneConfig, FinetuneSettings, load_concept
from toolchain.errors import TrainingDivergedError
from toolchain.models.io import PRUNING_RECORD, link_pipeline, load_pipeline, load_unet, save_unet
from toolchain.runtime.schedule import diffusion_target
from toolchain.unlearning import OBJECTIVE_LATENTS, ForgetBatch, get_objective, trainable_parameters

logger = logging.getLogger(__name__)

SAMPLES_FILE = "teacher_samples.safetensors"
LOSSES_FILE = "losses.jsonl"
CHECKPOINTS = "checkpoints"


# ----------------------------------------------------------------------------------------------
# Input checks and prompts


def check_config(cfg: FinetuneConfig, erase: list[str]) -> list[ConceptConfig]:
    """Refuse settings no run can honour, before any model is loaded; returns the concepts."""
    get_objective(cfg.objective)
    if cfg.unlearns and not erase:
        raise ConfigError(
            f"finetune.mode={cfg.mode} unlearns a concept but nothing is erased; pass --erase CONCEPT "
            "or use finetune.mode=distill"
        )
    concepts = [load_concept(name) for name in erase]
    for concept in concepts:
        if not concept.erase_prompts:
            raise ConfigError(f"concept {concept.name}: erase_prompts is empty; list the prompts that name it")
    return concepts


def retain_prompt_list(cfg: FinetuneConfig, concepts: list[ConceptConfig]) -> list[str]:
    """`cfg.retain_prompts`, or the erase prompts of every concept file of the same judge that is
    not erased (digits world: every other digit) and the erased concepts' own `retain_prompts`."""
    if cfg.retain_prompts:
        return list(cfg.retain_prompts)
    judges = {c.judge for c in concepts} or {cfg.retain_judge}
    erased = {(c.judge, c.label) for c in concepts}
    prompts: list[str] = []
    for path in sorted((CONFIG_DIR / "concepts").glob("*.yaml")):
        concept = load_concept(str(path))
        if concept.judge in judges and (concept.judge, concept.label) not in erased:
            prompts += [p for p in concept.erase_prompts if p not in prompts]
    for concept in concepts:
        for more in concept.retain_prompts.values():
            prompts += [p for p in more if p not in prompts]
    if not prompts:
        raise ConfigError(
            f"finetune: no retain prompts (no other concept of judge {sorted(judges)}); "
            "set finetune.retain_prompts=[...]"
        )
    return prompts


# ----------------------------------------------------------------------------------------------
# Training data: teacher samples and prompt embeddings


@dataclass
class TrainingData:
    """Everything a step samples from. S samples, P prompts (prompt 0 is "").

    latents (S, C, h, w): teacher samples in the UNet's latent space; emb (P, L, D);
    retain_rows / retain_pids (N_r,): sample row and prompt id of each retain example;
    forget_rows / forget_pids / anchor_pids / anchor_rows (N_f,): a forget example's sample row,
    prompt, its concept's anchor prompt and a sample row of that anchor prompt; ids (P, L): the
    prompts' token ids (the robust option attacks them; None where the prompts are unknown).
    """

    latents: torch.Tensor
    emb: torch.Tensor
    retain_rows: torch.Tensor
    retain_pids: torch.Tensor
    forget_rows: torch.Tensor
    forget_pids: torch.Tensor
    anchor_pids: torch.Tensor
    anchor_rows: torch.Tensor
    ids: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.contiguous() for k, v in vars(self).items() if v is not None}


def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """(P, L, D) text embeddings of `prompts` (padded to the tokenizer's max length)."""
    out = []
    for start in range(0, len(prompts), 64):
        tokens = pipe.tokenizer(
            prompts[start : start + 64],
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            out.append(pipe.text_encoder(tokens.input_ids.to(pipe.device))[0].float().cpu())
    return torch.cat(out)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_image_folder(folder: Path, captions: list[str] | None = None) -> list[tuple[Path, str]]:
    """(image, caption) pairs of an image+caption folder, in file-name order.

    Captions come from Hugging Face's `imagefolder` layout (`metadata.jsonl` lines with
    `file_name` and `text`), else from `name.txt` beside `name.png`, else from `captions` in turn
    (concept images: the concept's erase prompts). An image left without a caption is refused.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"image folder {folder}: no such directory")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ConfigError(f"image folder {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    texts: dict[Path, str] = {}
    metadata = folder / "metadata.jsonl"
    if metadata.is_file():
        for number, line in enumerate(metadata.read_text().splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    texts[(folder / row["file_name"]).resolve()] = str(row["text"])
                except (ValueError, KeyError, TypeError):
                    raise ConfigError(f"{metadata}:{number}: each line must be JSON with file_name and text") from None
    pairs = []
    for i, image in enumerate(images):
        text = texts.get(image.resolve())
        if text is None and image.with_suffix(".txt").is_file():
            text = image.with_suffix(".txt").read_text().strip()
        if text is None and captions:
            text = captions[i % len(captions)]
        if text is None:
            raise ConfigError(f"{image}: no caption (metadata.jsonl, {image.with_suffix('.txt').name})")
        pairs.append((image, text))
    return pairs


def encode_images(pipe, paths: list[Path]) -> torch.Tensor:
    """(N, C, h, w) VAE latents (distribution means x scaling factor) of the images, resized to the
    UNet's resolution: what the teacher's own samples are, so both kinds of x_0 mix in a batch."""
    from PIL import Image

    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    size = pipe.unet.config.sample_size * vae_scale
    out = []
    for start in range(0, len(paths), 16):
        images = [Image.open(p).convert("RGB") for p in paths[start : start + 16]]
        pixels = pipe.image_processor.preprocess(images, height=size, width=size)
        with torch.no_grad():
            dist = pipe.vae.encode(pixels.to(pipe.device, pipe.vae.dtype)).latent_dist
        out.append((dist.mean * pipe.vae.config.scaling_factor).float().cpu())
    return torch.cat(out)


def prepare_data(
    pipe,
    retain: list[str],
    forget: list[tuple[str, str]],
    cfg: FinetuneConfig,
    cache: Path,
    progress: bool = False,
    retain_images: list[tuple[Path, str]] = (),
    forget_images: list[tuple[Path, str, str]] = (),
) -> TrainingData:
    """Sample the teacher `samples_per_prompt` times per prompt with DDIM (once: reused from
    `cache` when its settings match), encode the given images with the VAE, embed every prompt.

    forget: (forget prompt, anchor prompt) pairs, x_0 from the teacher; retain_images: (image,
    caption) and forget_images: (image, forget prompt, anchor prompt) take x_0 from real images.
    """
    from diffusers import DDIMScheduler
    from safetensors import safe_open
    from safetensors.torch import save_file

    captions = [c for _, c in retain_images] + [c for _, c, _ in forget_images]
    anchors = [a for _, a in forget] + [a for _, _, a in forget_images]
    sampled = list(dict.fromkeys(["", *retain, *(p for p, _ in forget), *anchors]))
    prompts = list(dict.fromkeys([*sampled, *captions]))
    pid = {p: i for i, p in enumerate(prompts)}
    n = cfg.samples_per_prompt
    key = json.dumps(
        {"prompts": sampled, "n": n, "steps": cfg.sample_steps, "guidance": cfg.sample_guidance, "seed": cfg.seed}
    )
    latents = None
    if cache.is_file():
        with safe_open(cache, "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                latents = f.get_tensor("latents")
                logger.info("finetune: reusing %d teacher samples from %s", len(latents), cache)
    if latents is None:
        unet = pipe.unet
        vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        size = unet.config.sample_size
        shape = (len(sampled) * n, unet.config.in_channels, size, size)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(cfg.seed))
        every = [p for p in sampled for _ in range(n)]
        scheduler = pipe.scheduler
        pipe.scheduler = DDIMScheduler.from_config(scheduler.config)
        chunks = []
        try:
            from tqdm.auto import tqdm

            for start in tqdm(range(0, len(every), 64), desc="teacher samples", disable=not progress):
                batch = every[start : start + 64]
                with torch.no_grad():
                    chunks.append(
                        pipe(
                            prompt=batch,
                            latents=noise[start : start + len(batch)].to(pipe.device, unet.dtype),
                            num_inference_steps=cfg.sample_steps,
                            guidance_scale=cfg.sample_guidance,
                            height=size * vae_scale,
                            width=size * vae_scale,
                            output_type="latent",
                        )
                        .images.float()
                        .cpu()
                    )
        finally:
            pipe.scheduler = scheduler
        latents = torch.cat(chunks)
        save_file({"latents": latents.contiguous()}, cache, metadata={"key": key})

    def rows(prompt: str) -> list[int]:
        return [pid[prompt] * n + i for i in range(n)]

    retain_rows = [r for p in retain for r in rows(p)]
    retain_pids = [pid[p] for p in retain for _ in range(n)]
    forget_rows, forget_pids, anchor_pids, anchor_rows = [], [], [], []
    for prompt, anchor in forget:
        forget_rows += rows(prompt)
        forget_pids += [pid[prompt]] * n
        anchor_pids += [pid[anchor]] * n
        anchor_rows += rows(anchor)
    if retain_images or forget_images:  # real images: one x_0 row each, after the teacher samples
        first = len(latents)
        latents = torch.cat(
            [latents, encode_images(pipe, [p for p, _ in retain_images] + [p for p, *_ in forget_images])]
        )
        retain_rows += range(first, first + len(retain_images))
        retain_pids += [pid[c] for _, c in retain_images]
        first += len(retain_images)
        for i, (_, prompt, anchor) in enumerate(forget_images):
            forget_rows.append(first + i)
            forget_pids.append(pid[prompt])
            anchor_pids.append(pid[anchor])
            anchor_rows.append(rows(anchor)[i % n])
    long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return TrainingData(
        latents=latents,
        emb=encode_prompts(pipe, prompts),
        retain_rows=long(retain_rows),
        retain_pids=long(retain_pids),
        forget_rows=long(forget_rows),
        forget_pids=long(forget_pids),
        anchor_pids=long(anchor_pids),
        anchor_rows=long(anchor_rows),
        ids=pipe.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt").input_ids,
    )


# ----------------------------------------------------------------------------------------------
# Models: block features and the student with its feature projections


def block_names(unet) -> list[str]:
    names = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
    if unet.mid_block is not None:
        names.append("mid_block")
    return names + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]


def forward_with_features(unet, names: list[str], x_t, t, emb) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """UNet prediction (B, C, h, w) and the output of each named block (first tuple element).

    Hooks live only for this call, so copies of the model never share them."""
    features: dict[str, torch.Tensor] = {}
    modules = dict(unet.named_modules())

    def hook_for(name):
        def hook(module, inputs, output):
            features[name] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [modules[name].register_forward_hook(hook_for(name)) for name in names]
    try:
        out = unet(x_t, t, encoder_hidden_states=emb).sample
    finally:
        for handle in handles:
            handle.remove()
    return out, features


class DistillStudent(nn.Module):
    """The student UNet plus one learned 1x1 projection per feature-KD block whose width differs
    from the teacher's (student channels -> teacher channels). Only `unet` is kept at the end."""

    def __init__(self, unet, kd_widths: dict[str, tuple[int, int]]):
        super().__init__()
        self.unet = unet
        self.kd_blocks = list(kd_widths)
        self.projections = nn.ModuleDict(
            {name.replace(".", "_"): nn.Conv2d(s, t, 1) for name, (s, t) in kd_widths.items() if s != t}
        )

    def forward(self, x_t, t, emb, features: bool = True):
        if not features:
            return self.unet(x_t, t, encoder_hidden_states=emb).sample, {}
        out, feats = forward_with_features(self.unet, self.kd_blocks, x_t, t, emb)
        for name in self.kd_blocks:
            key = name.replace(".", "_")
            if key in self.projections:
                feats[name] = self.projections[key](feats[name])
        return out, feats


def kd_block_widths(student, teacher, data: TrainingData, mode: str) -> dict[str, tuple[int, int]]:
    """Blocks compared by L_featKD: name -> (student width, teacher width). Blocks missing in one
    model or with other spatial sizes are skipped; other widths are projected or skipped (`mode`)."""
    x = data.latents[:2]
    t = torch.tensor([500, 500])
    emb = data.emb[[0, 0]]
    device = next(student.parameters()).device
    was_training = student.training
    student.eval()
    with torch.no_grad():  # every input on its model's device: the timestep too (CUDA)
        names = [n for n in block_names(student) if n in block_names(teacher)]
        _, s_feats = forward_with_features(student, names, x.to(device), t.to(device), emb.to(device))
        tdev = next(teacher.parameters()).device
        _, t_feats = forward_with_features(teacher, list(s_feats), x.to(tdev), t.to(tdev), emb.to(tdev))
    student.train(was_training)
    widths = {}
    for name, s in s_feats.items():
        ref = t_feats[name]
        if s.shape[2:] != ref.shape[2:] or (mode == "matching" and s.shape[1] != ref.shape[1]):
            continue
        widths[name] = (s.shape[1], ref.shape[1])
    skipped = [n for n in s_feats if n not in widths]
    if skipped:
        logger.info("finetune: feature KD skips blocks %s (feature_kd=%s)", skipped, mode)
    return widths


# ----------------------------------------------------------------------------------------------
# Losses


def _generator(cfg: FinetuneConfig, step: int, stream: int) -> torch.Generator:
    """Every random draw of a step comes from (seed, step, stream): resumed runs repeat it exactly."""
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 16 + stream)


def lower_batch(data: TrainingData, cfg: FinetuneConfig, step: int, stream: int, num_timesteps: int):
    """Global retain batch: x0 (B, C, h, w), noise, t (B,), prompt ids (B,) with dropout to ""."""
    g = _generator(cfg, step, stream)
    idx = torch.randint(len(data.retain_rows), (cfg.batch_size,), generator=g)
    x0 = data.latents[data.retain_rows[idx]]
    pids = data.retain_pids[idx]
    drop = torch.rand(cfg.batch_size, generator=g) < cfg.prompt_dropout
    pids = torch.where(drop, torch.zeros_like(pids), pids)
    t = torch.randint(0, num_timesteps, (cfg.batch_size,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    return x0, noise, t, pids


def upper_batch(data: TrainingData, cfg: FinetuneConfig, step: int, stream: int, num_timesteps: int):
    """Global forget batch: x0, noise, t, forget prompt ids, anchor prompt ids."""
    g = _generator(cfg, step, stream)
    idx = torch.randint(len(data.forget_rows), (cfg.upper_batch_size,), generator=g)
    rows = data.anchor_rows if OBJECTIVE_LATENTS[cfg.objective] == "anchor" else data.forget_rows
    x0 = data.latents[rows[idx]]
    t = torch.randint(0, num_timesteps, (cfg.upper_batch_size,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    return x0, noise, t, data.forget_pids[idx], data.anchor_pids[idx]


def min_snr_weights(scheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """(B,) min-SNR-γ loss weights (Hang et al. 2023); all ones when γ = 0."""
    if gamma <= 0:
        return torch.ones(t.shape, device=t.device)
    alphas = scheduler.alphas_cumprod.to(t.device)[t].float()
    snr = alphas / (1 - alphas)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else clipped / snr


def denoising_loss(pred, target, weights) -> torch.Tensor:
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()


# ----------------------------------------------------------------------------------------------
# Training loop


def latest_checkpoint(folder: Path) -> Path | None:
    done = sorted(p for p in folder.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def save_checkpoint(folder: Path, step: int, modules: dict[str, nn.Module], optimizers: dict) -> None:
    """Write checkpoint `step` atomically (a temporary folder renamed): every module's weights in
    one safetensors file (keys prefixed "<name>."), the optimisers' states and the step; older
    checkpoints are then removed. Main process only."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state = {
        f"{name}.{k}": v.detach().cpu().contiguous() for name, m in modules.items() for k, v in m.state_dict().items()
    }
    save_file(state, tmp / "model.safetensors")
    torch.save({name: opt.state_dict() for name, opt in optimizers.items()}, tmp / "optim.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step}) + "\n")
    final = folder / f"step-{step:07d}"
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in folder.glob("step-*"):
        if old != final:
            shutil.rmtree(old)


def load_checkpoint(folder: Path, modules: dict[str, nn.Module], optimizers: dict, device) -> int:
    """Restore the latest checkpoint of `folder` into `modules` and `optimizers` (the names
    `save_checkpoint` was given); returns its step, 0 when there is none."""
    from safetensors.torch import load_file

    last = latest_checkpoint(folder)
    if last is None:
        return 0
    state = load_file(last / "model.safetensors")
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    saved = torch.load(last / "optim.pt", map_location=device, weights_only=True)
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(saved[name])
    step = json.loads((last / "state.json").read_text())["step"]
    logger.info("finetune: resuming at step %d from %s", step, last)
    return step


def restart_losses(losses_file: Path, start: int) -> None:
    """Keep the per-step loss records before `start`: a resumed run writes the rest again."""
    losses_file.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if losses_file.is_file():
        kept = [line for line in losses_file.read_text().splitlines() if json.loads(line)["step"] < start]
    losses_file.write_text("".join(line + "\n" for line in kept))


def bome_direction(
    grad_f: list[torch.Tensor], grad_q: list[torch.Tensor], eta: float
) -> tuple[list[torch.Tensor], float]:
    """BOME's update direction d = ∇f + λ∇q with λ = max((φ − <∇f, ∇q>)/|∇q|², 0), φ = η|∇q|²: the
    smallest λ >= 0 with <d, ∇q> >= η|∇q|², so every step closes the gap q at least as fast as η∇q
    alone would, and λ = 0 where ∇f already does. Gradients: one tensor per parameter, in the same
    order; returns (d, λ); λ = 0 where ∇q = 0."""
    dot = sum((f.double() * q.double()).sum() for f, q in zip(grad_f, grad_q, strict=True))
    norm = sum((q.double() ** 2).sum() for q in grad_q)
    if not norm > 0:
        return list(grad_f), 0.0
    lam = max(eta - float(dot / norm), 0.0)
    return [f + lam * q for f, q in zip(grad_f, grad_q, strict=True)], lam


def train(
    student,
    teacher,
    data: TrainingData,
    cfg: FinetuneConfig,
    scheduler_config: dict,
    out_dir: Path,
    progress: bool = False,
    stop_after: int | None = None,
    prompt_encoder=None,
):
    """Train `student` (in place, also returned) against the frozen `teacher`.

    prompt_encoder: a `toolchain.attacks.PromptEncoder` of the teacher's text encoder; needed by
    `robust` (the attack optimises prefix tokens through it).

    Writes `out_dir/losses.jsonl` and `out_dir/checkpoints/`, resuming from the latest checkpoint
    there. `stop_after`: end after that many steps of this call (tests simulate a killed run).
    Returns (student, summary dict).
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    if cfg.unlearns and len(data.forget_rows) == 0:
        raise ConfigError(f"finetune.mode={cfg.mode} needs forget prompts; pass --erase CONCEPT")
    robust = cfg.robust and cfg.unlearns
    if robust and (prompt_encoder is None or data.ids is None):
        raise ConfigError(
            "finetune.robust=true attacks the forget prompts through the text encoder: pass "
            "prompt_encoder=toolchain.attacks.PromptEncoder(...) and data from prepare_data (with ids)"
        )
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    world, rank = accelerator.num_processes, accelerator.process_index
    for name in ("batch_size", "upper_batch_size"):
        if getattr(cfg, name) % (world * cfg.gradient_accumulation_steps):
            raise ConfigError(
                f"finetune.{name}={getattr(cfg, name)} must be divisible by processes ({world}) x "
                f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps})"
            )
    device = accelerator.device
    noise_scheduler = DDPMScheduler.from_config(scheduler_config)
    diffusion_target(noise_scheduler, data.latents[:1], data.latents[:1], torch.tensor([0]))  # checks the type
    num_timesteps = noise_scheduler.config.num_train_timesteps
    objective = get_objective(cfg.objective)

    teacher = teacher.to(device).eval().requires_grad_(False)
    student = student.to(device).train()
    student.requires_grad_(True)
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    kd_widths = kd_block_widths(student, teacher, data, cfg.feature_kd) if cfg.w_feat > 0 else {}
    torch.manual_seed(cfg.seed)  # the projections' initialisation
    model = DistillStudent(student, kd_widths).to(device)
    penalty = cfg.mode == "bilevel-penalty"
    subset = [p for _, p in trainable_parameters(student, cfg.trainable)]
    subset_ids = {id(p) for p in subset}
    adamw = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    params = list(model.parameters())
    is_upper = [id(p) in subset_ids for p in params]
    if penalty:  # BOME: the inner optimiser trains the copy's lower variables, the outer one moves all
        copy_model = copy.deepcopy(model)
        copy_lower = [c for c, up in zip(copy_model.parameters(), is_upper, strict=True) if not up]
        lower = [p for p, up in zip(params, is_upper, strict=True) if not up]
        lower_opt = torch.optim.AdamW(copy_lower, lr=cfg.lower_lr, **adamw)
        groups = [{"params": subset, "lr": cfg.upper_lr}, {"params": lower, "lr": cfg.lower_lr}]
        upper_opt = torch.optim.AdamW(groups, **adamw)
        model, copy_model, lower_opt, upper_opt = accelerator.prepare(model, copy_model, lower_opt, upper_opt)
    else:
        copy_model = None
        lower_opt = torch.optim.AdamW(model.parameters(), lr=cfg.lower_lr, **adamw)
        upper_opt = torch.optim.AdamW(subset, lr=cfg.upper_lr, **adamw)
        model, lower_opt, upper_opt = accelerator.prepare(model, lower_opt, upper_opt)
    unwrapped = accelerator.unwrap_model(model)

    # ---- resume
    ckpt_dir = out_dir / CHECKPOINTS
    losses_file = out_dir / LOSSES_FILE
    modules = {"model": unwrapped}  # bilevel-penalty's copy starts from the model every step
    optimizers = {"lower": lower_opt, "upper": upper_opt}
    start = load_checkpoint(ckpt_dir, modules, optimizers, device)
    if accelerator.is_main_process:
        restart_losses(losses_file, start)

    def local(x: torch.Tensor, micro: int) -> torch.Tensor:
        """This process's micro-batch `micro` of a global batch."""
        per = len(x) // (world * cfg.gradient_accumulation_steps)
        first = (rank * cfg.gradient_accumulation_steps + micro) * per
        return x[first : first + per].to(device)

    def check(value: float, what: str, step: int) -> None:
        if not math.isfinite(value) or value > cfg.max_loss:
            good = latest_checkpoint(ckpt_dir)
            raise TrainingDivergedError(
                f"finetune diverged at step {step}: {what} loss = {value:.4g} (finetune.max_loss={cfg.max_loss}); "
                f"last good checkpoint: {good or 'none'}. Lower finetune.lower_lr/upper_lr or raise max_loss"
            )

    def lower_loss(net, batch, micro) -> tuple[torch.Tensor, dict[str, float]]:
        x0, noise, t, pids = (local(v, micro) for v in batch)
        emb = data.emb.to(device)[pids]
        x_t = noise_scheduler.add_noise(x0, noise, t)
        target = diffusion_target(noise_scheduler, x0, noise, t)
        with accelerator.autocast():
            with torch.no_grad():
                t_out, t_feats = forward_with_features(teacher, list(kd_widths), x_t, t, emb)
            s_out, s_feats = net(x_t, t, emb)
        l_diff = denoising_loss(s_out, target, min_snr_weights(noise_scheduler, t, cfg.snr_gamma))
        l_out = F.mse_loss(s_out.float(), t_out.float())
        l_feat = (
            torch.stack([F.mse_loss(s_feats[n].float(), t_feats[n].float()) for n in kd_widths]).mean()
            if kd_widths
            else torch.zeros((), device=device)
        )
        loss = cfg.w_diff * l_diff + cfg.w_out * l_out + cfg.w_feat * l_feat
        return loss, {"diff": l_diff.item(), "out_kd": l_out.item(), "feat_kd": l_feat.item()}

    def student_fn(x_t, t, emb):
        return model(x_t, t, emb, features=False)[0]

    def teacher_fn(x_t, t, emb):
        with torch.no_grad():
            return teacher(x_t, t, encoder_hidden_states=emb).sample

    def upper_loss(batch, micro, attacked=None) -> torch.Tensor:
        """The objective on a forget batch; `attacked` (B, L, D): adversarial forget conditioning."""
        x0, noise, t, fpids, apids = (local(v, micro) for v in batch)
        emb = data.emb.to(device)
        forget = ForgetBatch(
            x_t=noise_scheduler.add_noise(x0, noise, t),
            t=t,
            cond=emb[fpids] if attacked is None else local(attacked, micro),
            uncond=emb[torch.zeros_like(fpids)],
            anchor=emb[apids],
            plain=None if attacked is None else emb[fpids],
        )
        with accelerator.autocast():
            return objective(student_fn, teacher_fn, forget, cfg)

    robust_cost = {"attack_s": 0.0, "attacks": 0, "retain_s": 0.0}
    if robust:
        prompt_encoder.text_encoder.to(device).requires_grad_(False)

    def robust_conditioning(batch, step: int) -> torch.Tensor | None:
        """AdvUnlearn's inner level: `robust_attack_steps` steps of the `robust_attack` attack
        (toolchain/attacks.py) against the current student on every other forget example (share
        `robust_attacked_share`, one prefix each); returns the forget conditioning (B, L, D) with
        those rows attacked and the rest plain, or None when not robust. Keeping plain rows keeps
        the plain prompts erased while the attacked ones are added. Every process attacks the
        whole global batch (same seed, same weights: same result)."""
        if not robust:
            return None
        from toolchain.attacks import prefix_attack, soft_prefix_attack

        started_at = time.perf_counter()
        x0, noise, t, fpids, _ = batch
        cond = data.emb[fpids].clone()
        rows = torch.arange(len(fpids))[: max(1, round(cfg.robust_attacked_share * len(fpids)))]
        if cfg.robust_attacked_share > 0:
            x_t = noise_scheduler.add_noise(x0[rows], noise[rows], t[rows])
            with torch.no_grad():
                target = teacher(x_t.to(device), t[rows].to(device), encoder_hidden_states=cond[rows].to(device)).sample
            ids = data.ids[fpids[rows]]
            seed = cfg.seed * 1_000_003 + step
            args = (unwrapped.unet, prompt_encoder, target, x_t, t[rows], ids, cfg.robust_prefix_tokens)
            if cfg.robust_attack == "embedding":
                attacked, _ = soft_prefix_attack(*args, cfg.robust_attack_steps, cfg.robust_attack_lr, seed=seed)
            else:
                found = prefix_attack(
                    *args, cfg.robust_attack_steps, candidates=cfg.robust_attack_candidates, seed=seed
                )
                with torch.no_grad():
                    prefix = prompt_encoder.table[found.prefix_ids.to(prompt_encoder.table.device)]
                    attacked = prompt_encoder.encode_embeddings(prompt_encoder.with_prefix(ids, prefix))
            cond[rows] = attacked.float().cpu()
        robust_cost["attack_s"] += time.perf_counter() - started_at
        robust_cost["attacks"] += 1
        return cond.to(device)

    def retain_kd_loss(batch, micro) -> torch.Tensor:
        """The robust option's retain term: MSE(S(x_t, c_r), T(x_t, c_r)) on retain data."""
        x0, noise, t, pids = (local(v, micro) for v in batch)
        x_t = noise_scheduler.add_noise(x0, noise, t)
        emb = data.emb.to(device)[pids]
        with accelerator.autocast():
            return F.mse_loss(student_fn(x_t, t, emb).float(), teacher_fn(x_t, t, emb).float())

    def retain_denoising_loss(batch, micro) -> torch.Tensor:
        """EraseDiff's L_r: the ordinary (min-SNR) denoising loss of the student on retain data."""
        x0, noise, t, pids = (local(v, micro) for v in batch)
        x_t = noise_scheduler.add_noise(x0, noise, t)
        with accelerator.autocast():
            pred = student_fn(x_t, t, data.emb.to(device)[pids])
        return denoising_loss(
            pred, diffusion_target(noise_scheduler, x0, noise, t), min_snr_weights(noise_scheduler, t, cfg.snr_gamma)
        )

    def backward(loss_of_micro, net, scale: float = 1.0) -> float:
        """Accumulate gradients of a loss over the micro-batches; returns the global mean."""
        total = 0.0
        n = cfg.gradient_accumulation_steps
        for micro in range(n):
            sync = contextlib.nullcontext() if micro == n - 1 else accelerator.no_sync(net)
            with sync:
                loss = loss_of_micro(micro) / n
                accelerator.backward(loss * scale)
            total += loss.detach()
        return accelerator.reduce(torch.as_tensor(total, device=device).float(), reduction="mean").item()

    def lower_lr(step: int) -> float:
        return cfg.lower_lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lower_lr

    def lower_step(step: int, net, optimizer, stream: int) -> dict[str, float]:
        optimizer.zero_grad(set_to_none=True)
        batch = lower_batch(data, cfg, step, stream, num_timesteps)
        parts: dict[str, float] = {}

        def loss_of(micro):
            loss, p = lower_loss(net, batch, micro)
            for k, v in p.items():
                parts[k] = parts.get(k, 0.0) + v / cfg.gradient_accumulation_steps
            return loss

        value = backward(loss_of, net)
        check(value, "lower", step)
        for group in optimizer.param_groups:
            group["lr"] = lower_lr(step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"lower": value, **parts}

    def upper_step(step: int) -> dict[str, float]:
        upper_opt.zero_grad(set_to_none=True)
        lower_opt.zero_grad(set_to_none=True)
        batch = upper_batch(data, cfg, step, 1, num_timesteps)
        attacked = robust_conditioning(batch, step)
        record: dict[str, float] = {}
        if cfg.objective != "erasediff":
            value = backward(lambda m: upper_loss(batch, m, attacked), model)
            check(value, "upper", step)
            record["upper"] = value
        else:
            retain = lower_batch(data, cfg, step, 2, num_timesteps)
            if cfg.erasediff_inner_steps:  # L_f* ≈ min L_f: K steps on a copy, then restore
                saved = [p.detach().clone() for p in subset]
                inner = torch.optim.SGD(subset, lr=cfg.upper_lr)
                values = []
                for k in range(cfg.erasediff_inner_steps):
                    inner.zero_grad(set_to_none=True)
                    b = upper_batch(data, cfg, step, 3 + k, num_timesteps)
                    values.append(backward(lambda m, b=b: upper_loss(b, m), model))
                    inner.step()
                with torch.no_grad():
                    for p, s in zip(subset, saved, strict=True):
                        p.copy_(s)
                model.zero_grad(set_to_none=True)
                record["forget_min"] = sum(values) / len(values)
            lam = cfg.erasediff_lambda  # step on ∇L_r + λ∇q, ∇q = ∇L_f (L_f* is a constant)
            l_r = backward(lambda m: retain_denoising_loss(retain, m), model)
            l_f = backward(lambda m: upper_loss(batch, m, attacked), model, scale=lam)
            check(l_r + lam * l_f, "upper", step)
            record.update(upper=l_r + lam * l_f, retain=l_r, forget=l_f, erasediff_lambda=lam)
            if "forget_min" in record:
                record["forget_gap"] = l_f - record["forget_min"]
        if robust and cfg.robust_retain_weight > 0:
            started_at = time.perf_counter()
            retain_batch = lower_batch(data, cfg, step, 5, num_timesteps)
            record["robust_retain"] = backward(
                lambda m: retain_kd_loss(retain_batch, m), model, scale=cfg.robust_retain_weight
            )
            robust_cost["retain_s"] += time.perf_counter() - started_at
        upper_opt.step()
        upper_opt.zero_grad(set_to_none=True)
        lower_opt.zero_grad(set_to_none=True)
        return record

    def take_grads(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The accumulated gradients of `tensors` (zeros where none), which are left without one."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in tensors]
        for p in tensors:
            p.grad = None
        return grads

    def penalty_step(step: int) -> dict[str, float]:
        """BOME's step (module docstring): ϑ_K on the copy, q's gradient, d = ∇L_CU + λ∇q on every parameter."""
        plain_copy = list(accelerator.unwrap_model(copy_model).parameters())
        with torch.no_grad():  # ϑ_0 = ϑ; the copy's θ_u stay equal to θ_u (the inner optimiser skips them)
            for c, p in zip(plain_copy, params, strict=True):
                c.copy_(p)
        record: dict[str, float] = {}
        for k in range(cfg.inner_steps):
            record["inner"] = lower_step(step, copy_model, lower_opt, 4 + k)["lower"]
        upper_opt.zero_grad(set_to_none=True)
        batch = upper_batch(data, cfg, step, 1, num_timesteps)
        attacked = robust_conditioning(batch, step)  # no robust retain term: L_ft is the retain term here
        record["upper"] = backward(lambda m: upper_loss(batch, m, attacked), model)
        check(record["upper"], "upper", step)
        grad_f = take_grads(params)
        retain = lower_batch(data, cfg, step, 0, num_timesteps)
        record["lower"] = backward(lambda m: lower_loss(model, retain, m)[0], model)
        check(record["lower"], "lower", step)
        grad_q = take_grads(params)  # ∇L_ft(θ_u, ϑ); minus ∇θ_u L_ft(θ_u, ϑ_K) below
        take_grads(plain_copy)  # the inner steps left gradients on the copy's θ_u
        record["lower_inner"] = backward(lambda m: lower_loss(copy_model, retain, m)[0], copy_model)
        for i, (c, up) in enumerate(zip(take_grads(plain_copy), is_upper, strict=True)):
            if up:
                grad_q[i] = grad_q[i] - c
        direction, lam = bome_direction(grad_f, grad_q, cfg.penalty_eta)
        for p, d in zip(params, direction, strict=True):
            p.grad = d
        upper_opt.param_groups[1]["lr"] = lower_lr(step)
        upper_opt.step()
        upper_opt.zero_grad(set_to_none=True)
        record.update(gap=record["lower"] - record["lower_inner"], penalty_lambda=lam)
        return record

    def checkpoint(step: int) -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_checkpoint(ckpt_dir, step, modules, optimizers)
        accelerator.wait_for_everyone()

    distill_until = cfg.steps - cfg.sequential_unlearn_steps if cfg.mode == "sequential" else cfg.steps
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    bar = tqdm(
        range(start, end),
        initial=start,
        total=cfg.steps,
        desc=f"finetune {cfg.mode}",
        disable=not (progress and accelerator.is_main_process),
    )
    started = time.perf_counter()
    last_record: dict[str, float] = {}
    for step in bar:
        if penalty:
            record = penalty_step(step)
        elif cfg.mode == "sequential" and step >= distill_until:
            record = upper_step(step)
        else:
            record = lower_step(step, model, lower_opt, 0)
            if cfg.mode == "bilevel" and (step + 1) % cfg.upper_every == 0:
                record.update(upper_step(step))
        last_record = {"step": step, **{k: round(v, 6) for k, v in record.items()}}
        if accelerator.is_main_process:
            with losses_file.open("a") as f:
                f.write(json.dumps(last_record) + "\n")
        bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k in ("lower", "upper")})
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            checkpoint(step + 1)
    wall = time.perf_counter() - started
    accelerator.wait_for_everyone()
    student = unwrapped.unet
    if cfg.gradient_checkpointing:
        student.disable_gradient_checkpointing()
    summary = {
        "mode": cfg.mode,
        "objective": cfg.objective if cfg.unlearns else None,
        "steps": cfg.steps,
        "resumed_at": start,
        "processes": world,
        "wall_s": round(wall, 2),
        "feature_kd_blocks": {k: list(v) for k, v in kd_widths.items()},
        "final": last_record,
    }
    if robust:  # the robust option's extra cost, inside wall_s
        summary["robust"] = {k: round(v, 2) if isinstance(v, float) else v for k, v in robust_cost.items()}
    return student.eval(), summary


# ----------------------------------------------------------------------------------------------
# The stage


def run(source: Artifact, settings: FinetuneSettings, ctx) -> Artifact | None:
    """The stage; in a multi-process launch every process trains and the main one returns the
    artifact (the others None)."""
    from toolchain.models.io import component_params

    cfg, erase = settings.finetune, list(settings.erase)
    if cfg.mode == "sfd":  # Score Forgetting Distillation to a k-step generator: its own loop
        from toolchain.onestep import run_sfd

        return run_sfd(source, cfg, erase, ctx)
    concepts = check_config(cfg, erase)
    retain_images = read_image_folder(Path(cfg.retain_data)) if cfg.retain_data else []
    retain = [] if retain_images else retain_prompt_list(cfg, concepts)
    forget, forget_images = [], []
    for concept in concepts if cfg.unlearns else []:
        if concept.images:  # concept images instead of the teacher's samples of the concept
            pairs = read_image_folder(Path(concept.images), concept.erase_prompts)
            forget_images += [(image, text, concept.anchor_prompt) for image, text in pairs]
        else:
            forget += [(p, concept.anchor_prompt) for p in concept.erase_prompts]
    out = ctx.out_dir
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # several processes under `accelerate launch` / torchrun: one per device (as Accelerator() sets up)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    teacher_pipe = load_pipeline(ctx.chain[0].files).to(state.device)
    with state.main_process_first():  # the main process samples the teacher, the others read its cache
        data = prepare_data(
            teacher_pipe, retain, forget, cfg, out / SAMPLES_FILE, ctx.progress, retain_images, forget_images
        )
    scheduler_config = dict(teacher_pipe.scheduler.config)
    student = load_unet(source.files / "unet")
    prompt_encoder = None
    if cfg.robust:
        from toolchain.attacks import PromptEncoder

        prompt_encoder = PromptEncoder(teacher_pipe.text_encoder, teacher_pipe.tokenizer)
    student, summary = train(
        student, teacher_pipe.unet, data, cfg, scheduler_config, out, ctx.progress, prompt_encoder=prompt_encoder
    )
    if not state.is_main_process:
        return None  # the main process writes the artifact

    link_pipeline(source.files, out, skip=("unet", SAMPLES_FILE, LOSSES_FILE, CHECKPOINTS))
    record_file = source.files / "unet" / PRUNING_RECORD
    record = json.loads(record_file.read_text()) if record_file.is_file() else None
    save_unet(student, out / "unet", record)
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)  # the sealed folder is a pipeline, not a run
    summary.update(
        erase=erase,
        retain_prompts=len(retain),
        forget_prompts=len(forget),
        retain_images=len(retain_images),
        forget_images=len(forget_images),
    )
    logger.info("finetune: %s done in %.1f s: %s", cfg.mode, summary["wall_s"], summary["final"])
    return Artifact(
        path=out,
        kind="diffusers",
        records={"finetune": summary},
        metrics={"params": component_params(out), "size_bytes": folder_size(out)},
    )
