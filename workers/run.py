"""Run a job on a Ray cluster: the same spec and metrics file as the torchrun launcher.

    python -m workers.run --config examples/tiny.yaml --set parallel.tp=2 --metrics-file runs/t/metrics.jsonl
    python -m workers.run --config examples/tiny.yaml --explain [--json]     # the plan, nothing started

Connects to the cluster named by RAY_ADDRESS, or starts a local one on 127.0.0.1.
Exit codes: 0 done, 1 a rank failed, 2 a config or placement error (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import uuid
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m workers.run", description="Run a fourfold job on Ray.")
    parser.add_argument("--config", help="YAML job spec")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--metrics-file", help="append one JSON object per optimizer step")
    parser.add_argument("--explain", action="store_true", help="print the placement plan and exit")
    parser.add_argument("--json", action="store_true", help="with --explain: the plan as a JSON list")
    parser.add_argument("--job-id", default=None, help="names the actors and placement group (default: random)")
    parser.add_argument(
        "--skip-local-checks", action="store_true",
        help="do not open the data, init_from and checkpoint paths here (they exist only on the cluster's nodes)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.json and not args.explain:
        parser.error("--json goes with --explain (the plan as JSON)")
    return args


def connect() -> None:
    """Join RAY_ADDRESS's cluster, or start a local one bound to loopback."""
    import ray

    if ray.is_initialized():
        return
    # ray.init replaces the main thread's SIGTERM handler with one that exits at once. A caller
    # that installed its own (the service under uvicorn: stop the jobs at a step boundary and
    # checkpoint, then exit) keeps it; one that had none gets Ray's.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        else:  # a new local cluster, on loopback only (workers/__init__.py); "local": never attach to
            # another cluster that happens to run on this machine (ray.init() alone would)
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
    finally:
        if callable(previous):
            signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from parallel.config import ConfigError
    from parallel.spec_files import load_config
    from parallel.train import preflight

    try:
        cfg = load_config(args.config, args.overrides)
        if not args.explain and not args.skip_local_checks:
            preflight(cfg)  # the data, init_from and checkpoints, before the cluster is asked for anything
    except ConfigError as err:
        print(f"fourfold: config error: {err}", file=sys.stderr)
        return 2
    try:
        connect()
    except Exception as err:  # an unreachable RAY_ADDRESS, a local start that failed
        where = os.environ.get("RAY_ADDRESS") or "a local cluster on 127.0.0.1"
        print(f"fourfold: error: cannot connect to Ray ({where}): {_last_line(err)}", file=sys.stderr)
        return 2
    from workers.group import WorkerGroup
    from workers.placement import explain

    group = WorkerGroup(cfg, job_id=args.job_id or uuid.uuid4().hex[:8])
    try:
        if args.explain:
            plan = group.make_plan()
            out = json.dumps([r.as_dict() for r in plan.ranks]) if args.json else explain(plan)
            print(out)
            return 0
        group.start()
        note = f"; {group.plan.note}" if group.plan.note else ""
        print(f"fourfold: {cfg.parallel.world_size} ranks on {len(group.plan.nodes())} node(s){note}", flush=True)
        out_file = None
        if args.metrics_file:
            Path(args.metrics_file).parent.mkdir(parents=True, exist_ok=True)
            out_file = open(args.metrics_file, "a")  # noqa: SIM115 (closed in finally)

        def on_metrics(m: dict) -> None:
            print(f"step {m['step']:>6} | loss {m['loss']:.4f} | {m['tokens_per_s']:,.0f} tok/s", flush=True)
            if out_file is not None:
                out_file.write(json.dumps(m) + "\n")
                out_file.flush()

        try:
            status = group.wait(on_metrics=on_metrics)
        finally:
            if out_file is not None:
                out_file.close()
        if status.state == "failed":
            print(f"fourfold: error: a rank failed: {status.error}", file=sys.stderr)
            return 1
        return 0
    except ConfigError as err:  # PlacementError: the layout does not fit this cluster
        print(f"fourfold: placement error: {err}", file=sys.stderr)
        return 2
    finally:
        group.teardown()


def _last_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
