"""Checkpoints that never corrupt, on `torch.distributed.checkpoint` (DCP).

Layout under `checkpoint.dir` (a local path or any fsspec URL):

    step-00000010/           a complete checkpoint: DCP shards + .metadata + meta.json
    step-00000012.tmp/       being written (or left by a crash): never resumed from

A checkpoint is written under `step-N.tmp`, renamed to `step-N` once every rank
has written its shards, and only then gets `meta.json` (step, time, layout, data
position, the job's config). `meta.json` is the commit marker: a directory
without it is incomplete and ignored, so a process killed at any moment leaves
nothing that resume would pick up. Retention removes `meta.json` first, then the
files, so a half-deleted checkpoint is never mistaken for a complete one.

What is saved is layout-independent: every parameter and its AdamW states under
the parameter's whole-model name, as DTensors (or whole tensors) that DCP
reshards on load. A checkpoint saved at one layout therefore loads at any other.
"""

from __future__ import annotations

import json
import re
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.api import CheckpointException

from parallel.config import Config, ConfigError
from parallel.data_parallel import STATE_KEYS
from parallel.model import Transformer

META = "meta.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size")


class CheckpointError(ConfigError):
    """A checkpoint that is missing, incomplete, corrupt or does not fit the job."""


@dataclass
class CheckpointInfo:
    step: int
    path: str
    complete: bool
    meta: dict[str, Any]
    size_bytes: int


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/")


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def list_checkpoints(root: str) -> list[CheckpointInfo]:
    """Every step directory under root (complete or not), oldest first."""
    fs, base = _fs(root)
    if not fs.exists(base):
        return []
    out = []
    for entry in fs.ls(base, detail=True):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        match = _STEP_DIR.match(name.removesuffix(".tmp"))
        if not match or entry["type"] != "directory":
            continue
        path = _join(root, name)
        meta_path = _join(entry["name"], META)
        complete = not name.endswith(".tmp") and fs.exists(meta_path)
        meta = json.loads(fs.cat_file(meta_path)) if complete else {}
        size = sum(f["size"] for f in fs.find(entry["name"], detail=True).values())
        out.append(CheckpointInfo(int(match.group(1)), path, complete, meta, size))
    return sorted(out, key=lambda c: (c.step, c.complete))


def latest_complete(root: str) -> str | None:
    done = [c for c in list_checkpoints(root) if c.complete]
    return done[-1].path if done else None


def pick(path: str) -> str:
    """`path` itself if it is a checkpoint, else the newest complete one under it (as checkpoint.dir)."""
    fs, base = _fs(path)
    if not fs.exists(_join(base, META)) and (newest := latest_complete(path)):
        return newest
    return path


def read_meta(path: str) -> dict[str, Any]:
    """meta.json of a complete checkpoint, or a CheckpointError naming what is wrong."""
    fs, base = _fs(path)
    if not fs.exists(base):
        raise CheckpointError(f"checkpoint {path}: does not exist")
    if not fs.exists(_join(base, META)):
        raise CheckpointError(f"checkpoint {path}: incomplete (no {META}; it was never committed)")
    if not fs.exists(_join(base, ".metadata")):
        raise CheckpointError(f"checkpoint {path}: corrupt (DCP .metadata is missing)")
    try:
        return json.loads(fs.cat_file(_join(base, META)))
    except (ValueError, OSError) as err:
        raise CheckpointError(f"checkpoint {path}: corrupt {META} ({err})") from None


def resolve_resume(cfg: Config, resume: str | None) -> tuple[str | None, dict[str, Any] | None]:
    """The checkpoint to resume from (None for a fresh start) and its meta, checked against cfg."""
    resume = resume or cfg.checkpoint.resume
    if resume is None:
        return None, None
    if resume == "auto" and not cfg.checkpoint.dir:
        raise CheckpointError("resume=auto needs checkpoint.dir to look in")
    path = latest_complete(cfg.checkpoint.dir) if resume == "auto" else resume
    if path is None:
        return None, None
    meta = read_meta(path)
    saved = meta["config"]["model"]
    for field in SHAPE_FIELDS:
        if saved.get(field) != getattr(cfg.model, field):
            raise CheckpointError(
                f"checkpoint {path}: model.{field} saved {saved.get(field)}, requested {getattr(cfg.model, field)}; "
                "a checkpoint only loads into a model of the same shape"
            )
    return path, meta


def load_full_weights(path: str) -> tuple[dict[str, torch.Tensor], Config]:
    """Whole (unsharded) model weights of a checkpoint, read in this one process, and its config."""
    meta = read_meta(path)
    cfg = Config.model_validate(meta["config"])
    with torch.device("meta"):
        shapes = Transformer(cfg.model, max_seq_len=cfg.train.seq_len).state_dict()
    weights = {name: torch.empty(t.shape, dtype=torch.float32) for name, t in shapes.items()}
    reader = FileSystemReader(path) if _is_local(path) else FsspecReader(path)
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"model": weights}, storage_reader=reader, no_dist=True)
    except (Exception, CheckpointException) as err:  # DCP's wrapper is a BaseException
        raise CheckpointError(f"checkpoint {path}: cannot be read ({_last_line(err)})") from err
    return weights, cfg


def _last_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[-1][:300] if text else type(err).__name__


