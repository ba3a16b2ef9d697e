"""The cross-run cache: an entry is built once per key, atomically, and a failed build leaves none."""

import json

import pytest

from toolchain.cache import ENTRY, cached_folder, default_cache_dir, key_digest


def test_entry_is_built_once_per_key(tmp_path):
    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "model.onnx").write_bytes(b"x" * 10)
        return {"files": ["model.onnx"]}

    first = cached_folder(tmp_path, "exports", {"source": "abc", "opset": 17}, build)
    second = cached_folder(tmp_path, "exports", {"opset": 17, "source": "abc"}, build)  # same key, any order
    other = cached_folder(tmp_path, "exports", {"source": "abc", "opset": 18}, build)
    assert len(calls) == 2 and (first[2], second[2], other[2]) == (False, True, False)
    assert first[0] == second[0] != other[0] and first[0].name == key_digest({"source": "abc", "opset": 17})
    assert second[1] == {"files": ["model.onnx"]} and (first[0] / "model.onnx").read_bytes() == b"x" * 10
    assert json.loads((first[0] / ENTRY).read_text())["key"] == {"opset": 17, "source": "abc"}


def test_failed_build_leaves_no_entry(tmp_path):
    def broken(folder):
        (folder / "half.onnx").write_bytes(b"half")
        raise RuntimeError("exporter crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        cached_folder(tmp_path, "exports", {"source": "abc"}, broken)
    assert [p.name for p in (tmp_path / "exports").iterdir() if not p.name.endswith(".lock")] == []
    folder, info, hit = cached_folder(tmp_path, "exports", {"source": "abc"}, lambda f: {"ok": True})
    assert not hit and info == {"ok": True} and (folder / ENTRY).is_file()


def test_cache_dir_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("COMPRESS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "diffusion-compress"
