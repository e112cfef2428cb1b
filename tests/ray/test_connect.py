"""`workers.run.connect()` joins Ray without taking the caller's SIGTERM handler: ray.init installs
one that exits at once, which under `fourfold up` would end the service without stopping its jobs
gracefully (seen: exit by SIGABRT, the running job left RUNNING with its attempt open)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]

PROGRAM = """
import signal
import ray
from workers.run import connect

def mine(signum, frame):
    pass

signal.signal(signal.SIGTERM, mine)
connect()
print("kept" if signal.getsignal(signal.SIGTERM) is mine else "replaced", flush=True)
ray.shutdown()
"""


def test_connect_keeps_the_callers_sigterm_handler() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local cluster on loopback
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "kept", out.stdout
