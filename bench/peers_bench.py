"""The engine next to plain PyTorch peers, in one run: dp=2 ZeRO-0 vs plain DDP, ZeRO-1 vs DDP with torch's
ZeroRedundancyOptimizer, ZeRO-2 vs FSDP2 without resharding after forward (its ZeRO-2-like mode), ZeRO-3 vs
plain FSDP2, ZeRO-0 and ZeRO-3 also with train.compile (regional torch.compile of the blocks; compile time
not counted).

Two processes (gloo on 127.0.0.1, one thread each) build every contender once on the same model
class (`parallel.model.Transformer`, the preset given), then time them in turn, --rounds times
(interleaved: whatever the machine does meanwhile falls on all of them alike):

- fourfold: `parallel.trainer.Trainer` with parallel.dp=2 and zero 0 or 3, one `train_step` a step
  (its data loader, the loss all-reduce and the metrics it reports included);
- the peers: a loop of forward, cross-entropy, backward and AdamW over `DistributedDataParallel` (AdamW
  or `ZeroRedundancyOptimizer` over AdamW), or over `fully_shard` applied to each block and then the
  root (FSDP2, with or without `reshard_after_forward`), on pre-made random tokens.

- torchtitan 0.3.0 (when it is installed: `make bench` runs this script in .venv-peers, made from
  bench/peers-requirements.txt): its own llama3 `debugmodel` built from its model registry, parallelized
  by its `parallelize_llama` (FSDP2 over dp_shard=2, its mixed-precision policy in fp32), stepped the way
  its Trainer steps (token count summed over the ranks, sum-reduced cross entropy over that count, its
  `clip_grad_norm_`, AdamW) on pre-made random tokens. Against it: fourfold ZeRO-3 on the same shape
  (dim 256, 6 layers, 16 heads, ffn 768, vocab 2048). Its CPU run needs settings its Trainer does not
  expose: `titan_cpu_settings` below says which and why.

Same global batch, sequence length and micro-batch. Prints the median step time of each and the
ratio peer / fourfold (above 1: fourfold is faster).

    python bench/peers_bench.py --preset debug --seq-len 256 --global-batch 8 --steps 5 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed
import torch.multiprocessing as mp

PAIRS = (
    ("fourfold ZeRO-0", "plain DDP"),
    ("fourfold ZeRO-0 compiled", "plain DDP"),
    ("fourfold ZeRO-1", "DDP + ZeroRedundancyOptimizer"),
    ("fourfold ZeRO-2", "FSDP2 reshard_after_forward=False"),
    ("fourfold ZeRO-3", "plain FSDP2"),
    ("fourfold ZeRO-3 compiled", "plain FSDP2"),
)
TITAN_PAIRS = (("fourfold ZeRO-3 (titan shape)", "torchtitan FSDP2"),)
# torchtitan's llama3 debugmodel, in our config's terms (fused qkv and its RoPE variant aside).
TITAN_SHAPE = {"dim": 256, "n_layers": 6, "n_heads": 16, "n_kv_heads": 16, "ffn_dim": 768, "vocab_size": 2048}


def has_torchtitan() -> bool:
    try:
        import torchtitan  # noqa: F401
    except ImportError:
        return False
    return True


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ours(args: argparse.Namespace, zero: int, compile: bool = False, shape: dict | None = None) -> Any:
    from parallel.config import build_config
    from parallel.trainer import Trainer

    spec = {
        "model": {"preset": args.preset, **(shape or {})},
        "parallel": {"dp": 2, "zero": zero},
        "train": {"steps": 10**6, "global_batch": args.global_batch, "micro_batch": args.global_batch // 2,
                  "seq_len": args.seq_len, "seed": 0, "compile": compile},
        "data": {"source": "synthetic"},
        "metrics": {"peak_tflops": 1.0},
    }  # fmt: skip
    trainer = Trainer(build_config(spec, world_size=2))
    return trainer.train_step


def _peer(args: argparse.Namespace, kind: str) -> Any:
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    from parallel.config import ModelConfig
    from parallel.model import Transformer

    cfg = ModelConfig(preset=args.preset)
    torch.manual_seed(0)
    model = Transformer(cfg, max_seq_len=args.seq_len)
    model.init_weights(0)
    if kind in ("plain DDP", "DDP + ZeroRedundancyOptimizer"):
        model = DistributedDataParallel(model)
    else:  # FSDP2; without resharding after forward it keeps whole parameters through backward (ZeRO-2's memory)
        reshard = kind == "plain FSDP2"
        for block in model.layers.values():
            fully_shard(block, reshard_after_forward=reshard)
        fully_shard(model, reshard_after_forward=reshard)
    if kind == "DDP + ZeroRedundancyOptimizer":  # torch's ZeRO-1: whole parameters per rank, states sharded
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-4)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(dist.get_rank())
    tokens = torch.randint(0, cfg.vocab_size, (args.global_batch // 2, args.seq_len + 1), generator=g)

    def step() -> None:
        opt.zero_grad()
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()

    return step


def titan_cpu_settings() -> None:
    """What torchtitan 0.3.0 needs to train on a CPU with gloo, none of it a Trainer option:
    - its device is "cuda" whenever no accelerator is found (`torchtitan.tools.utils.device_type`, also
      imported by `torchtitan.distributed.parallel_dims` for the mesh): set both to "cpu";
    - it imports triton at start-up (its MoE dispatch kernels), so triton must be installed, unused;
    - its attention backends are flex and varlen, and FlexAttention has no backward on CPU: its
      `ScaledDotProductAttention` inner attention (still in the package, causal) takes their place;
    - it turns FSDP2's gradient division off (factor 1.0), which FSDP2 runs as PREMUL_SUM, an op gloo
      lacks: `set_force_sum_reduction_for_comms(True)` makes it a SUM (the sum is what it wants).
    """
    import torchtitan.distributed.parallel_dims as titan_dims
    import torchtitan.tools.utils as titan_utils

    titan_utils.device_type, titan_utils.device_module, titan_dims.device_type = "cpu", torch.cpu, "cpu"


def _titan(args: argparse.Namespace) -> Any:
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    titan_cpu_settings()
    from torchtitan.components.loss import cross_entropy_loss
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed import utils as titan_dist
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.llama3 import model_registry, parallelize_llama

    config = model_registry("debugmodel").model
    for layer in config.layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    dims = ParallelDims(dp_replicate=1, dp_shard=2, cp=1, tp=1, pp=1, ep=1, world_size=2,
                        spmd_backend="partial_dtensor")  # fmt: skip
    dims.build_mesh()
    with torch.device("meta"):
        model = config.build()
    model = parallelize_llama(
        model, parallel_dims=dims, compile_config=CompileConfig(), ac_config=None, dump_folder=".",
        training=TrainingConfig(mixed_precision_param="float32", mixed_precision_reduce="float32"),
        parallelism=ParallelismConfig(data_parallel_shard_degree=2, spmd_backend="partial_dtensor"),
    )  # fmt: skip
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(dist.get_rank())
    tokens = torch.randint(0, TITAN_SHAPE["vocab_size"], (args.global_batch // 2, args.seq_len + 1), generator=g)
    batch_mesh = dims.get_mesh("batch")

    def step() -> None:  # its Trainer's train_step without data loading, logging and checkpointing
        opt.zero_grad()
        labels = tokens[:, 1:]
        n_tokens = titan_dist.dist_sum_tensor(torch.tensor(labels.numel()), batch_mesh)
        loss = cross_entropy_loss(model(tokens[:, :-1]), labels) / n_tokens
        loss.backward()
        titan_dist.clip_grad_norm_(list(model.parameters()), 1.0, foreach=True)
        opt.step()

    return step


def init_rank(rank: int, port: int) -> None:
    """One of the two gloo ranks on 127.0.0.1, one thread each (also bench/profile_step.py's)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")  # fmt: skip
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")


def finish_rank(rank: int, out: str, result: Any) -> None:
    """Rank 0 writes the figures for the parent process; both leave the group."""
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _rank(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    import torch.distributed as dist

    init_rank(rank, port)
    steps = {
        "fourfold ZeRO-0": _ours(args, 0),
        "fourfold ZeRO-0 compiled": _ours(args, 0, compile=True),
        "plain DDP": _peer(args, "plain DDP"),
        "fourfold ZeRO-1": _ours(args, 1),
        "DDP + ZeroRedundancyOptimizer": _peer(args, "DDP + ZeroRedundancyOptimizer"),
        "fourfold ZeRO-2": _ours(args, 2),
        "FSDP2 reshard_after_forward=False": _peer(args, "FSDP2 reshard_after_forward=False"),
        "fourfold ZeRO-3": _ours(args, 3),
        "fourfold ZeRO-3 compiled": _ours(args, 3, compile=True),
        "plain FSDP2": _peer(args, "plain FSDP2"),
    }
    if args.titan:
        steps["fourfold ZeRO-3 (titan shape)"] = _ours(args, 3, shape=TITAN_SHAPE)
        steps["torchtitan FSDP2"] = _titan(args)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():  # warm-up (and the compiled contenders' compile)
        step()
    for _ in range(args.rounds):
        for name, step in steps.items():
            dist.barrier()
            for _ in range(args.steps):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    finish_rank(rank, out, times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="debug")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each contender per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    args.titan = has_torchtitan()
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"fourfold-peers-{os.getpid()}.json"
    mp.spawn(_rank, args=(_port(), args, str(out)), nprocs=2)
    times = json.loads(out.read_text())
    out.unlink()
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"peers_bench preset={args.preset} seq={args.seq_len} global_batch={args.global_batch} dp=2, "
          f"{args.rounds} rounds x {args.steps} steps each, interleaved")  # fmt: skip
    print(f"{'':<30} {'median ms':>10} {'min ms':>8} {'max ms':>8}")
    for name, t in times.items():
        print(f"{name:<30} {med[name] * 1e3:>10.1f} {min(t) * 1e3:>8.1f} {max(t) * 1e3:>8.1f}")
    pairs = PAIRS + (TITAN_PAIRS if args.titan else ())
    ratios = {f"{ours} vs {peer}": med[peer] / med[ours] for ours, peer in pairs}
    for pair, ratio in ratios.items():
        print(f"{pair}: {ratio:.2f}x (peer's step time / ours)")
    if not args.titan:
        print("torchtitan: not installed here (make bench runs this in .venv-peers, which has it)")
    if args.json:
        args.json.write_text(json.dumps({"median_s": med, "ratios": ratios, "args": vars(args) | {"json": None}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
