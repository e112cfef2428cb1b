"""Checkpoints that never corrupt, on `torch.distributed.checkpoint` (DCP).

Every rank writes its shards into the step's staging directory; once DCP's `.metadata` is
there (written only after every rank's writes), rank 0 commits: renames the directory into
place on a local disk and writes `meta.json` (step, time, layout, data position, the job's
config) last. parallel/ckpt_storage.py says how the naming and the commit marker keep a
process killed at any moment from leaving anything that resume would pick up.

A job resumed from an older checkpoint starts a new timeline: the newer checkpoints
of the old one are renamed `abandoned-step-N` at the first save (kept for the user,
never resumed from), so `resume: auto` cannot jump back onto the abandoned path.

What is saved is layout-independent: every parameter and its AdamW states under
the parameter's whole-model name, as DTensors (or whole tensors) that DCP
reshards on load. A checkpoint saved at one layout therefore loads at any other.
Each rank's random generators are saved under its rank.

An asynchronous save (checkpoint.async) blocks training for almost nothing: DCP's stager copies the
state to host memory in a background thread while the next step's forward and backward run (they
read the parameters, never write them), the trainer waits for that copy only before the next
optimizer update (`before_update`), and the write to storage runs in another thread after it.
"""

from __future__ import annotations

import re
import time
import warnings
from concurrent.futures import Future
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

from parallel.adamw import STATE_KEYS
from parallel.ckpt_storage import (  # the storage side, re-exported for the engine's callers
    CheckpointError,
    CheckpointInfo,
    check_storage,
    delete,
    filesystem,
    join,
    last_line,
    latest_complete,
    list_checkpoints,
    move_tree,
    pick,
    prepare,
    publish,
    read_meta,
    reader,
    retained,
    staging,
    writer,
)
from parallel.config import Config
from parallel.model import Transformer, persistent_buffers

