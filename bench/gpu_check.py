"""GPU readiness: what the CPU test suite cannot check, in one command on a machine with CUDA.

    make gpu-check                                   # the same as: python bench/gpu_check.py
    python bench/gpu_check.py --skip memory mfu      # parity and layouts only
    python bench/gpu_check.py --peak-tflops 400      # an accelerator flops.py has no datasheet row for

It runs the engine the way a user does, `python -m parallel.train [--nproc-per-node N] --set ...
--metrics-file F`, and reads the metrics files (one JSON object per step from rank 0):

1. parity: the tiny model in fp32 on one GPU with TF32 off (NVIDIA_TF32_OVERRIDE=0, and the run's own
   banner must name the fp32 peak, not tf32) against the engine's fp32 one-process run on the CPU with
   the same config and seed. Every step's loss within 1e-4 relative and grad norm within 1e-3 (the
   CPU parity tests hold layouts to 1e-4; a GPU changes only the order of fp32 sums).
2. layouts: the same config in bf16 on one GPU, then dp (ZeRO 1 and 3), tp, pp, cp and a mix of them
   on up to all the GPUs there are (NCCL), each in bf16 (losses within 5e-3 of the CPU reference:
   bf16's rounding, no more) and in fp32 (within the parity tolerance).
3. memory: the 125m model in fp32 at dp=N (N >= 2 GPUs), zero 0-3, one micro-batch per step. The
   peak of rank 0 (torch.cuda.max_memory_allocated) must hold at least the ZeRO formula's parameters,
   gradients and AdamW states (the table of tests/dist/test_memory.py, P = params x 4 bytes), and
   what zero z saves against zero 0 must be the formula's saving within +-P: activations are the
   same at every stage, and the largest transient, a flat copy of the gradients or parameters for a
   collective, is at most P.
4. mfu: the 1b and 8b presets on one GPU in bf16 with `train.compile` and full recomputation, against
   the datasheet peak of parallel/flops.py (median of the steps after warm-up): tokens/s, MFU, peak
   memory, compile seconds; reported, and checked only to lie in (0, 1]. A preset whose fp32 weights,
   gradients and AdamW states (16 bytes a parameter) exceed the GPU is reported as not fitting (8b
   needs 120 GiB: it fits an H200's 141 GB, not an 80 GB H100).

Prints a table per check and a summary; exits 1 when a check failed, 0 otherwise. Without CUDA it
says so and exits 0 without claiming anything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a file from anywhere: `parallel` is the repository's own

# The parity config: small enough for the CPU reference to take seconds.
BASE = ["model.preset=tiny", "data.source=synthetic", "train.seq_len=256", "train.global_batch=32",
        "train.micro_batch=2", "train.seed=0"]  # fmt: skip
LOSS_FP32, GRAD_FP32, LOSS_BF16 = 1e-4, 1e-3, 5e-3
CHECKS = ("parity", "memory", "mfu")
GiB = 2**30


@dataclass
class Run:
    """One engine launch and what its metrics file says."""

    name: str
    rc: int
    rows: list[dict] = field(default_factory=list)
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.rc == 0 and bool(self.rows)

    def series(self, key: str) -> list[float]:
        return [float(r[key]) for r in self.rows]

    def why(self) -> str:
        lines = [x for x in (self.stderr or self.stdout).strip().splitlines() if x.strip()]
        return f"exit {self.rc}: {lines[-1][:200] if lines else 'no output'}"


def zero_state_bytes(n_params: int, zero: int, dp: int, bytes_per_value: int = 4) -> tuple[float, float, float]:
    """Peak bytes of (parameters, gradients, AdamW states) one rank holds at ZeRO stage `zero` over
    `dp` ranks, as tests/dist/test_memory.py states them: 1 + 1 + 2 copies of the model at stage 0;
    stage 1 shards the optimizer states, stage 3 everything; stage 2 shards the gradients it keeps,
    but each backward first produces whole gradients, so its peak is P + P/dp of them."""
    if zero not in (0, 1, 2, 3) or dp < 1:
        raise ValueError(f"zero must be 0-3 and dp positive, got zero={zero}, dp={dp}")
    p = float(n_params * bytes_per_value)
    params = p if zero < 3 else p / dp
    grads = p if zero < 2 else (p + p / dp if zero == 2 else p / dp)
    optimizer = 2 * p if zero == 0 else 2 * p / dp
    return params, grads, optimizer


def one_gpu_state_bytes(preset: str) -> int:
    """fp32 master weights, fp32 gradients and AdamW's two fp32 states of `preset` on one GPU: 16 bytes
    a parameter before any activation (the MFU check says a preset does not fit rather than OOM)."""
    from parallel.config import ModelConfig
    from parallel.flops import param_count

    return 16 * param_count(ModelConfig(preset=preset))


def max_rel_gap(got: list[float], want: list[float]) -> float:
    """The largest |got - want| / |want| over the steps; inf when the lengths differ or a value is not finite."""
    if len(got) != len(want) or not want:
        return float("inf")
    gaps = [abs(g - w) / abs(w) if w else abs(g - w) for g, w in zip(got, want, strict=True)]
    return max(gaps) if all(g == g for g in gaps) else float("inf")


def format_table(headers: list[str], rows: list[list[object]]) -> str:
    """A plain-text table: columns as wide as their widest cell, numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [bool(rows) and all(_is_number(row[i]) for row in rows) for i in range(len(headers))]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True))

    return "\n".join(line(r).rstrip() for r in [headers, ["-" * w for w in widths], *cells])


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cell(value: object) -> str:
    """ok / FAIL / - for a verdict (True, False, None), 1,234 for an int, 3 significant digits or
    an exponent for a float."""
    if isinstance(value, bool) or value is None:
        return {True: "ok", False: "FAIL", None: "-"}[value]
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.2e}" if value and abs(value) < 1e-2 else f"{value:.4g}"
    return str(value)


