"""Checkpoints that never corrupt, on `torch.distributed.checkpoint` (DCP).

Layout under `checkpoint.dir` (a local path or any fsspec URL):

    step-00000010/           a complete checkpoint: DCP shards + .metadata + meta.json
    step-00000012.tmp/       being written (or left by a crash): never resumed from

A checkpoint is written under `step-N.tmp`, renamed to `step-N` once every rank
has written its shards (DCP's `.metadata` is there), and only then gets
`meta.json` (step, time, layout, data position, the job's config), itself written
beside it and renamed into place. `meta.json` is the commit marker: a directory
without it is incomplete and ignored, so a process killed at any moment leaves
nothing that resume would pick up. Deleting (retention, or replacing a step that
is saved again) removes `meta.json` first, then the files, so a half-deleted
checkpoint is never mistaken for a complete one.

A job resumed from an older checkpoint starts a new timeline: the newer checkpoints
of the old one are renamed `abandoned-step-N` at the first save (kept for the user,
never resumed from), so `resume: auto` cannot jump back onto the abandoned path.

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
    """The filesystem of a local path or fsspec URL, and the path within it."""
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:  # s3:// without s3fs installed; an unknown protocol
        raise CheckpointError(f"checkpoint.dir={url}: {err}") from None
    return fs, path.rstrip("/")


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _writer(url: str) -> FileSystemWriter | FsspecWriter:
    # DCP's own writer for local paths (a file:// URL is stripped to its path), fsspec's otherwise.
    return FileSystemWriter(_fs(url)[1]) if _is_local(url) else FsspecWriter(url)


def _reader(url: str) -> FileSystemReader | FsspecReader:
    return FileSystemReader(_fs(url)[1]) if _is_local(url) else FsspecReader(url)


def _read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any] | None:
    """A JSON object from a file, or None if it cannot be read or is not one."""
    try:
        data = json.loads(fs.cat_file(path))
    except (ValueError, OSError):
        return None
    return data if isinstance(data, dict) else None


def _delete(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Remove a checkpoint directory: its commit marker first, so that a crash half way
    leaves an incomplete directory, never a complete-looking one with files missing."""
    if fs.exists(_join(path, META)):
        fs.rm(_join(path, META))
    if fs.exists(path):
        fs.rm(path, recursive=True)


def check_storage(url: str) -> None:
    """Refuse (CheckpointError) a checkpoint.dir that cannot be written, before any process group:
    a filesystem package missing, a read-only place, a path under a file."""
    fs, path = _fs(url)
    probe = _join(path, f".fourfold-probe-{time.time_ns()}")
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
        meta = None if name.endswith(".tmp") else _read_json(fs, _join(entry["name"], META))
        # Complete: committed (meta.json readable, as the commit writes it whole) with DCP's index.
        complete = meta is not None and fs.exists(_join(entry["name"], ".metadata"))
        meta = meta if complete else {}
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
    meta = _read_json(fs, _join(base, META))
    if meta is None or not isinstance(meta.get("step"), int) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"checkpoint {path}: corrupt {META} (not a JSON object with step and config)")
    return meta


def resolve_resume(cfg: Config, resume: str | None) -> tuple[str | None, dict[str, Any] | None]:
    """The checkpoint to resume from (None for a fresh start) and its meta, checked against cfg."""
    resume = resume or cfg.checkpoint.resume
    if resume is None:
        return None, None
    if resume == "auto" and not cfg.checkpoint.dir:
        raise CheckpointError("resume=auto needs checkpoint.dir to look in")
    path = latest_complete(cfg.checkpoint.dir) if resume == "auto" else pick(resume)
    if path is None:
        return None, None
    meta = read_meta(path)
    saved = meta["config"].get("model", {})
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
    reader = _reader(path)
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


def _prepare(tmp: str) -> None:
    fs, path = _fs(tmp)
    if fs.exists(path):
        fs.rm(path, recursive=True)  # left by a crash at this very step
    fs.makedirs(path, exist_ok=True)


def _publish(fs: fsspec.AbstractFileSystem, path: str, meta: dict[str, Any]) -> None:
    """The commit: meta.json written beside its place, then renamed into it (one atomic step)."""
    fs.pipe_file(_join(path, META + ".tmp"), json.dumps(meta, indent=1).encode())
    fs.mv(_join(path, META + ".tmp"), _join(path, META))


def _strip(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "")


