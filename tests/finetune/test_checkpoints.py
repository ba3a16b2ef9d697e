"""toolchain.finetune.checkpoints: Accelerate's save_state/load_state plus the step, atomic and
resumable bit for bit (the loops' resume tests are in test_finetune.py and test_sfd.py)."""

import json

import torch


def _prepared(seed: int):
    from accelerate import Accelerator

    torch.manual_seed(seed)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def _train_step(model, optimizer, step: int) -> None:
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(step))
    model(x).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_a_checkpoint_restores_weights_and_moments_bit_for_bit(tmp_path):
    from toolchain.finetune.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint

    accelerator, model, optimizer = _prepared(0)
    for step in range(3):
        _train_step(model, optimizer, step)
        save_checkpoint(accelerator, tmp_path, step + 1)
    last = latest_checkpoint(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["step-0000003"] == [last.name], "older ones are removed"
    assert {"model.safetensors", "optimizer.bin", "state.json"} <= {p.name for p in last.iterdir()}
    assert json.loads((last / "state.json").read_text()) == {"step": 3}

    other, fresh, fresh_opt = _prepared(1)  # other initial weights, no moments
    assert load_checkpoint(other, tmp_path) == 3
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    _train_step(model, optimizer, 3)
    _train_step(fresh, fresh_opt, 3)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), "the optimiser moments came back too"


def test_incomplete_or_older_checkpoints_are_not_resumed(tmp_path):
    from toolchain.finetune.checkpoints import load_checkpoint

    accelerator, _, _ = _prepared(0)
    (tmp_path / "step-0000004").mkdir()  # killed before save_state finished: no state.json
    (tmp_path / "step-0000004" / "optimizer.bin").write_bytes(b"")
    (tmp_path / "step-0000002").mkdir()  # the safetensors + optim.pt format before save_state
    (tmp_path / "step-0000002" / "state.json").write_text('{"step": 2}\n')
    assert load_checkpoint(accelerator, tmp_path) == 0