def _strip(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "")


class Checkpointer:
    """Saves and loads one rank's share; every rank calls every method in the same order."""

    def __init__(self, cfg: Config, parts: list[nn.Module], optimizer: Any, rank: int) -> None:
        self.cfg, self.parts, self.optimizer, self.rank = cfg, parts, optimizer, rank
        self.named = [(_strip(n), p) for m in parts for n, p in m.named_parameters() if p.requires_grad]
        # Checkpoint traffic gets its own gloo group so a background save never interleaves
        # with the training collectives; `poll` gets another, because the background save's
        # thread issues collectives on `group` while the training thread polls.
        self.group = dist.new_group(backend="gloo")
        self.poll_group = dist.new_group(backend="gloo")
        self.pending: tuple[Future, int, dict[str, Any]] | None = None

    def _state(self) -> dict[str, Any]:
        states = self.optimizer.export_states()
        return {
            "model": dict(self.named),
            "optim": {n: states[id(p)] for n, p in self.named if id(p) in states},
            "rng": {"torch": torch.get_rng_state()},
        }

    # -- saving --------------------------------------------------------------------
    def save(self, step: int, extra: dict[str, Any], wait: bool = False) -> float:
        """Write step `step`; returns the seconds training was blocked."""
        start = time.perf_counter()
        self.finish()  # one save in flight at a time
        root = self.cfg.checkpoint.dir
        tmp = _join(root, f"step-{step:08d}.tmp")
        if self.rank == 0:
            fs, path = _fs(tmp)
            if fs.exists(path):
                fs.rm(path, recursive=True)  # left by a crash at this very step
            fs.makedirs(path, exist_ok=True)
        dist.barrier(group=self.group)
        writer = FileSystemWriter(tmp) if _is_local(tmp) else FsspecWriter(tmp)
        meta = {"step": step, **extra}
        if self.cfg.checkpoint.async_ and not wait:
            future = dcp.async_save(self._state(), storage_writer=writer, process_group=self.group)
            self.pending = (future, step, meta)
        else:
            dcp.save(self._state(), storage_writer=writer, process_group=self.group)
            self._commit(step, meta)
        return time.perf_counter() - start

    def finish(self) -> None:
        """Wait for a background save and commit it."""
        if self.pending is None:
            return
        future, step, meta = self.pending
        self.pending = None
        future.result()
        self._commit(step, meta)

    def poll(self) -> None:
        """Commit a finished background save without waiting for one still running."""
        if self.pending is not None:
            done = torch.tensor([float(self.pending[0].done())])
            dist.all_reduce(done, op=dist.ReduceOp.MIN, group=self.poll_group)  # all ranks agree
            if done.item() == 1.0:
                self.finish()

    def _commit(self, step: int, meta: dict[str, Any]) -> None:
        # DCP's coordinator writes .metadata only after gathering every rank's write
        # results, so once save returns on rank 0 every shard is on storage.
        if self.rank == 0:
            root = self.cfg.checkpoint.dir
            tmp, final = _join(root, f"step-{step:08d}.tmp"), _join(root, f"step-{step:08d}")
            fs, tmp_path = _fs(tmp)
            _, final_path = _fs(final)
            if fs.exists(final_path):
                fs.rm(final_path, recursive=True)
            fs.mv(tmp_path, final_path, recursive=True)
            meta = {**meta, "time": time.time()}
            fs.pipe_file(_join(final_path, META), json.dumps(meta, indent=1).encode())  # the commit
            self._retain()
        dist.barrier(group=self.group)

    def _retain(self) -> None:
        c = self.cfg.checkpoint
        found = list_checkpoints(c.dir)
        done = [x for x in found if x.complete]
        keep = {x.step for x in done[-c.keep_last :]}
        if c.keep_every:
            keep |= {x.step for x in done if x.step % c.keep_every == 0}
        newest = done[-1].step if done else -1
        fs, _ = _fs(c.dir)
        for x in found:
            stale = not x.complete and x.step < newest  # crash leftovers
            if (x.complete and x.step not in keep) or stale:
                _, path = _fs(x.path)
                if fs.exists(_join(path, META)):
                    fs.rm(_join(path, META))  # forget it as a checkpoint first...
                fs.rm(path, recursive=True)  # ...then free its files

    # -- loading -------------------------------------------------------------------
    def load(self, path: str) -> None:
        """Load weights, optimizer states and RNG from `path` into this rank's layout."""
        meta = read_meta(path)
        template = {n: {k: torch.zeros_like(p) for k in STATE_KEYS} for n, p in self.named}
        state = {"model": dict(self.named), "optim": template, "rng": {"torch": torch.get_rng_state()}}
        reader = FileSystemReader(path) if _is_local(path) else FsspecReader(path)
        try:
            with torch.no_grad():
                dcp.load(state, storage_reader=reader, process_group=self.group)
        except (Exception, CheckpointException) as err:  # per-rank failures, wrapped; keep it short
            why = f"a shard is damaged or unreadable ({_last_line(err)})"
            raise CheckpointError(f"checkpoint {path}: cannot be loaded, {why}") from err
        by_id = {id(p): template[n] for n, p in self.named}
        self.optimizer.import_states(by_id, meta["step"])
        torch.set_rng_state(state["rng"]["torch"])
