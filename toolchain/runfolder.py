"""The run folder (`--out`): what compress may create, replace and remove there.

A run never deletes or modifies anything it did not create. So a run folder carries a marker,
`.compress-run`, listing every top-level entry compress created there and every file it wrote
under `deploy/`; a non-empty `--out` without the marker is refused, and inside a run folder an
entry is removed or replaced only when the marker lists it (deploy folders: every file in them).
`--out` may not overlap the input model, so a run can never write into it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from toolchain.artifact import PARTIAL_SUFFIX
from toolchain.config import ConfigError
from toolchain.models.io import RUN_MARKER as MARKER

LOCK = ".lock"


def check_out_dir(out: Path, model: Path) -> None:
    """Refuse an --out that cannot or must not be written, before anything is created."""
    out, model = out.resolve(), model.resolve()
    if out == model or model in out.parents or out in model.parents:
        raise ConfigError(
            f"--out {out} overlaps --model {model}; a run never writes into its input model: pick an --out "
            "outside the model folder"
        )
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"--out {out}: {probe} is a file, not a folder; pick another --out")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: {probe} is not writable; pick a folder you can write to")
    if out.is_dir() and any(p.name != LOCK for p in out.iterdir()) and not (out / MARKER).is_file():
        raise ConfigError(
            f"--out {out}: not empty and not a compress run folder (no {MARKER}); pick a new or empty folder, "
            "or one an earlier `compress` wrote"
        )


class RunFolder:
    """The marker's record of what compress created in `root` (top-level names and deploy files).

    Only process 0 of a run writes it, under the run lock.
    """

    def __init__(self, root: Path, first_made: Path | None = None):
        self.root = root
        self.first_made = first_made  # the topmost folder this invocation made for `root`, if any
        self.file = root / MARKER
        data = json.loads(self.file.read_text()) if self.file.is_file() else {}
        self.created: set[str] = set(data.get("created", []))
        self.new: set[str] = set()  # created by this invocation (removed again on bad input)

    def create(self) -> None:
        """Make the folder (if needed) and its marker: from here on it is a run folder."""
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.file.is_file():
            self.new.add(MARKER)
        self.record(LOCK)

    def record(self, *rel: str) -> None:
        fresh = [r for r in rel if r not in self.created]
        self.new.update(fresh)
        self.created.update(rel)
        tmp = self.file.with_name(MARKER + ".tmp")
        data = {"tool": "diffusion-compress", "created": sorted(self.created)}
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, self.file)

    def forget(self, rel: str) -> None:
        """`rel` is gone (renamed by a seal): drop it from the record."""
        self.created.discard(rel)
        self.record()

    def owns(self, rel: str) -> bool:
        """True when compress created `rel`; a deliverable folder (`deploy/<target>`) also needs every
        file in it recorded, since users open it and may add their own files."""
        path = self.root / rel
        if rel not in self.created:
            return False
        if rel.startswith("deploy/") and not rel.endswith(PARTIAL_SUFFIX) and path.is_dir():
            return self._all_recorded(path)
        return True

    def _all_recorded(self, path: Path) -> bool:
        for child in path.iterdir():
            rel = child.relative_to(self.root).as_posix()
            if rel in self.created and rel.endswith(PARTIAL_SUFFIX):
                continue  # a staging folder of compress's own
            if not (self._all_recorded(child) if child.is_dir() else rel in self.created):
                return False
        return True

    def check_owned(self, rel: str) -> None:
        """Refuse, before any work, to replace an existing entry compress did not create."""
        if (self.root / rel).exists() and not self.owns(rel):
            raise ConfigError(
                f"--out {self.root}: {rel} was not written by compress, and this run would replace it; "
                "move it out of the run folder or pick another --out"
            )

    def remove(self, rel: str) -> None:
        """Remove an entry compress created; anything else is left alone."""
        path = self.root / rel
        if not path.exists() or not self.owns(rel):
            return
        if path.is_dir():
            files = [p.relative_to(self.root).as_posix() for p in path.rglob("*") if not p.is_dir()]
            shutil.rmtree(path)
            self.created.difference_update(files)
        else:
            path.unlink()
        self.created.discard(rel)
        self.record()

    def remove_new(self) -> None:
        """Undo this invocation (bad input found late): remove every entry it created, and the
        marker and folder too when they are all that is left of it. Call after the lock is released."""
        for rel in sorted(self.new - {MARKER, LOCK}, reverse=True):
            self.remove(rel)
        if MARKER not in self.new or any(p.name not in (MARKER, LOCK) for p in self.root.iterdir()):
            return
        for name in (LOCK, MARKER):
            (self.root / name).unlink(missing_ok=True)
        if self.first_made is None:
            return
        folder = self.root
        while True:  # the folders `mkdir(parents=True)` made for --out, innermost first
            folder.rmdir()
            if folder == self.first_made:
                break
            folder = folder.parent


class RunLock:
    """One writer per run folder: a file lock the OS releases when the process dies."""

    def __init__(self, out: Path):
        self.file = out / LOCK

    def __enter__(self):
        from filelock import FileLock, Timeout

        self.lock = FileLock(self.file, timeout=0)
        try:
            self.lock.acquire()
        except Timeout:
            raise ConfigError(
                f"--out {self.file.parent}: another compress run is writing there; wait or pick another --out"
            ) from None
        return self

    def __exit__(self, *exc):
        self.lock.release()
