"""Measure, inside one training step on every rank, what the planner (parallel/planner) predicts: the bytes
of model state a rank holds, what autograd keeps for backward, and what each mesh axis's collectives move.

The layouts run as `tests/dist/harness.py` runs them (BASE plus overrides, gloo on loopback, one thread a
rank, the layouts of one world size one after another in one set of processes). Each layout trains two
steps; everything is measured in the second, so the first step's one-off traffic (the pipeline stages'
shape inference) and lazy set-up stay out of it.

What is counted, per rank:

- state (`StateSampler`): the bytes of parameters, gradients and optimizer states, each storage once (a
  DTensor by its local shard; ZeRO 0-2's running gradient shard; FSDP2's sharded parameters and, while
  they exist, its gathered parameters and their gradients), at their peak over the moments of
  tests/dist/test_memory.py (after each micro-batch's backward, before and after its reduction, around the
  update) and, under pipelining, after every schedule action (each forward, backward and weight-gradient
  chunk, and around the final gradient reduction), where a pipeline's gathered stages live.
- activations (`SavedTracker`): every tensor autograd saves for backward, seen by
  `torch.autograd.graph.saved_tensors_hooks` around the step's forward passes. Not activations, so left
  out: parameters and views of them (what a matmul keeps to compute its input's gradient; FSDP2's gathered
  parameters included), the module buffers (the RoPE table), and 0-d tensors (the loss). Bytes are those of
  the elements the saved tensors span, each element of each storage once (two views of one buffer count
  their union; a micro-batch's token ids, a slice of the step's batch, count as that slice). Under
  activation checkpointing the checkpoint's own hooks hide the block's inner tensors from ours (our hook
  sees what the checkpoint keeps, its inputs); under selective checkpointing the outputs its policy
  caches are read from the cache (`create_selective_checkpoint_contexts`' storage) instead. Two numbers:
  per_mb, the bytes one forward of one stage on one micro-batch keeps (tagged by (stage, micro-batch),
  the last stage's loss included); peak, the most bytes of saved tensors alive at once during the step
  (a saved tensor dies when autograd frees its graph node, a cached output when the recomputation takes
  it), which is what the in-flight micro-batches of a pipeline schedule hold.
- communication (`CommCounter`, a TorchDispatchMode that lets DTensor desugar first, as torch's
  CommDebugMode does): every c10d and functional collective the rank issues, with its payload in the
  planner's convention (all_reduce: the buffer; all_gather: the gathered output; reduce_scatter: the whole
  input; send: the message; a receive moves nothing of its own), attributed to the mesh axis whose process
  group it runs on. Collectives of one element (the loss, the gradient norm) are left out, as the planner
  leaves them out, and reported apart.

Running layouts with it and comparing with the planner: tests/dist/planner_runs.py
(`.venv/bin/python -m tests.dist.planner_runs` prints the predicted-vs-measured table).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections import Counter, defaultdict
from typing import Any

import torch
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

STEPS = 2  # measure the second: the first pays the pipeline's shape inference and lazy set-up


def _local(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor holding a DTensor's local shard (or a pending collective's result)."""
    while True:
        if isinstance(t, DTensor):
            t = t._local_tensor
        elif isinstance(t, AsyncCollectiveTensor):
            t = t.elem
        else:
            return t


def _extent(t: torch.Tensor) -> tuple[int, int, int]:
    """(storage pointer, first byte, end byte) of the storage bytes a tensor's elements span."""
    t = _local(t)
    size = t.element_size()
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True)) if t.numel() else 0
    lo = t.storage_offset() * size
    return t.untyped_storage().data_ptr(), lo, lo + span * size


def _union(intervals: Any) -> int:
    total, end = 0, -1
    for lo, hi in sorted(intervals):
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total


