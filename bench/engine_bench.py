"""One-process CPU training benchmark of the engine's model: tokens/s, TFLOP/s, MFU and peak RSS.

Builds `parallel.model.Transformer` for a preset, measures the CPU matmul peak once, then runs warm-up
and timed steps of AdamW with cross-entropy on synthetic tokens, outside the trainer so the numbers
are the model's own cost.

    python bench/engine_bench.py --preset debug --steps 10 --seq-len 256 --micro-batch 4
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch
import torch.nn.functional as F

from parallel.config import ModelConfig
from parallel.flops import achieved_tflops, flops_per_token, measure_cpu_matmul_tflops, mfu, param_count, peak_tflops
from parallel.model import Transformer
from parallel.parallelize import apply_compile


def _peak_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="debug", help="model preset (tiny, debug, 125m, ...)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="compile each block, as train.compile does")
    args = parser.parse_args(argv)
    if min(args.steps, args.seq_len, args.micro_batch) < 1 or args.warmup < 0:
        parser.error("--steps, --seq-len and --micro-batch must be positive, --warmup non-negative")
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = ModelConfig(preset=args.preset)
    batch, seq = args.micro_batch, args.seq_len
    print(
        f"engine_bench torch={torch.__version__} threads={torch.get_num_threads()} preset={args.preset} "
        f"params={param_count(cfg) / 1e6:.2f}M seq_len={seq} micro_batch={batch} "
        f"warmup={args.warmup} steps={args.steps} compile={args.compile}",
        flush=True,
    )
    peak, origin = peak_tflops(torch.device("cpu"), torch.float32, None)
    print(f"peak: {peak:.4f} TFLOP/s ({origin})", flush=True)

    torch.manual_seed(args.seed)
    model = Transformer(cfg)
    model.init_weights(args.seed)
    model.train()
    if args.compile:
        apply_compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    total = args.warmup + args.steps
    data = torch.randint(0, cfg.vocab_size, (total, batch, seq + 1), generator=gen)

    def step(i: int) -> float:
        inputs, targets = data[i, :, :-1], data[i, :, 1:]
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()  # forces the step to finish before the clock is read

    compiling = time.perf_counter()
    for i in range(args.warmup):
        step(i)
    if args.compile:
        print(f"compile + warm-up: {time.perf_counter() - compiling:.1f} s", flush=True)
    times, loss = [], float("nan")
    for i in range(args.warmup, total):
        start = time.perf_counter()
        loss = step(i)
        times.append(time.perf_counter() - start)

    # The machine's speed moves while the steps run (a shared host): measured once more after them, the
    # matmul peak is the higher of the two, so a slow moment during the first measurement cannot make
    # MFU read above 100%.
    after = measure_cpu_matmul_tflops()
    print(f"peak after the steps: {after:.4f} TFLOP/s; MFU against the higher", flush=True)
    peak = max(peak, after)
    elapsed = sum(times)
    tokens_per_s = batch * seq * args.steps / elapsed
    fpt = flops_per_token(cfg, seq)
    print(
        f"step {1e3 * elapsed / args.steps:.1f} ms (min {1e3 * min(times):.1f}, max {1e3 * max(times):.1f})  "
        f"tokens/s {tokens_per_s:,.0f}  achieved {achieved_tflops(tokens_per_s, fpt, 1):.4f} TFLOP/s  "
        f"MFU {100 * mfu(tokens_per_s, fpt, 1, peak):.1f}%  peak RSS {_peak_rss_mib():.0f} MiB  "
        f"loss {loss:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
