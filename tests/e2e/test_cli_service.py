"""`fourfold up --detach`, `submit`, `logs --follow`, `status`, `down` as a user types them: the
service starts its own Ray head on 127.0.0.1 (no RAY_ADDRESS), runs a job, and stops."""

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]


def _fourfold(*args: str, env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "api.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)  # fmt: skip


def test_up_submit_follow_down(tmp_path: Path) -> None:
    port = 19000 + os.getpid() % 1000
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "FOURFOLD_TOKENS", "FOURFOLD_ADMIN_TOKEN")}
    env |= {"FOURFOLD_URL": f"http://127.0.0.1:{port}", "FOURFOLD_PORT": str(port)}  # the port from the environment
    data = tmp_path / "svc"
    up = _fourfold("up", "--detach", "--data-dir", str(data), env=env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr + (data / "service.log").read_text()
        assert "no tokens configured: no authentication, listening on 127.0.0.1 only" in up.stdout
        assert f"dashboard: http://127.0.0.1:{port}/" in up.stdout
        spec = tmp_path / "job.yaml"
        spec.write_text(
            "name: cli-job\nmodel: {preset: tiny}\nparallel: {dp: 2}\n"
            "train: {steps: 4, global_batch: 4, micro_batch: 2, seq_len: 32}\n"
        )
        job = _fourfold("submit", str(spec), env=env)
        assert job.returncode == 0, job.stderr
        job_id = job.stdout.strip()
        follow = _fourfold("logs", job_id, "--follow", env=env)
        assert follow.returncode == 0, follow.stdout[-2000:] + follow.stderr
        assert "4/4" in follow.stdout and follow.stdout.rstrip().endswith("SUCCEEDED")
        status = _fourfold("status", job_id, env=env)
        assert "SUCCEEDED" in status.stdout and "step 4/4" in status.stdout
        logs = _fourfold("logs", job_id, env=env).stdout.splitlines()
        assert [line.split("|")[0].strip() for line in logs if line.startswith("step ")] == [
            f"step {s}/4" for s in range(1, 5)
        ]
        bogus = _fourfold("jobs", "--state", "sleeping", env=env)
        assert bogus.returncode == 2 and "valid: QUEUED, STARTING, RUNNING" in bogus.stderr
    finally:
        down = _fourfold("down", "--data-dir", str(data), env=env, timeout=120)
    assert down.returncode == 0, down.stderr
    assert down.stdout.startswith("stopped fourfold (pid ")
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_up_refuses_what_it_cannot_do_safely(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("FOURFOLD_TOKENS", "FOURFOLD_ADMIN_TOKEN")}
    open_host = _fourfold("up", "--host", "0.0.0.0", "--data-dir", str(tmp_path), env=env)
    assert open_host.returncode == 2
    assert open_host.stderr.strip() == (
        "fourfold: error: --host 0.0.0.0: no tokens are configured (FOURFOLD_TOKENS or `fourfold token create`), "
        "so only 127.0.0.1 is allowed"
    )
    bad_tokens = _fourfold("up", "--data-dir", str(tmp_path), env={**env, "FOURFOLD_TOKENS": "alice-token"})
    assert bad_tokens.returncode == 2 and "Traceback" not in bad_tokens.stderr
    assert bad_tokens.stderr.startswith("fourfold: error: settings: tokens: Value error, entry 1: not token:user")
    assert "alice-token" not in bad_tokens.stderr and "alic" not in bad_tokens.stderr  # never a token, not even a part
    no_service = _fourfold("down", "--data-dir", str(tmp_path / "none"), env=env)
    assert no_service.returncode == 2 and "no running service found" in no_service.stderr