def _storage_bytes(tensors: list[torch.Tensor | None]) -> int:
    """Bytes of the storages under `tensors`, each once (a freed storage has 0)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None:
            st = _local(t).untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


# -- state ------------------------------------------------------------------------------------------------


def _fsdp_params(parts: list[nn.Module]) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    out = []
    for part in parts:
        for mod in part.modules():
            if isinstance(mod, FSDPModule):
                for group in mod._get_fsdp_state()._fsdp_param_groups:
                    out += group.fsdp_params
    return out


class StateSampler:
    """Peak bytes of parameters, gradients and optimizer states at the sample points (module docstring)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer, self.active = trainer, False
        self.peak = {"params": 0, "grads": 0, "optimizer": 0}
        self.fsdp = _fsdp_params(trainer.parts)
        opt = trainer.optimizer
        opt.after_backward = self.sampled(opt.after_backward)
        for each in getattr(opt, "parts", (opt,)):  # expert parallelism: a dense and an experts' optimizer
            each.opt.step = self.sampled(each.opt.step)

    def sample(self) -> None:
        if not self.active:
            return
        params = [q for m in self.trainer.parts for q in m.parameters()]
        grads = [q.grad for q in params] + list(self.trainer.optimizer.grad_tensors())
        for fp in self.fsdp:
            params.append(fp.sharded_param)
            grads += [fp.sharded_param.grad, fp.unsharded_accumulated_grad]
            if hasattr(fp, "_unsharded_param"):
                params.append(fp._unsharded_param)
                grads.append(fp._unsharded_param.grad)
        held = {
            "params": _storage_bytes(params),
            "grads": _storage_bytes(grads),
            "optimizer": _storage_bytes(self.trainer.optimizer.state_tensors()),
        }
        for kind, n in held.items():
            self.peak[kind] = max(self.peak[kind], n)

    def sampled(self, fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.sample()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sample()

        return wrapper


# -- activations ------------------------------------------------------------------------------------------


class _Held:
    """What our pack hook hands autograd: the saved tensor, and its extent released when autograd drops it."""

    __slots__ = ("__weakref__", "key", "t", "tag", "tracker")

    def __init__(self, t: torch.Tensor, tracker: SavedTracker, key: tuple[int, int, int]) -> None:
        self.t, self.tracker, self.key, self.tag = t, tracker, key, tracker.tag
        tracker.hold(key, self.tag)

    def __del__(self) -> None:
        self.tracker.release(self.key, self.tag)


class SavedTracker:
    """Saved-for-backward bytes per (stage, micro-batch) forward, and the peak alive at once."""

    def __init__(self, parts: list[nn.Module]) -> None:
        self.tag: tuple[int, int] | None = None
        self.active = False
        self.buffers = {_local(b).untyped_storage().data_ptr() for m in parts for b in m.buffers()}
        # A DTensor parameter's local tensor (expert weights sharded over ep) is read as `to_local()`, a new
        # tensor on the parameter's storage: model state too.
        self.buffers |= {_local(q).untyped_storage().data_ptr() for m in parts for q in m.parameters()}
        self.per_tag: dict[tuple[int, int], dict[int, set[tuple[int, int]]]] = defaultdict(lambda: defaultdict(set))
        self.live: dict[int, Counter] = defaultdict(Counter)  # storage -> live (lo, hi) extents
        self.live_union: dict[int, int] = {}
        self.live_bytes = self.peak = 0
        self.live_tags: Counter = Counter()  # (stage, micro-batch) -> saved tensors alive
        self.at_peak: list = []  # the forwards whose saved tensors were alive at the peak
        self.pending: list[tuple[tuple[int, int] | None, dict]] = []  # selective checkpoint caches to read
        self.excluded: Counter = Counter()
        for part in parts:
            self._watch_selective(part)

    # live extents
    def hold(self, key: tuple[int, int, int], tag: tuple[int, int] | None) -> None:
        ptr, lo, hi = key
        self.live[ptr][(lo, hi)] += 1
        self.live_tags[tag] += 1
        self._recount(ptr)
        if self.live_bytes > self.peak:
            self.peak = self.live_bytes
            self.at_peak = sorted((t for t, n in self.live_tags.items() if n > 0), key=str)

    def release(self, key: tuple[int, int, int], tag: tuple[int, int] | None) -> None:
        ptr, lo, hi = key
        self.live_tags[tag] -= 1
        live = self.live.get(ptr)
        if live is None:
            return
        live[(lo, hi)] -= 1
        if live[(lo, hi)] <= 0:
            del live[(lo, hi)]
        self._recount(ptr)

    def _recount(self, ptr: int) -> None:
        new = _union(self.live[ptr]) if self.live[ptr] else 0
        if not self.live[ptr]:
            del self.live[ptr]
        self.live_bytes += new - self.live_union.pop(ptr, 0)
        if new:
            self.live_union[ptr] = new

    # the hooks
    def _is_state(self, t: torch.Tensor) -> bool:
        """A parameter, a view of one, or a buffer: model state, not an activation."""
        x: torch.Tensor | None = t
        while x is not None:
            if isinstance(x, nn.Parameter):
                return True
            x = x._base
        return _local(t).untyped_storage().data_ptr() in self.buffers

    def _record(self, t: torch.Tensor, tag: tuple[int, int] | None) -> tuple[int, int, int]:
        key = _extent(t)
        if tag is not None:
            self.per_tag[tag][key[0]].add(key[1:])
        return key

    def pack(self, t: torch.Tensor) -> Any:
        if not self.active or t.ndim == 0 or self._is_state(t):
            if self.active:
                self.excluded["scalar" if t.ndim == 0 else "state"] += 1
            return t
        return _Held(t, self, self._record(t, self.tag))

    @staticmethod
    def unpack(x: Any) -> torch.Tensor:
        return x.t if isinstance(x, _Held) else x

    def hooks(self) -> contextlib.AbstractContextManager:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    # selective checkpointing: the outputs its policy caches live in the checkpoint's own storage
    def _watch_selective(self, part: nn.Module) -> None:
        for mod in part.modules():
            fn = getattr(mod, "checkpoint_fn", None)
            context_fn = getattr(fn, "keywords", {}).get("context_fn") if isinstance(fn, functools.partial) else None
            if context_fn is None:
                continue

            def recording(_orig: Any = context_fn) -> Any:
                caching, cached = _orig()
                if self.active:
                    self.pending.append((self.tag, caching.storage))
                return caching, cached

            mod.checkpoint_fn = functools.partial(fn.func, *fn.args, **{**fn.keywords, "context_fn": recording})

    def _read_caches(self) -> None:
        """Account the cached outputs of the checkpointed forwards just run (before any recomputation)."""
        pending, self.pending = self.pending, []
        for tag, storage in pending:
            for per_op in list(storage.values()):
                for entry in list(per_op.values()):
                    for wrapper in torch.utils._pytree.tree_leaves(entry):
                        val = getattr(wrapper, "val", None)
                        if not isinstance(val, torch.Tensor) or val.ndim == 0 or self._is_state(val):
                            continue
                        key = self._record(val, tag)
                        self.hold(key, tag)
                        weakref.finalize(wrapper, self.release, key, tag)

    def set_tag(self, tag: tuple[int, int] | None) -> None:
        self._read_caches()
        self.tag = tag

    def per_mb(self) -> dict[tuple[int, int], int]:
        return {tag: sum(_union(iv) for iv in by_ptr.values()) for tag, by_ptr in self.per_tag.items()}


# -- communication ----------------------------------------------------------------------------------------


def _tensors(x: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]


def _payload(name: str, args: tuple, kwargs: dict) -> tuple[str, list[torch.Tensor], int]:
    """(kind, the tensors whose size is the payload, multiplier) of one collective call."""
    a = list(args) + list(kwargs.values())
    if name in ("_allgather_base_", "allgather_", "allgather_into_tensor_coalesced_"):
        return "all_gather", _tensors(a[0]), 1  # the gathered output(s)
    if name in ("all_gather_into_tensor", "all_gather_into_tensor_coalesced"):
        return "all_gather", _tensors(a[0]), a[1]  # input(s) x group size
    if name in ("_reduce_scatter_base_",):
        return "reduce_scatter", _tensors(a[1]), 1  # (output, input): the whole input
    if name in ("reduce_scatter_", "reduce_scatter_tensor_coalesced_"):
        return "reduce_scatter", _tensors(a[1]), 1
    if name in ("reduce_scatter_tensor", "reduce_scatter_tensor_coalesced"):
        return "reduce_scatter", _tensors(a[0]), 1
    if name in ("allreduce_", "allreduce_coalesced_", "all_reduce", "all_reduce_", "all_reduce_coalesced"):
        return "all_reduce", _tensors(a[0]), 1
    if name == "send":
        return "send", _tensors(a[0]), 1
    if name in ("recv_", "recv_any_source_"):
        return "recv", [], 1
    if name in ("alltoall_base_", "alltoall_"):
        return "all_to_all", _tensors(a[1]), 1
    if name in ("all_to_all_single",):
        return "all_to_all", _tensors(a[0]), 1
    if name in ("broadcast_", "broadcast"):
        return "broadcast", _tensors(a[0]), 1
    return name, [], 1  # barrier, waits, wrappers: not collectives that move data


COLLECTIVES = ("all_gather", "reduce_scatter", "all_reduce", "send", "recv", "all_to_all", "broadcast")


class CommCounter(TorchDispatchMode):
    """Payload bytes of every collective issued while active, per mesh axis (see the module docstring)."""

    def __init__(self, axis_of_ranks: dict[tuple[int, ...], str]) -> None:
        super().__init__()
        self.axis_of_ranks = axis_of_ranks
        self.axis_of_group: dict[str, str] = {}
        self.bytes: Counter = Counter()  # axis -> payload bytes
        self.calls: Counter = Counter()  # (axis, kind) -> calls
        self.kind_bytes: Counter = Counter()  # (axis, kind) -> payload bytes
        self.scalars: Counter = Counter()  # (axis, kind) -> one-element calls, left out
        self.ops: Counter = Counter()  # which torch ops carried them
        self.active = False

    def _axis(self, group_name: str) -> str:
        """The mesh axis of a process group, by its ranks: DTensor's caches, keyed by meshes that compare
        equal, may hand an op the group of an earlier layout's mesh over the same ranks."""
        if group_name not in self.axis_of_group:
            c10d = torch.distributed.distributed_c10d
            ranks = [tuple(sorted(c10d._world.pg_group_ranks[pg])) for pg, n in c10d._world.pg_names.items()
                     if n == group_name]  # fmt: skip
            self.axis_of_group[group_name] = self.axis_of_ranks.get(ranks[0], "other") if ranks else "other"
        return self.axis_of_group[group_name]

    @staticmethod
    def _group(args: tuple, kwargs: dict) -> str:
        for x in [*args, *kwargs.values()]:
            if isinstance(x, torch.ScriptObject) and "ProcessGroup" in str(x._type()):
                return torch.distributed.ProcessGroup.unbox(x).group_name  # c10d ops get the boxed group
        strs = [x for x in args if isinstance(x, str)]
        return strs[-1] if strs else "?"  # functional collectives end with the group's name

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **kwargs)
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor desugar into plain ops and collectives, then see those
        if self.active and func.namespace in ("c10d", "_c10d_functional"):
            name = func._schema.name.split("::")[-1]
            kind, tensors, mult = _payload(name, args, kwargs)
            if kind in COLLECTIVES:
                self.ops[str(func)] += 1
                axis = "ep" if kind == "all_to_all" else self._axis(self._group(args, kwargs))
                nbytes = sum(_local(t).numel() * _local(t).element_size() for t in tensors) * mult
                if tensors and sum(t.numel() for t in tensors) <= 1:
                    self.scalars[(axis, kind)] += 1
                else:
                    self.calls[(axis, kind)] += 1
                    self.kind_bytes[(axis, kind)] += nbytes
                    self.bytes[axis] += nbytes
        return func(*args, **kwargs)