def layouts(n_gpus: int) -> dict[str, tuple[int, list[str]]]:
    """Layouts of the tiny model (8 heads, 4 KV heads, 4 layers) on up to `n_gpus` GPUs: each axis
    alone at the largest power of two it takes, and, from 4 GPUs, the axes mixed at 2 each."""
    d = 1 << (n_gpus.bit_length() - 1)  # the largest power of two <= n_gpus
    if d < 2:
        return {}
    out = {
        f"dp{d} zero1": (d, [f"parallel.dp={d}", "parallel.zero=1"]),
        f"dp{d} zero3": (d, [f"parallel.dp={d}", "parallel.zero=3"]),
        f"tp{min(d, 4)}": (min(d, 4), [f"parallel.tp={min(d, 4)}"]),
        f"pp{min(d, 4)} 1f1b": (min(d, 4), [f"parallel.pp={min(d, 4)}", "parallel.pp_schedule=1f1b"]),
        f"cp{d} ring": (d, [f"parallel.cp={d}"]),
    }
    if d >= 4:
        axes = ["dp", "tp", "pp", "cp"][: min(4, d.bit_length() - 1)]
        sets = [f"parallel.{a}=2" for a in axes] + (["parallel.zero=1"] if "dp" in axes else [])
        out[" x ".join(f"{a}2" for a in axes)] = (2 ** len(axes), sets)
    return out


class Checker:
    """Runs the engine and collects (check, verdict, detail) rows; `peak_sets` go into every GPU run."""

    def __init__(self, workdir: Path, peak_sets: list[str], steps: int, timeout_s: float) -> None:
        self.workdir, self.peak_sets, self.steps, self.timeout_s = workdir, peak_sets, steps, timeout_s
        self.summary: list[list[object]] = []

    def engine(self, name: str, nproc: int, sets: list[str], cpu: bool = False, steps: int | None = None) -> Run:
        metrics = self.workdir / f"{len(list(self.workdir.iterdir())):02d}.jsonl"
        cmd = [sys.executable, "-m", "parallel.train", "--metrics-file", str(metrics)]
        cmd += ["--nproc-per-node", str(nproc)] if nproc > 1 else []
        for s in [*BASE, f"train.steps={steps or self.steps}", *([] if cpu else self.peak_sets), *sets]:
            cmd += ["--set", s]
        env = {**os.environ, "NVIDIA_TF32_OVERRIDE": "0", "PYTHONPATH": str(ROOT)}
        env.pop("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", None)  # would turn TF32 on whatever torch's settings say
        if cpu:
            env["CUDA_VISIBLE_DEVICES"] = ""  # the engine picks the device by torch.cuda.is_available()
        print(f"  {name}: {' '.join(cmd[2:])}", flush=True)
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=self.timeout_s)
            rc, out, err = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc, out, err = 124, str(exc.stdout or ""), f"timed out after {self.timeout_s:.0f} s"
        rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
        return Run(name, rc, rows, out, err)

    def verdict(self, check: str, ok: bool | None, detail: str) -> None:
        self.summary.append([check, ok, detail])


def _within(what: str, gap: float, tolerance: float) -> str:
    return f"{what} {gap:.1e} {'<=' if gap <= tolerance else '>'} {tolerance:g}"


