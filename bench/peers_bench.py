"""The engine next to plain PyTorch peers, in one run: dp=2 ZeRO-0 vs plain DDP, ZeRO-3 vs plain FSDP2,
each also with train.compile (regional torch.compile of the blocks; compile time not counted).

Two processes (gloo on 127.0.0.1, one thread each) build every contender once on the same model
class (`parallel.model.Transformer`, the preset given), then time them in turn, --rounds times
(interleaved: whatever the machine does meanwhile falls on all of them alike):

- fourfold: `parallel.trainer.Trainer` with parallel.dp=2 and zero 0 or 3, one `train_step` a step
  (its data loader, the loss all-reduce and the metrics it reports included);
- the peers: a loop of forward, cross-entropy, backward and AdamW over `DistributedDataParallel`, or
  over `fully_shard` applied to each block and then the root (FSDP2), on pre-made random tokens.

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
import torch.multiprocessing as mp

PAIRS = (
    ("fourfold ZeRO-0", "plain DDP"),
    ("fourfold ZeRO-0 compiled", "plain DDP"),
    ("fourfold ZeRO-3", "plain FSDP2"),
    ("fourfold ZeRO-3 compiled", "plain FSDP2"),
)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ours(args: argparse.Namespace, zero: int, compile: bool = False) -> Any:
    from parallel.config import build_config
    from parallel.trainer import Trainer

    spec = {
        "model": {"preset": args.preset},
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
    from torch.nn.parallel import DistributedDataParallel

    from parallel.config import ModelConfig
    from parallel.model import Transformer

    cfg = ModelConfig(preset=args.preset)
    torch.manual_seed(0)
    model = Transformer(cfg, max_seq_len=args.seq_len)
    model.init_weights(0)
    if kind == "plain DDP":
        model = DistributedDataParallel(model)
    else:
        for block in model.layers.values():
            fully_shard(block)
        fully_shard(model)
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


def _rank(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")  # fmt: skip
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo")
    steps = {
        "fourfold ZeRO-0": _ours(args, 0),
        "fourfold ZeRO-0 compiled": _ours(args, 0, compile=True),
        "plain DDP": _peer(args, "plain DDP"),
        "fourfold ZeRO-3": _ours(args, 3),
        "fourfold ZeRO-3 compiled": _ours(args, 3, compile=True),
        "plain FSDP2": _peer(args, "plain FSDP2"),
    }
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
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="debug")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each contender per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"fourfold-peers-{os.getpid()}.json"
    mp.spawn(_rank, args=(_port(), args, str(out)), nprocs=2)
    times = json.loads(out.read_text())
    out.unlink()
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"peers_bench preset={args.preset} seq={args.seq_len} global_batch={args.global_batch} dp=2, "
          f"{args.rounds} rounds x {args.steps} steps each, interleaved")  # fmt: skip
    print(f"{'':<26} {'median ms':>10} {'min ms':>8} {'max ms':>8}")
    for name, t in times.items():
        print(f"{name:<26} {med[name] * 1e3:>10.1f} {min(t) * 1e3:>8.1f} {max(t) * 1e3:>8.1f}")
    ratios = {f"{ours} vs {peer}": med[peer] / med[ours] for ours, peer in PAIRS}
    for pair, ratio in ratios.items():
        print(f"{pair}: {ratio:.2f}x (peer's step time / ours)")
    if args.json:
        args.json.write_text(json.dumps({"median_s": med, "ratios": ratios, "args": vars(args) | {"json": None}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