# -- wiring it into a trainer -----------------------------------------------------------------------------


class Probe:
    """All three measurements on one trainer, switched on for its last step."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        layout = trainer.layout
        axis_of_ranks = {}
        groups = [(axis, layout.group(axis)) for axis in ("pp", "dp_replicate", "dp_shard", "cp", "tp")]
        # expert parallelism: the experts' dp group (edp) reduces their gradients, counted as dp_shard traffic
        # (all-to-alls are ep traffic whatever group carries them: the ep group can have dp_shard's ranks)
        groups.append(("dp_shard", layout.expert_group("edp")))
        for axis, group in groups:
            if group is not None:
                axis_of_ranks[tuple(sorted(torch.distributed.get_process_group_ranks(group)))] = axis
        self.state = StateSampler(trainer)
        self.saved = SavedTracker(trainer.parts)
        self.comm = CommCounter(axis_of_ranks)
        self.steps = self.micro = 0
        self._wrap()

    def _wrap(self) -> None:
        tr = self.trainer
        inner_step, inner_fb = tr.train_step, tr._forward_backward

        def train_step() -> dict:
            self.steps += 1
            self.micro = 0
            if self.steps < tr.cfg.train.steps:
                return inner_step()
            self.state.active = self.saved.active = self.comm.active = True
            try:
                with self.comm:
                    return inner_step()
            finally:
                self.saved.set_tag(None)
                self.state.active = self.saved.active = self.comm.active = False

        def forward_backward(batches: list) -> torch.Tensor:
            with self.saved.hooks() if self.saved.active else contextlib.nullcontext():
                return inner_fb(batches)

        tr.train_step, tr._forward_backward = train_step, forward_backward
        if tr.pipeline is None:
            (model,) = tr.parts
            inner_forward, inner_loss = model.forward, tr._loss_fn

            def forward(*args: Any, **kwargs: Any) -> Any:
                self.saved.set_tag((0, self.micro))
                self.micro += 1
                return inner_forward(*args, **kwargs)

            def loss_fn(*args: Any) -> Any:
                try:
                    return inner_loss(*args)
                finally:
                    self.saved.set_tag(None)

            model.forward, tr._loss_fn = forward, loss_fn
            return
        for stage in tr.pipeline.stages:
            self._wrap_stage(stage)

    def _wrap_stage(self, stage: Any) -> None:
        """Tag each forward chunk (the loss the schedule computes right after it on the last stage
        included), and sample the state after every schedule action."""
        for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
            method = getattr(stage, name)

            def action(mb: int, *args: Any, _m: Any = method, _fwd: bool = name == "forward_one_chunk",
                       **kwargs: Any) -> Any:  # fmt: skip
                self.saved.set_tag((stage.stage_index, mb) if _fwd else None)
                try:
                    return _m(mb, *args, **kwargs)
                finally:
                    self.state.sample()

            setattr(stage, name, action)
        stage.perform_reduce_grad = self.state.sampled(stage.perform_reduce_grad)

    def result(self) -> dict[str, Any]:
        return {
            "pp_rank": self.trainer.layout.coord("pp"),
            "stage_ids": list(self.trainer.stage_ids),
            "state": dict(self.state.peak),
            "per_mb": self.saved.per_mb(),
            "peak": self.saved.peak,
            "at_peak": self.saved.at_peak,
            "excluded": dict(self.saved.excluded),
            "comm": dict(self.comm.bytes),
            "calls": {f"{a}/{k}": (n, self.comm.kind_bytes[(a, k)]) for (a, k), n in self.comm.calls.items()},
            "scalars": {f"{a}/{k}": n for (a, k), n in self.comm.scalars.items()},
            "ops": dict(self.comm.ops),
        }