def check_parity_and_layouts(c: Checker, n_gpus: int) -> None:
    print("\n== parity (fp32, TF32 off) and layouts (bf16, fp32) against the CPU reference ==", flush=True)
    ref = c.engine("cpu fp32 reference", 1, ["train.dtype=float32"], cpu=True)
    if not ref.ok:
        c.verdict("parity", False, f"the CPU reference did not run: {ref.why()}")
        return
    want_loss, want_grad = ref.series("loss"), ref.series("grad_norm")
    rows: list[list[object]] = []
    runs = [("1 GPU", 1, [])] + [(name, n, sets) for name, (n, sets) in layouts(n_gpus).items()]
    for dtype, tol_loss, tol_grad in (("float32", LOSS_FP32, GRAD_FP32), ("bfloat16", LOSS_BF16, None)):
        for name, n, sets in runs:
            run = c.engine(f"{name} {dtype}", n, [*sets, f"train.dtype={dtype}"])
            if not run.ok:
                rows.append([name, dtype, n, None, None, None, None, False])
                c.verdict(f"{name} {dtype}", False, run.why())
                continue
            loss_gap = max_rel_gap(run.series("loss"), want_loss)
            grad_gap = max_rel_gap(run.series("grad_norm"), want_grad)
            tf32 = dtype == "float32" and "tf32)" in run.stdout  # the banner names the peak it measures against
            ok = loss_gap <= tol_loss and (tol_grad is None or grad_gap <= tol_grad) and not tf32
            rows.append([name, dtype, n, run.series("loss")[-1], loss_gap, grad_gap,
                         round(run.series("tokens_per_s")[-1]), ok])  # fmt: skip
            detail = _within("loss gap", loss_gap, tol_loss)
            if tol_grad is not None:
                detail += ", " + _within("grad gap", grad_gap, tol_grad)
            if tf32:
                detail += " (TF32 was on)"
            c.verdict("parity" if (name, dtype) == ("1 GPU", "float32") else f"{name} {dtype}", ok, detail)
    headers = ["layout", "dtype", "gpus", "last loss", "loss gap", "grad gap", "tok/s", "ok"]
    print(format_table(headers, rows), flush=True)


def check_memory(c: Checker, n_gpus: int, preset: str) -> None:
    from parallel.config import ModelConfig
    from parallel.flops import param_count

    print(f"\n== memory: peak of rank 0 at dp={n_gpus}, {preset}, fp32, against the ZeRO formulas ==", flush=True)
    n_params = param_count(ModelConfig(preset=preset))
    p = n_params * 4.0
    sets = [f"model.preset={preset}", f"parallel.dp={n_gpus}", "train.dtype=float32", "train.micro_batch=1",
            f"train.global_batch={n_gpus}", "train.seq_len=512"]  # fmt: skip
    peaks: dict[int, float] = {}
    for zero in range(4):
        run = c.engine(f"zero{zero}", n_gpus, [*sets, f"parallel.zero={zero}"], steps=2)
        if run.ok:
            peaks[zero] = float(run.rows[-1]["peak_mem_bytes"])
        else:
            c.verdict(f"memory zero{zero}", False, run.why())
    rows: list[list[object]] = []
    states = {z: sum(zero_state_bytes(n_params, z, n_gpus)) for z in range(4)}
    for zero, peak in sorted(peaks.items()):
        params, grads, opt = zero_state_bytes(n_params, zero, n_gpus)
        ok = peak >= states[zero]
        saving = measured = None
        if zero and 0 in peaks:
            saving, measured = states[0] - states[zero], peaks[0] - peak
            ok = ok and abs(measured - saving) <= p
        rows.append([zero, params / GiB, grads / GiB, opt / GiB, states[zero] / GiB, peak / GiB,
                     (peak - states[zero]) / GiB, None if saving is None else saving / GiB,
                     None if measured is None else measured / GiB, ok])  # fmt: skip
        detail = f"peak {peak / GiB:.2f} GiB {'>=' if peak >= states[zero] else '<'} states {states[zero] / GiB:.2f}"
        if saving is not None and measured is not None:
            detail += f", saves {measured / GiB:.2f} GiB, formula {saving / GiB:.2f} +- P = {p / GiB:.2f}"
        c.verdict(f"memory zero{zero}", ok, detail)
    headers = ["zero", "params", "grads", "adam", "states", "peak", "rest", "saving", "measured", "ok"]
    print(f"GiB per rank; P = {n_params:,} params x 4 bytes = {p / GiB:.2f} GiB", flush=True)
    print(format_table(headers, rows), flush=True)


