"""Checkpoints of a training run, through Accelerate's `save_state` / `load_state`, and the loss log.

`out_dir/checkpoints/step-NNNNNNN/` holds what `Accelerator.save_state` writes for the modules and
optimisers the loop gave to `accelerator.prepare` (`model.safetensors`, `model_1.safetensors`, ...,
`optimizer.bin`, `optimizer_1.bin`, ..., `scaler.pt` under fp16, `random_states_0.pkl`) plus
what it does not cover: `state.json` with the step. A checkpoint is written into a temporary
folder renamed when complete, so a run killed while saving keeps the previous one; older ones
are then removed. Resuming loads the latest one into the same prepared modules and optimisers:
the weights and optimiser moments come back bit for bit, and every batch is drawn from a
generator seeded by (seed, step, stream), so the resumed run ends with the weights of an
uninterrupted one.

Two choices around `save_state`:
- Weights are saved and loaded unwrapped (a save/load pre-hook replaces the DDP-wrapped state
  dict, whose keys gain "module."), so a checkpoint does not depend on the number of processes.
- Only the main process calls `save_state`. Without DeepSpeed/FSDP it has no collective step, and
  the other processes would write nothing but their global RNG states, which these loops never
  read (every draw has its own seeded generator); so a process other than 0 writes nothing.
Every process calls `load_state` on the same folder (the optimisers live on each of them).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LOSSES_FILE = "losses.jsonl"
STATE_FILE = "state.json"


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint of `folder` (one written before save_state is ignored)."""
    done = sorted(p for p in folder.glob("step-*") if (p / STATE_FILE).is_file() and (p / "optimizer.bin").is_file())
    return done[-1] if done else None


@contextlib.contextmanager
def _unwrapped_weights(accelerator):
    """While it lasts, save_state/load_state see the prepared modules unwrapped."""

    def save_hook(models, weights, output_dir):
        for i, model in enumerate(models):
            weights[i] = accelerator.unwrap_model(model).state_dict()

    def load_hook(models, input_dir):
        models[:] = [accelerator.unwrap_model(model) for model in models]

    handles = [accelerator.register_save_state_pre_hook(save_hook), accelerator.register_load_state_pre_hook(load_hook)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def save_checkpoint(accelerator, folder: Path, step: int) -> None:
    """Write checkpoint `step` of everything `accelerator` prepared; called by every process."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".tmp-step-{step:07d}"
        shutil.rmtree(tmp, ignore_errors=True)
        with _unwrapped_weights(accelerator):
            accelerator.save_state(str(tmp))
        (tmp / STATE_FILE).write_text(json.dumps({"step": step}) + "\n")
        final = folder / f"step-{step:07d}"
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in folder.glob("step-*"):
            if old != final:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, folder: Path) -> int:
    """Restore the latest checkpoint of `folder` into what `accelerator` prepared; returns its
    step, 0 when there is none."""
    last = latest_checkpoint(folder)
    if last is None:
        return 0
    with _unwrapped_weights(accelerator):
        accelerator.load_state(str(last))
    step = json.loads((last / STATE_FILE).read_text())["step"]
    logger.info("finetune: resuming at step %d from %s", step, last)
    return step


def restart_losses(losses_file: Path, start: int) -> None:
    """Keep the per-step loss records before `start`: a resumed run writes the rest again."""
    losses_file.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if losses_file.is_file():
        kept = [line for line in losses_file.read_text().splitlines() if json.loads(line)["step"] < start]
    losses_file.write_text("".join(line + "\n" for line in kept))


def append_loss(losses_file: Path, record: dict) -> None:
    """One step's record as a line of `losses.jsonl`."""
    with losses_file.open("a") as f:
        f.write(json.dumps(record) + "\n")
