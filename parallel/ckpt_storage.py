"""Where checkpoints live: naming, the commit marker, listing, retention, on any fsspec URL.

    step-00000010/           complete: DCP shards + .metadata + meta.json (the commit marker)
    step-00000012.tmp/       being written on a local disk (or left by a crash): never resumed from

On a local disk (or file://) a checkpoint is written under `step-N.tmp` and renamed to `step-N`
once every rank has written its shards: a rename is one atomic step there. Object stores (s3://,
gs://, ...) have no rename, only a copy of every object, so there the shards go straight into
`step-N/`. Either way `meta.json`, written last, is what makes a checkpoint complete: a directory
without it is ignored by resume, so a process killed at any moment leaves nothing resume would
pick. Deleting removes `meta.json` first, so a half-deleted checkpoint never looks complete.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

from parallel.config import ConfigError

META = "meta.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ConfigError):
    """A checkpoint that is missing, incomplete, corrupt or does not fit the job."""


@dataclass
class CheckpointInfo:
    step: int
    path: str
    complete: bool
    meta: dict[str, Any]
    size_bytes: int


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of a local path or fsspec URL, and the path within it."""
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:  # s3:// without s3fs installed; an unknown protocol
        raise CheckpointError(f"checkpoint.dir={url}: {err}") from None
    # fsspec keeps one instance per URL kind in a process, with its directory listings cached;
    # other ranks and other processes (the service) write here too, so never answer from them.
    fs.invalidate_cache()
    return fs, path.rstrip("/")


def join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


WRITER_THREADS = 2
"""Files each rank writes at once: one thread serialises and writes a file while another does the
next, about 3x the bytes/s of one thread for a 600 MB state here (bench/ckpt_bench.py)."""


def writer(url: str) -> FileSystemWriter | FsspecWriter:
    # DCP's own writer for local paths (a file:// URL is stripped to its path), fsspec's otherwise.
    if is_local(url):
        return FileSystemWriter(filesystem(url)[1], thread_count=WRITER_THREADS)
    return FsspecWriter(url, thread_count=WRITER_THREADS)


def reader(url: str) -> FileSystemReader | FsspecReader:
    return FileSystemReader(filesystem(url)[1]) if is_local(url) else FsspecReader(url)


def _read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any] | None:
    """A JSON object from a file, or None if it cannot be read or is not one."""
    try:
        data = json.loads(fs.cat_file(path))
    except (ValueError, OSError):
        return None
    return data if isinstance(data, dict) else None


def delete(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Remove a checkpoint directory: its commit marker first, so that a crash half way
    leaves an incomplete directory, never a complete-looking one with files missing."""
    if fs.exists(join(path, META)):
        fs.rm(join(path, META))
    if fs.exists(path):
        fs.rm(path, recursive=True)


def check_storage(url: str) -> None:
    """Refuse (CheckpointError) a checkpoint.dir that cannot be written, before any process group:
    a filesystem package missing, a read-only place, a path under a file."""
    fs, path = filesystem(url)
    probe = join(path, f".fourfold-probe-{time.time_ns()}")
    try:
        fs.makedirs(path, exist_ok=True)
        fs.pipe_file(probe, b"ok")
        fs.rm(probe)
    except (OSError, ValueError, PermissionError) as err:
        raise CheckpointError(f"checkpoint.dir={url}: cannot write there ({err})") from None


def retained(steps: list[int], keep_last: int, keep_every: int | None) -> set[int]:
    """The complete checkpoints' steps that retention keeps: the newest keep_last, and every
    multiple of keep_every (milestones)."""
    done = sorted(steps)
    keep = set(done[-keep_last:]) if keep_last > 0 else set()
    if keep_every:
        keep |= {s for s in done if s % keep_every == 0}
    return keep


def list_checkpoints(root: str) -> list[CheckpointInfo]:
    """Every step directory under root (complete or not), oldest first."""
    fs, base = filesystem(root)
    if not fs.exists(base):
        return []
    out = []
    for entry in fs.ls(base, detail=True):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        match = _STEP_DIR.match(name.removesuffix(".tmp"))
        if not match or entry["type"] != "directory":
            continue
        path = join(root, name)
        meta = None if name.endswith(".tmp") else _read_json(fs, join(entry["name"], META))
        # Complete: committed (meta.json readable, as the commit writes it whole) with DCP's index.
        complete = meta is not None and fs.exists(join(entry["name"], ".metadata"))
        meta = meta if complete else {}
        size = sum(f["size"] for f in fs.find(entry["name"], detail=True).values())
        out.append(CheckpointInfo(int(match.group(1)), path, complete, meta, size))
    return sorted(out, key=lambda c: (c.step, c.complete))


def latest_complete(root: str) -> str | None:
    done = [c for c in list_checkpoints(root) if c.complete]
    return done[-1].path if done else None


def pick(path: str) -> str:
    """`path` itself if it is a checkpoint, else the newest complete one under it (as checkpoint.dir)."""
    fs, base = filesystem(path)
    if not fs.exists(join(base, META)) and (newest := latest_complete(path)):
        return newest
    return path


def read_meta(path: str) -> dict[str, Any]:
    """meta.json of a complete checkpoint, or a CheckpointError naming what is wrong."""
    fs, base = filesystem(path)
    if not fs.exists(base):
        raise CheckpointError(f"checkpoint {path}: does not exist")
    if not fs.exists(join(base, META)):
        raise CheckpointError(f"checkpoint {path}: incomplete (no {META}; it was never committed)")
    if not fs.exists(join(base, ".metadata")):
        raise CheckpointError(f"checkpoint {path}: corrupt (DCP .metadata is missing)")
    meta = _read_json(fs, join(base, META))
    if meta is None or not isinstance(meta.get("step"), int) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"checkpoint {path}: corrupt {META} (not a JSON object with step and config)")
    return meta


def last_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[-1][:300] if text else type(err).__name__


def prepare(staged: str) -> None:
    """An empty staging directory: whatever a crash left there at this very step goes (on an
    object store that is the step's own directory, which a resumed run may save again)."""
    fs, path = filesystem(staged)
    delete(fs, path)
    fs.makedirs(path, exist_ok=True)


def publish(fs: fsspec.AbstractFileSystem, path: str, meta: dict[str, Any]) -> None:
    """The commit: meta.json written beside its place, then renamed into it (one atomic step)."""
    fs.pipe_file(join(path, META + ".tmp"), json.dumps(meta, indent=1).encode())
    fs.mv(join(path, META + ".tmp"), join(path, META))


def staging(root: str, step: int) -> str:
    """Where the shards of `step` are written before the commit (see the module docstring)."""
    name = f"step-{step:08d}"
    return join(root, f"{name}.tmp" if is_local(root) else name)


def move_tree(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    """Rename a directory; on an object store, copy its objects one by one, then delete them
    (a recursive move there also tries to copy the directory itself, which is no object)."""
    if isinstance(fs, LocalFileSystem):
        fs.mv(src, dst, recursive=True)
        return
    for f in fs.find(src):
        fs.copy(f, join(dst, f[len(src) :].lstrip("/")))
    fs.rm(src, recursive=True)