def check_mfu(c: Checker, device_name: str, peak: float | None, preset: str, seq_len: int, micro_batch: int) -> None:
    """`peak`: the bf16 TFLOP/s the engine measures MFU against (None: unknown, MFU not claimed).
    One GPU, bf16 compute, `train.compile` and full recomputation, as a user would train it there."""
    import torch

    check = f"mfu {preset}"
    print(f"\n== {check}: one GPU, bf16, compile, full recomputation, seq_len {seq_len}, "
          f"micro_batch {micro_batch} ==", flush=True)  # fmt: skip
    states = one_gpu_state_bytes(preset)
    total = torch.cuda.get_device_properties(0).total_memory
    if states > total:
        need, have = states / GiB, total / GiB
        c.verdict(check, None, f"does not fit one GPU: weights, gradients and AdamW states need {need:.0f} GiB, "
                               f"the GPU has {have:.0f} GiB (shard it: zero 3)")  # fmt: skip
        return
    sets = [f"model.preset={preset}", "train.dtype=bfloat16", f"train.seq_len={seq_len}",
            f"train.micro_batch={micro_batch}", f"train.global_batch={micro_batch}", "train.compile=true",
            "parallel.activation_checkpointing=full"]  # fmt: skip
    run = c.engine(f"{preset} bf16", 1, sets, steps=10)
    if not run.ok:
        c.verdict(check, False, run.why())
        return
    timed = run.rows[3:] or run.rows  # the first steps warm up kernels and the allocator
    mfu = statistics.median(float(r["mfu"]) for r in timed)
    tflops = statistics.median(float(r["tflops"]) for r in timed)
    tok_s = statistics.median(float(r["tokens_per_s"]) for r in timed)
    compile_s = sum(float(r.get("compile_s", 0.0)) for r in run.rows)
    shown = f"{mfu * 100:.1f}%" if peak else "-"
    rows = [[device_name, preset, peak, tflops, round(tok_s), shown, run.rows[-1]["peak_mem_bytes"] / GiB, compile_s]]
    headers = ["device", "preset", "peak TFLOP/s", "achieved", "tokens/s", "MFU", "peak GiB", "compile s"]
    print(format_table(headers, rows), flush=True)
    if peak:
        c.verdict(check, 0 < mfu <= 1, f"MFU {shown} of {peak:g} TFLOP/s bf16, {tok_s:,.0f} tokens/s")
    else:
        c.verdict(check, None, f"{tflops:.1f} TFLOP/s achieved; no datasheet peak for {device_name!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=CHECKS, help="checks to leave out (parity: and layouts)"
    )
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps of the parity and layout runs")
    parser.add_argument("--memory-preset", default="125m", help="model of the memory check")
    parser.add_argument("--mfu-presets", nargs="+", default=["1b", "8b"], help="models of the MFU check")
    parser.add_argument("--mfu-seq-len", type=int, default=2048)
    parser.add_argument("--mfu-micro-batch", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of a GPU the flops.py table lacks")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one engine run may take")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device found (torch {torch.__version__}); nothing was checked.")
        return 0
    from parallel.flops import match_accelerator, table_peak_tflops

    n_gpus, name = torch.cuda.device_count(), torch.cuda.get_device_name(0)
    acc = match_accelerator(name)
    peak_sets = [] if acc and not args.peak_tflops else [f"metrics.peak_tflops={args.peak_tflops or 1.0}"]
    print(f"gpu_check: {n_gpus} x {name} ({acc.name if acc else 'not in the flops.py table'}), "
          f"torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        c = Checker(Path(tmp), peak_sets, args.steps, args.timeout)
        if "parity" not in args.skip:
            check_parity_and_layouts(c, n_gpus)
        if "memory" not in args.skip:
            if n_gpus >= 2:
                check_memory(c, n_gpus, args.memory_preset)
            else:
                c.verdict("memory", None, "needs 2 GPUs or more (ZeRO shards over dp)")
        if "mfu" not in args.skip:
            peak = args.peak_tflops or (table_peak_tflops(name, torch.bfloat16)[0] if acc and acc.bf16 else None)
            for preset in args.mfu_presets:
                check_mfu(c, name, peak, preset, args.mfu_seq_len, args.mfu_micro_batch)
    print("\n== summary ==")
    print(format_table(["check", "result", "detail"], [[a, b, d] for a, b, d in c.summary]), flush=True)
    failed = [row[0] for row in c.summary if row[1] is False]
    print(f"gpu_check: {len(failed)} of {len(c.summary)} checks failed" + (f": {', '.join(map(str, failed))}"
                                                                          if failed else ""))  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
