"""Command-line entry point of the engine.

    torchrun --nproc-per-node 4 -m parallel.train --config examples/tiny.yaml \
        --set parallel.dp=2 --set parallel.tp=2 --metrics-file runs/tiny/metrics.jsonl

Without torchrun it runs as one process. A config mistake ends with one line on
stderr naming the field and exit code 2, before any process group exists.
"""

from __future__ import annotations

import argparse
import os
import sys

from parallel.config import ConfigError, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m parallel.train", description="Train with the fourfold engine.")
    parser.add_argument("--config", help="YAML job spec (defaults apply when omitted)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one field, value parsed as YAML; repeatable",
    )
    parser.add_argument("--metrics-file", help="append one JSON object per optimizer step (global rank 0)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    try:
        cfg = load_config(args.config, args.overrides, world_size=world_size)
    except ConfigError as err:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"fourfold: config error: {err}", file=sys.stderr)
        return 2

    from parallel.trainer import Trainer  # torch.distributed is imported only for valid configs

    trainer = Trainer(cfg, metrics_file=args.metrics_file)
    try:
        trainer.run()
    finally:
        trainer.close()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
