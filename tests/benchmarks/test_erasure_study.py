"""benchmarks/studies/erasure_digits.py: the targets it judges the default recipe by (fail closed,
Wilson upper bound), and the revival fine-tuning it reports (retain data only, resumed exactly)."""

import copy

import pytest
import torch

from benchmarks.studies import erasure_digits as study

from ..finetune.test_finetune import FAST, tiny  # noqa: F401  (module fixture)


def _row(leak_k: int, n: int = 224, attack: bool = True, fid: float = 0.30) -> dict:
    row = {
        "leakage": {"7": study.share(leak_k, n)},
        "heldout": {"7": study.share(0, 96)},
        "retain": study.share(560, 576),
        "fid": fid,
        "wall_s": 1.0,
    }
    if attack:
        row["attack"] = {"7": {"prefix": study.share(1, 112), "soft_prompt": study.share(3, 112), "wall_s": 1.0}}
    return row


def _result(default: dict) -> dict:
    teacher = {**_row(224), "retain": study.share(575, 576), "fid": 0.13}
    groups = {"7": {"teacher": teacher, "seeds": {"0": {"default": default, "distill": _row(30, fid=0.29)}}}}
    settings = {
        "recipe": "default",
        "set": [],
        "finetune": {
            "mode": "bilevel",
            "objective": "esd",
            "esd": {"eta": 2.0, "from_anchor": True},
            "steps": 600,
            "upper_every": 3,
            "batch_size": 16,
            "lower_lr": 1e-4,
            "upper_lr": 5e-4,
        },
        "prune_ratio": 0.3,
        "n_per_prompt": 32,
        "attack": {"images_per_prompt": 16, "n_prompts": 7, "prefix_tokens": 3, "steps": 30, "soft_steps": 30},
        "revival": [50, 200],
        "targets": study.TARGETS,
    }
    settings["attack"]["inversion_steps"] = 100
    machine = {"platform": "test"}
    return {
        "command": "python -m benchmarks.studies.erasure_digits",
        "machine": machine,
        "versions": {},
        **{
            "settings": settings,
            "groups": groups,
        },
    }


def test_leakage_target_is_the_wilson_upper_bound_and_needs_188_images():
    teacher = {"retain": study.share(575, 576)}
    assert study.target_checks(_row(0), teacher, _row(30, fid=0.29))["leakage_upper"] is True  # 0/224: <= 1.7%
    assert study.target_checks(_row(1), teacher, _row(30, fid=0.29))["leakage_upper"] is False  # 1/224: 2.5%
    assert study.target_checks(_row(0, n=150), teacher, None)["leakage_upper"] is False  # 0/150: 2.5%
    # 0/188: 2.0025% (the rounded ci95 reads 2.00%), 0/189: 1.99%; the check uses the counts
    assert study.target_checks(_row(0, n=188), teacher, None)["leakage_upper"] is False
    assert study.target_checks(_row(0, n=189), teacher, None)["leakage_upper"] is True


def test_a_target_not_measured_is_not_met():
    teacher = {"retain": study.share(575, 576)}
    checks = study.target_checks(_row(0, attack=False), teacher, None)
    assert checks["attack"] is None and checks["fid_ratio"] is None
    text = study.to_markdown(_result(_row(0, attack=False)))
    assert "| 0/1 (missed: attack (not measured)) |" in text
    met = study.to_markdown(_result(_row(0)))
    assert "| 1/1 |" in met and "0.0% (0/224, CI 0.0%–1.7%)" in met
    over_fid = study.to_markdown(_result(_row(0, fid=0.33)))  # 0.33 / 0.29 > 1.1
    assert "(missed: fid_ratio)" in over_fid


def test_revival_trains_on_retain_data_only_and_resumes_exactly(tiny, tmp_path):  # noqa: F811
    from toolchain.config import FinetuneConfig

    pipe, student, data, scheduler_config = tiny
    cfg = FinetuneConfig(mode="bilevel", steps=4, **FAST)
    before = copy.deepcopy(student.state_dict())
    seen = {}

    def measure(unet):
        seen[len(seen)] = {k: v.clone() for k, v in unet.state_dict().items()}
        return {"leakage": {}}

    counts = study.revive(student, pipe.unet, data, cfg, [2, 6], scheduler_config, tmp_path / "a", measure)
    assert list(counts) == ["2", "6"]
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())  # the student is not touched
    changed = [k for k in before if not torch.equal(seen[0][k], before[k])]
    assert changed and any(not torch.equal(seen[0][k], seen[1][k]) for k in changed)
    import json

    records = [json.loads(line) for line in (tmp_path / "a" / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(6))
    assert not any("upper" in r for r in records)  # no unlearning step

    straight = {}
    study.revive(
        student, pipe.unet, data, cfg, [6], scheduler_config, tmp_path / "b", lambda u: straight.update(u.state_dict())
    )
    for k, v in seen[1].items():  # 2 steps then 4 more (resumed) = 6 in one go
        assert torch.allclose(v, straight[k], atol=1e-6), k


@pytest.mark.parametrize("name, labels, kept", [("7", ["7"], 9), ("7+1", ["7", "1"], 8)])
def test_groups_erase_each_digit_and_keep_the_others(name, labels, kept):
    group = study.load_group(name)
    assert list(group.erase) == labels and list(group.heldout) == labels
    assert len(group.retain) == kept and not set(labels) & set(group.retain)
    cfg = study.recipe_finetune("default", group, 2, ["steps=10"])
    assert (cfg.mode, cfg.seed, cfg.steps) == ("bilevel", 2, 10)  # compress --erase resolves auto to bilevel


def test_merging_a_merged_file_keeps_the_commands_of_its_parts(tmp_path):
    """A results file assembled from parts, merged again with a new part: the record names every
    part that ran, not the assembled command (which never ran as one)."""
    first = _result(_row(0))
    first["merged"] = ["python -m benchmarks.studies.erasure_digits --groups 7 --seeds 0"]
    new_part = _result(_row(0))
    new_part["command"] = "python -m benchmarks.studies.erasure_digits --groups 7+1@1 --out /tmp/part"
    new_part["groups"] = {"7+1": new_part["groups"]["7"]}
    result = _result(_row(0)) | {"groups": {}}
    study.merge_into(result, first, tmp_path / "a.json")
    study.merge_into(result, new_part, tmp_path / "b.json")
    assert result["merged"] == [first["merged"][0], "python -m benchmarks.studies.erasure_digits --groups 7+1@1"]
    assert set(result["groups"]) == {"7", "7+1"}
    # a part that merged the assembled file and measured more: its parts and its own command
    grown = new_part | {"merged": list(first["merged"]), "measured_here": True}
    again = _result(_row(0)) | {"groups": {}}
    study.merge_into(again, grown, tmp_path / "c.json")
    assert again["merged"] == result["merged"]