__all__ = [
    "CheckpointError", "CheckpointInfo", "Checkpointer", "check_storage", "latest_complete",
    "list_checkpoints", "load_full_weights", "pick", "read_meta", "resolve_resume", "retained",
]  # fmt: skip
SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size")


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
    storage = reader(path)
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"model": weights}, storage_reader=storage, no_dist=True)
    except (Exception, CheckpointException) as err:  # DCP's wrapper is a BaseException
        raise CheckpointError(f"checkpoint {path}: cannot be read ({last_line(err)})") from err
    return weights, cfg


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
        # State that is not a parameter: the persistent buffers (MoE routing biases), whole on every rank.
        self.buffers = [(_strip(n), b) for m in parts for n, b in persistent_buffers(m)]
        # Checkpoint traffic gets its own gloo group so a background save never interleaves
        # with the training collectives; `poll` gets another, because the background save's
        # thread issues collectives on `group` while the training thread polls.
        self.group = dist.new_group(backend="gloo")
        self.poll_group = dist.new_group(backend="gloo")
        self.pending: tuple[Future, int, dict[str, Any]] | None = None
        self.staging: Future | None = None  # the pending save's copy to host memory
        self._stager: DefaultStager | None = None  # made at the first asynchronous save, reused
        self.saved_step: int | None = None  # the newest step this run committed

    def _state(self) -> dict[str, Any]:
        states = self.optimizer.export_states()
        return {
            "model": dict(self.named) | dict(self.buffers),
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
        staged = staging(self.cfg.checkpoint.dir, step)
        self._on_rank0(f"cannot prepare {staged}", lambda: prepare(staged))
        meta = {"step": step, **extra, "rng": {"ranks": dist.get_world_size(), "kinds": sorted(_rng_state())}}
        try:
            if self.cfg.checkpoint.async_ and not wait:
                saving = dcp.async_save(
                    self._state(), storage_writer=writer(staged), process_group=self.group, async_stager=self.stager()
                )
                if isinstance(saving, AsyncSaveResponse):  # staging in the background: see before_update
                    self.staging, saving = saving.staging_completion, saving.upload_completion
                self.pending = (saving, step, meta)
            else:
                dcp.save(self._state(), storage_writer=writer(staged), process_group=self.group)
                self._commit(step, meta)
        except (Exception, CheckpointException) as err:  # DCP's wrapper is a BaseException
            if isinstance(err, CheckpointError):
                raise
            raise CheckpointError(f"checkpoint {staged}: writing failed ({last_line(err)})") from err
        return time.perf_counter() - start

    def stager(self) -> DefaultStager:
        """DCP's stager that copies the state to host memory in a background thread (pinned memory and
        non-blocking copies from a GPU); one for the run, so its buffers are reused."""
        if self._stager is None:
            cuda = any(p.is_cuda for _, p in self.named[:1])
            options = StagingOptions(
                use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=True, use_non_blocking_copy=cuda
            )
            self._stager = DefaultStager(options)
        return self._stager

    def before_update(self) -> float:
        """Wait until the pending asynchronous save holds its copy of the state (the optimizer is about
        to change the parameters and its states); returns the seconds waited."""
        if self.staging is None:
            return 0.0
        start, staging, self.staging = time.perf_counter(), self.staging, None
        try:
            staging.result()
        except (Exception, CheckpointException) as err:
            step = self.pending[1] if self.pending else "?"
            raise CheckpointError(f"checkpoint of step {step}: copying the state failed ({last_line(err)})") from err
        return time.perf_counter() - start

    def close(self) -> None:
        """Release the stager's buffers, unless a save still uses them (a run that ends normally has
        finished its saves; one that failed must not wait here on a save that may wait on a peer)."""
        if self._stager is not None and self.pending is None:
            self._stager.close()
            self._stager = None

    def finish(self) -> None:
        """Wait for a background save and commit it."""
        self.before_update()
        if self.pending is None:
            return
        future, step, meta = self.pending
        self.pending = None
        try:
            future.result()
        except (Exception, CheckpointException) as err:
            raise CheckpointError(f"checkpoint of step {step}: writing failed ({last_line(err)})") from err
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
            fs, staged = filesystem(staging(root, step))
            _, final = filesystem(join(root, f"step-{step:08d}"))
            if not fs.exists(join(staged, ".metadata")):
                raise CheckpointError(f"{staged} has no DCP .metadata after the save; it is not committed")
            if staged != final:  # a local disk: one rename puts it in place
                if fs.exists(final):  # this step saved again, after resuming from an older one
                    delete(fs, final)
                fs.mv(staged, final, recursive=True)
            publish(fs, final, {**meta, "time": time.time()})
            self._retain(step)

        self._on_rank0(f"cannot commit step {step}", commit)
        self.saved_step = step

    def _retain(self, saved: int) -> None:
        c = self.cfg.checkpoint
        fs, base = filesystem(c.dir)
        found = list_checkpoints(c.dir)
        for x in found:
            if x.complete and x.step > saved:  # an abandoned timeline's: keep it, out of resume's way
                name = x.path.rstrip("/").rsplit("/", 1)[-1]
                move_tree(fs, filesystem(x.path)[1], join(base, f"abandoned-{name}-{time.time_ns()}"))
        found = [x for x in found if x.step <= saved]
        keep = retained([x.step for x in found if x.complete], c.keep_last, c.keep_every)
        for x in found:
            stale = not x.complete and x.step < saved  # crash leftovers
            if (x.complete and x.step not in keep) or stale:
                delete(fs, filesystem(x.path)[1])

    # -- loading -------------------------------------------------------------------
    def load(self, path: str) -> None:
        """Load weights, optimizer states and RNG from `path` into this rank's layout."""
        meta = read_meta(path)
        # empty, not zeros: the load writes every element (a key it lacks is an error below).
        template = {n: {k: torch.empty_like(p) for k in STATE_KEYS} for n, p in self.named}
        rng_key, rng = self._rng_template(meta)
        state = {"model": dict(self.named) | dict(self.buffers), "optim": template, "rng": {rng_key: rng}}
        try:
            with torch.no_grad():
                dcp.load(state, storage_reader=reader(path), process_group=self.group)
        except (Exception, CheckpointException) as err:  # per-rank failures, wrapped; keep it short
            text = last_line(err)
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