def _rng_state() -> dict[str, torch.Tensor]:
    """This process's generators: the CPU one and, once CUDA is in use, the current device's."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


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
        self.saved_step: int | None = None  # the newest step this run committed

    def _state(self) -> dict[str, Any]:
        states = self.optimizer.export_states()
        return {
            "model": dict(self.named),
            "optim": {n: states[id(p)] for n, p in self.named if id(p) in states},
            "rng": {f"rank{self.rank}": _rng_state()},  # each rank's own generators
        }

    # -- saving --------------------------------------------------------------------
    def save(self, step: int, extra: dict[str, Any], wait: bool = False) -> float:
        """Write step `step` (a no-op if that step is saved already); returns the seconds training
        was blocked. A failure to write raises CheckpointError on every rank."""
        start = time.perf_counter()
        if step in (self.saved_step, self.pending[1] if self.pending else None):
            if wait:
                self.finish()
            return time.perf_counter() - start
        self.finish()  # one save in flight at a time
        tmp = _join(self.cfg.checkpoint.dir, f"step-{step:08d}.tmp")
        self._on_rank0(f"cannot prepare {tmp}", lambda: _prepare(tmp))
        meta = {"step": step, **extra, "rng": {"ranks": dist.get_world_size(), "kinds": sorted(_rng_state())}}
        try:
            if self.cfg.checkpoint.async_ and not wait:
                future = dcp.async_save(self._state(), storage_writer=_writer(tmp), process_group=self.group)
                self.pending = (future, step, meta)
            else:
                dcp.save(self._state(), storage_writer=_writer(tmp), process_group=self.group)
                self._commit(step, meta)
        except (Exception, CheckpointException) as err:  # DCP's wrapper is a BaseException
            if isinstance(err, CheckpointError):
                raise
            raise CheckpointError(f"checkpoint {tmp}: writing failed ({_last_line(err)})") from err
        return time.perf_counter() - start

    def finish(self) -> None:
        """Wait for a background save and commit it."""
        if self.pending is None:
            return
        future, step, meta = self.pending
        self.pending = None
        try:
            future.result()
        except (Exception, CheckpointException) as err:
            raise CheckpointError(f"checkpoint of step {step}: writing failed ({_last_line(err)})") from err
        self._commit(step, meta)

    def poll(self) -> None:
        """Commit a finished background save without waiting for one still running."""
        if self.pending is not None:
            done = torch.tensor([float(self.pending[0].done())])
            dist.all_reduce(done, op=dist.ReduceOp.MIN, group=self.poll_group)  # all ranks agree
            if done.item() == 1.0:
                self.finish()

    def _on_rank0(self, what: str, fn: Any) -> None:
        """Run fn on rank 0 only (the storage work of a save); every rank learns whether it
        worked, so a failure there ends every rank the same way instead of leaving them waiting."""
        error = None
        if self.rank == 0:
            try:
                fn()
            except (OSError, ValueError, CheckpointError) as err:
                error = f"{what} ({err})"
        box = [error]
        dist.broadcast_object_list(box, src=0, group=self.group)
        if box[0] is not None:
            raise CheckpointError(f"checkpoint: {box[0]}")

    def _commit(self, step: int, meta: dict[str, Any]) -> None:
        # DCP's coordinator writes .metadata only after gathering every rank's write
        # results, so once save returns on rank 0 every shard is on storage.
        root = self.cfg.checkpoint.dir

        def commit() -> None:
            fs, tmp = _fs(_join(root, f"step-{step:08d}.tmp"))
            _, final = _fs(_join(root, f"step-{step:08d}"))
            if not fs.exists(_join(tmp, ".metadata")):
                raise CheckpointError(f"{tmp} has no DCP .metadata after the save; it is not committed")
            if fs.exists(final):  # this step saved again, after resuming from an older one
                _delete(fs, final)
            fs.mv(tmp, final, recursive=True)
            _publish(fs, final, {**meta, "time": time.time()})
            self._retain(step)

        self._on_rank0(f"cannot commit step {step}", commit)
        self.saved_step = step

    def _retain(self, saved: int) -> None:
        c = self.cfg.checkpoint
        fs, base = _fs(c.dir)
        found = list_checkpoints(c.dir)
        for x in found:
            if x.complete and x.step > saved:  # an abandoned timeline's: keep it, out of resume's way
                name = x.path.rstrip("/").rsplit("/", 1)[-1]
                fs.mv(_fs(x.path)[1], _join(base, f"abandoned-{name}-{time.time_ns()}"), recursive=True)
        found = [x for x in found if x.step <= saved]
        keep = retained([x.step for x in found if x.complete], c.keep_last, c.keep_every)
        for x in found:
            stale = not x.complete and x.step < saved  # crash leftovers
            if (x.complete and x.step not in keep) or stale:
                _delete(fs, _fs(x.path)[1])

    # -- loading -------------------------------------------------------------------
    def load(self, path: str) -> None:
        """Load weights, optimizer states and RNG from `path` into this rank's layout."""
        meta = read_meta(path)
        template = {n: {k: torch.zeros_like(p) for k in STATE_KEYS} for n, p in self.named}
        rng_key, rng = self._rng_template(meta)
        state = {"model": dict(self.named), "optim": template, "rng": {rng_key: rng}}
        try:
            with torch.no_grad():
                dcp.load(state, storage_reader=_reader(path), process_group=self.group)
        except (Exception, CheckpointException) as err:  # per-rank failures, wrapped; keep it short
            text = _last_line(err)
            missing = re.search(r"Missing key in checkpoint state_dict: (\S+)", str(err))
            why = (
                f"it holds no {missing.group(1).rstrip('.')} (saved by another model or version)"
                if missing
                else f"a shard is damaged or unreadable ({text})"
            )
            raise CheckpointError(f"checkpoint {path}: cannot be loaded, {why}") from err
        by_id = {id(p): template[n] for n, p in self.named}
        self.optimizer.import_states(by_id, meta["step"])
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"])

    def _rng_template(self, meta: dict[str, Any]) -> tuple[str, Any]:
        """Which saved generator state this rank takes: its own where the rank grid is the same
        as at the save, rank 0's otherwise (a rank of another grid has no counterpart)."""
        saved = meta["rng"]
        grid = ("pp", "dp", "dp_replicate", "cp", "tp")
        now = self.cfg.parallel.model_dump()
        same = saved["ranks"] == dist.get_world_size() and all(meta["layout"].get(k) == now[k] for k in grid)
        here = _rng_state()
        return f"rank{self.rank if same else 0}", {k: here[k] for k in saved["kinds"] if k in here}
