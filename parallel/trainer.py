"""The training loop: build the parallel model, then step it and report metrics.

A run reads top to bottom in `Trainer.__init__`: build the model on the meta device,
parallelize it (parallel/parallelize.py states the order of construction), the optimizer, the
data, resume from a checkpoint; then `run` loops over the steps.

    python -c "from parallel.trainer import Trainer; from parallel.spec_files import load_config; \
Trainer(load_config(None)).run()"
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel.checkpoint import Checkpointer, resolve_resume
from parallel.comms import watch
from parallel.config import Config, TrainConfig
from parallel.context_parallel import shard_sequence
from parallel.data import DataStream, TokenSource, build_source
from parallel.flops import achieved_tflops, flops_per_token, peak_tflops
from parallel.mesh import Layout, init_distributed
from parallel.moe import RouterStats
from parallel.parallelize import build_model, build_optimizer, compile_seconds, compute_dtype, parallelize
from parallel.pipeline_parallel import Pipeline, stage_ids
from parallel.snapshot import Snapshots
from parallel.tensor_parallel import loss_context


def lr_at(step: int, t: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warm-up, cosine to a floor."""
    if t.warmup_steps and step <= t.warmup_steps:
        return t.lr * step / t.warmup_steps
    decay_steps = max(t.steps - t.warmup_steps, 1)
    progress = min((step - t.warmup_steps) / decay_steps, 1.0)
    floor = t.lr * t.min_lr_ratio
    return floor + (t.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class Trainer:
    """One rank's share of a training run. Every rank constructs one and calls `run`."""

    def __init__(
        self,
        cfg: Config,
        metrics_file: str | Path | None = None,
        source: TokenSource | None = None,
        resume: str | bool | None = None,
    ) -> None:
        """resume: a checkpoint path, `auto`, None to follow cfg.checkpoint.resume, or False for none
        (the state comes from elsewhere: `parallel.peer`)."""
        self.cfg, p = cfg, cfg.parallel
        self.device = init_distributed(p.timeout_s)
        self.rank = dist.get_rank()
        self.layout = Layout.build(p, self.device)
        self.dtype = compute_dtype(cfg, self.device)
        torch.manual_seed(cfg.train.seed)
        # build, parallelize, optimizer (and with pp > 1 the schedule that runs the stages)
        self.stage_ids = stage_ids(self.layout.coord("pp"), p)  # the pipeline stages this rank holds
        self.parts = build_model(cfg, self.stage_ids)
        parallelize(self.parts, self.layout, cfg)
        self.optimizer = build_optimizer(self.parts, self.layout, cfg)
        self.pipeline = None
        if p.pp > 1:
            self.pipeline = Pipeline(
                cfg, self.parts, self.stage_ids, self.layout.group("pp"), self.device, self._loss_fn
            )
        # mixture of experts: the aux loss's share of the gradient, and the router's metrics per step
        self.router = None
        if cfg.model.moe is not None:
            scale = 1.0 if self.pipeline is not None else 1.0 / cfg.grad_accum  # as the loss is divided
            data_groups = self.layout.groups("cp", "dp_replicate", "dp_shard")
            self.router = RouterStats(self.parts, cfg.model.moe, scale, data_groups, self.layout.groups("pp"))
        # data
        if source is None:
            source = build_source(cfg.data, cfg.train.seq_len, cfg.train.seed, cfg.model.vocab_size)
        self.data = DataStream(source, cfg.train.global_batch, cfg.train.micro_batch, self.layout.dp_rank, p.dp)
        self.step = 0
        # What this rank is doing now (read by a launcher's heartbeat thread to name where a hung
        # rank was): starting, data, forward-backward, optimizer, loss, checkpoint, idle.
        self.phase = "idle"
        # in-memory snapshots between checkpoints, and resume
        self.snapshots = Snapshots(cfg.checkpoint.memory_every) if cfg.checkpoint.memory_every else None
        self._since_ckpt: list[dict[str, Any]] = []  # step metrics not yet in a checkpoint
        self._ckpt_wait_s = 0.0  # waited this step for an asynchronous save's copy of the state
        self.checkpointer = self._resume(resume)
        # metrics
        self.flops_per_token = flops_per_token(cfg.model, cfg.train.seq_len)
        self.peak_tflops, self.peak_source = peak_tflops(self.device, self.dtype, cfg.metrics.peak_tflops)
        self._metrics_out: IO[str] | None = None
        if metrics_file is not None and self.rank == 0:
            Path(metrics_file).parent.mkdir(parents=True, exist_ok=True)
            self._metrics_out = open(metrics_file, "a")  # noqa: SIM115 (closed in close())

    def _resume(self, resume: str | bool | None) -> Checkpointer | None:
        """The checkpointer, when checkpoints are written or read; loads the one to resume from."""
        path, meta = (None, None) if resume is False else resolve_resume(self.cfg, resume or None)
        if not (self.cfg.checkpoint.dir or path):
            return None
        checkpointer = Checkpointer(self.cfg, self.parts, self.optimizer, self.rank)
        if path is not None:
            checkpointer.load(path)
            self.step = meta["step"]
            self.data.load_state_dict(meta["data"])
            if self.rank == 0:
                print(f"fourfold: resumed from {path} at step {self.step}", flush=True)
        return checkpointer

    # -- one optimizer step --------------------------------------------------------
    @staticmethod
    def _loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean token cross entropy; logits (B, T, V) are a vocab-sharded DTensor under TP."""
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1))

    def _forward_backward(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Gradients of the mean loss over this rank's micro-batches; returns that mean loss."""
        p = self.cfg.parallel
        if self.pipeline is not None:
            inputs = torch.cat([b[0] for b in batches])  # (M*B, T): the schedule splits it again
            labels = torch.cat([b[1] for b in batches])
            with loss_context(p.tp), watch("pp", self.pipeline.describe):
                total = self.pipeline.step(inputs, labels)
            self.optimizer.after_backward(last_microbatch=True)
            return total
        (model,) = self.parts
        total = torch.zeros((), device=self.device)
        axes = "/".join(a for a, on in (("tp", p.tp > 1), ("dp_shard", p.zero == 3), ("cp", p.cp > 1)) if on)
        for i, (inputs, labels) in enumerate(batches):
            self.optimizer.before_backward(last_microbatch=i == len(batches) - 1)
            with loss_context(p.tp), watch(axes or "none", f"forward/backward of micro-batch {i}"):
                logits = model(inputs)
                loss = self._loss_fn(logits, labels) / len(batches)
                loss.backward()
            total += loss.detach().full_tensor() if hasattr(loss, "full_tensor") else loss.detach()
            self.optimizer.after_backward(last_microbatch=i == len(batches) - 1)
        return total

    def train_step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        compiled_before = compile_seconds() if self.cfg.train.compile else 0.0
        p = self.cfg.parallel
        self.phase = "data"
        self.optimizer.zero_grad()
        cp_rank = self.layout.coord("cp")
        batches = [
            (shard_sequence(x, p.cp, cp_rank).to(self.device), shard_sequence(y, p.cp, cp_rank).to(self.device))
            for x, y in self.data.next_step()
        ]
        self.phase = "forward-backward"
        total = self._forward_backward(batches)
        self.phase = "loss"
        # Each rank's loss is the mean over its tokens; every (dp, cp) rank holds as many
        # tokens, so the global mean is their average. Only last-stage ranks hold a loss.
        # Reduced before the update, so the update is the step's last work that touches a peer
        # (but ZeRO 1-2's gather of the updated shards): `clean_step`.
        with watch("dp/cp/pp", "all-reduce of the loss"):
            for group in self.layout.groups("pp", "cp", "dp_replicate", "dp_shard"):
                dist.all_reduce(total, group=group)
        step = self.step + 1
        lr = lr_at(step, self.cfg.train)
        if self.checkpointer is not None:  # an asynchronous save still copying the state it is about to change
            self.phase = "checkpoint"
            self._ckpt_wait_s += self.checkpointer.before_update()
        self.phase = "optimizer"
        norm = self.optimizer.step(lr, self.cfg.train.grad_clip)
        router = self.router.step(self.device) if self.router is not None else {}  # moves routing biases
        self.step = step
        # The step's one wait for the device: loss and norm read together (it also ends the step's
        # work on a GPU, so the step time below is the step's).
        total_loss, grad_norm = torch.stack([total.float().reshape(()), norm.float().reshape(())]).tolist()
        loss_value = total_loss / (p.dp * p.cp)
        step_time = time.perf_counter() - t0
        compile_s = compile_seconds() - compiled_before if self.cfg.train.compile else 0.0
        step_time = max(step_time - compile_s, 1e-9)  # the step's own time: compiling is reported apart
        self.phase = "idle"
        tokens_per_s = self.cfg.train.global_batch * self.cfg.train.seq_len / step_time
        tflops = achieved_tflops(tokens_per_s, self.flops_per_token, dist.get_world_size())
        return {
            "step": self.step,
            "loss": loss_value,
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens_per_s": tokens_per_s,
            "tflops": tflops,
            "mfu": tflops / self.peak_tflops,
            "step_time_s": step_time,
            "peak_mem_bytes": peak_memory_bytes(self.device),
            **({"compile_s": compile_s} if self.cfg.train.compile else {}),
            **router,
        }

    @property
    def clean_step(self) -> int | None:
        """The step this rank's parameters and optimizer states are exactly at, or None in the middle
        of an update (a step that failed there leaves them half old, half new). A rank whose step
        failed anywhere else is still clean at the step before: `parallel.peer` recovers from it."""
        return None if self.optimizer.mutating else self.step

    def run(self, on_step: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """Train to cfg.train.steps; rank 0 writes and prints metrics. Returns them all."""
        history = []
        if self.rank == 0:
            print(self._banner(), flush=True)
        while self.step < self.cfg.train.steps:
            metrics = self.train_step()
            if self.checkpointer is not None:
                self._since_ckpt.append(dict(metrics))
            metrics["ckpt_block_s"] = self._maybe_checkpoint()
            if self.snapshots is not None:
                metrics["snapshot_s"] = self.snapshots.maybe_take(self)
            history.append(metrics)
            if self.rank == 0:
                self._report(metrics)
            if on_step is not None:
                on_step(metrics)
        if self.checkpointer is not None:
            self.checkpointer.finish()
        return history

    def _maybe_checkpoint(self) -> float:
        """Save when due; returns the seconds the step was blocked by checkpointing."""
        c, ck = self.cfg.checkpoint, self.checkpointer
        if ck is None or not c.dir:
            return 0.0
        waited, self._ckpt_wait_s = self._ckpt_wait_s, 0.0  # this step's wait for a save's copy
        start = time.perf_counter() - waited
        self.phase = "checkpoint"
        ck.poll()
        due = self.step == self.cfg.train.steps or (c.every > 0 and self.step % c.every == 0)
        if due:
            ck.save(self.step, self.checkpoint_meta())
        self.phase = "idle"
        return time.perf_counter() - start

    def checkpoint_meta(self) -> dict:
        """What a checkpoint records besides the tensors: data position, LR, layout, the job's config,
        and the metrics of the steps since the previous checkpoint (a supervisor that died before
        storing them finds them here)."""
        recent, self._since_ckpt = self._since_ckpt, []
        return {
            "data": self.data.state_dict(),
            "lr": lr_at(self.step, self.cfg.train),
            "layout": self.cfg.parallel.model_dump(),
            "config": self.cfg.model_dump(mode="json", by_alias=True),
            "metrics": recent,
        }

    def _banner(self) -> str:
        p = self.cfg.parallel
        n_params = sum(q.numel() for m in self.parts for q in m.parameters())  # local numel; informative
        return (
            f"fourfold: {self.cfg.name} | world {dist.get_world_size()} = pp {p.pp} x dp {p.dp} "
            f"(replicate {p.dp_replicate}) x cp {p.cp} x tp {p.tp} | zero {p.zero} | {self.device.type} "
            f"{str(self.dtype).removeprefix('torch.')} | local params {n_params:,} | peak "
            f"{self.peak_tflops:.3f} TFLOP/s ({self.peak_source})"
        )

    def _report(self, m: dict[str, Any]) -> None:
        if self._metrics_out is not None:
            self._metrics_out.write(json.dumps(m) + "\n")
            self._metrics_out.flush()
        if m["step"] % self.cfg.metrics.log_every == 0 or m["step"] == self.cfg.train.steps:
            print(
                f"step {m['step']:>5}/{self.cfg.train.steps} | loss {m['loss']:.4f} | grad_norm "
                f"{m['grad_norm']:.3f} | lr {m['lr']:.2e} | {m['tokens_per_s']:,.0f} tok/s | "
                f"mfu {m['mfu'] * 100:.1f}% | {m['step_time_s'] * 1000:.0f} ms",
                file=sys.stdout,
                flush=True,
            )

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter whole (gathered from TP/FSDP shards and pipeline stages), on every rank."""
        out = {}
        for model in self.parts:
            for name, p in model.named_parameters():
                full = p.full_tensor() if hasattr(p, "full_tensor") else p
                out[name.replace("_checkpoint_wrapped_module.", "")] = full.detach().cpu().clone()
        if self.cfg.parallel.pp > 1:
            gathered: list[dict[str, torch.Tensor]] = [{} for _ in range(self.cfg.parallel.pp)]
            dist.all_gather_object(gathered, out, group=self.layout.group("pp"))
            out = {k: v for d in gathered for k, v in d.items()}
        return out

    def close(self) -> None:
        self.optimizer.close()
        if self.checkpointer is not None:
            self.checkpointer.close()
        if self._metrics_out is not None:
            self._metrics_out.close()
            self._metrics_out = None
