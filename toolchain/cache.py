"""The cross-run cache: what costs the same for every run of one model, made once per key.

Its root is `--cache-dir`, else $COMPRESS_CACHE, else $XDG_CACHE_HOME/diffusion-compress (default
~/.cache/diffusion-compress). An entry is a folder `<root>/<kind>/<digest>` named by the hash of
its key (a fingerprint and the settings that shape the entry) and holding `cache.json` (the key
and what the builder returned). It is built in a temporary folder beside it under a file lock and
renamed into place only when complete, so a crashed build leaves no entry and two processes never
build the same entry at once. compress writes only under the root and never deletes an entry; the
report gives each entry's size.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV = "COMPRESS_CACHE"
ENTRY = "cache.json"


def default_cache_dir() -> Path:
    """$COMPRESS_CACHE, else $XDG_CACHE_HOME/diffusion-compress, else ~/.cache/diffusion-compress."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "diffusion-compress"


def key_digest(key: dict[str, Any]) -> str:
    """A short, stable name for `key` (JSON-serialisable)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def entry_folder(root: Path, kind: str, key: dict[str, Any]) -> Path:
    """Where the entry of `key` lives (complete when it holds cache.json)."""
    return Path(root) / kind / key_digest(key)


def cached_folder(root: Path, kind: str, key: dict[str, Any], build: Callable[[Path], dict]) -> tuple[Path, dict, bool]:
    """The entry of `key` under `root/kind`, built by `build(folder) -> info` when absent.

    Returns (folder, info, hit). `build` writes into an empty temporary folder; an exception there
    leaves no entry (its temporary folder, made by this call, is removed)."""
    from filelock import FileLock

    folder = entry_folder(root, kind, key)
    parent, digest = folder.parent, folder.name
    parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(parent / f".{digest}.lock")):
        if (folder / ENTRY).is_file():
            return folder, json.loads((folder / ENTRY).read_text())["info"], True
        tmp = parent / f".tmp-{digest}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)  # our own name: a build of this key by a crashed process
        tmp.mkdir()
        try:
            info = build(tmp)
            (tmp / ENTRY).write_text(json.dumps({"key": key, "info": info}, indent=2, sort_keys=True, default=str))
            if folder.exists():  # a folder without cache.json is an earlier build's leftover under our name
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder, info, False


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under `folder`."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
