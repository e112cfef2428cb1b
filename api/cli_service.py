"""The `fourfold` commands that run or talk to the service (see api/cli.py for the others)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

Fail = Callable[[str], typer.Exit]


def _url() -> str:
    return os.environ.get("FOURFOLD_URL", "http://127.0.0.1:8000").rstrip("/")


def _client() -> httpx.Client:
    token = os.environ.get("FOURFOLD_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=_url(), headers=headers, timeout=30)


def register(app: typer.Typer, fail: Fail) -> None:  # noqa: C901 (one closure per command)
    def call(method: str, path: str, **kw: Any) -> Any:
        try:
            with _client() as c:
                r = c.request(method, path, **kw)
        except httpx.HTTPError as err:
            raise fail(f"cannot reach the service at {_url()} ({err}); start it with `fourfold up`") from None
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise fail(f"{r.status_code}: {detail if isinstance(detail, str) else json.dumps(detail)}")
        return r.json()

    @app.command()
    def up(
        host: str = "127.0.0.1",
        port: int = 8000,
        data_dir: Annotated[Path | None, typer.Option(help="store, pid file and logs")] = None,
        detach: Annotated[bool, typer.Option(help="run in the background")] = False,
    ) -> None:
        """Start the service: a local Ray head (unless RAY_ADDRESS names one), the store and the API."""
        from service.settings import Settings

        kw = {"host": host, "port": port, **({"data_dir": data_dir} if data_dir else {})}
        settings = Settings(**kw)
        if not settings.auth_enabled and host not in ("127.0.0.1", "localhost"):
            raise fail(f"--host {host}: no tokens are configured (FOURFOLD_TOKENS), so only 127.0.0.1 is allowed")
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        pid_file = settings.data_dir / "fourfold.pid"
        url = f"http://{host}:{port}/"
        try:
            if httpx.get(url + "healthz", timeout=2).status_code == 200:
                typer.echo(f"fourfold is already up; dashboard: {url}")
                return
        except httpx.HTTPError:
            pass
        if detach:
            args = [sys.executable, "-m", "api.cli", "up", "--host", host, "--port", str(port)]
            args += ["--data-dir", str(settings.data_dir)]
            with open(settings.data_dir / "service.log", "ab") as out:
                proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise fail(f"the service exited (code {proc.returncode}); see {settings.data_dir / 'service.log'}")
                try:
                    if httpx.get(url + "healthz", timeout=2).status_code == 200:
                        typer.echo(f"fourfold is up (pid {proc.pid}); dashboard: {url}")
                        return
                except httpx.HTTPError:
                    time.sleep(0.5)
            raise fail(f"the service did not answer within 120 s; see {settings.data_dir / 'service.log'}")
        import uvicorn

        from api.app import create_app

        if not settings.auth_enabled:
            typer.echo("fourfold: no tokens configured: no authentication, listening on 127.0.0.1 only")
        pid_file.write_text(str(os.getpid()))
        typer.echo(f"fourfold: dashboard at {url}  (store: {settings.db_url})", err=False)
        try:
            uvicorn.run(create_app(settings, supervise=True), host=host, port=port, log_level="warning")
        finally:
            pid_file.unlink(missing_ok=True)

    @app.command()
    def down(data_dir: Annotated[Path | None, typer.Option(help="as given to `up`")] = None) -> None:
        """Stop the service that `fourfold up` started."""
        from service.settings import Settings

        pid_file = (Settings(**({"data_dir": data_dir} if data_dir else {}))).data_dir / "fourfold.pid"
        if not pid_file.exists():
            raise fail(f"no running service found ({pid_file} does not exist)")
        pid = int(pid_file.read_text())
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pid_file.unlink(missing_ok=True)
            raise fail(f"process {pid} is gone; removed the stale {pid_file}") from None
        for _ in range(120):
            if not pid_file.exists():
                break
            time.sleep(0.5)
        typer.echo(f"stopped fourfold (pid {pid})")

    @app.command()
    def submit(file: Path, priority: Annotated[int | None, typer.Option(help="higher starts first")] = None) -> None:
        """Submit a job spec (YAML); prints the job id."""
        import yaml

        if not file.is_file():
            raise fail(f"{file}: no such file")
        try:
            spec = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as err:
            raise fail(f"{file}: not valid YAML ({err})") from None
        if priority is not None and isinstance(spec, dict):
            spec["priority"] = priority
        job = call("POST", "/v1/jobs", json=spec)
        typer.echo(job["id"])

    @app.command()
    def jobs(state: Annotated[str | None, typer.Option(help="only jobs in this state")] = None) -> None:
        """List jobs, newest first."""
        data = call("GET", "/v1/jobs", params={"state": state} if state else {})
        typer.echo(f"{'ID':<12}  {'NAME':<16}  {'STATE':<10}  {'PRIO':>4}  {'OWNER':<10}  CREATED")
        for j in data["items"]:
            typer.echo(
                f"{j['id'][:12]:<12}  {j['name'][:16]:<16}  {j['state']:<10}  {j['priority']:>4}  "
                f"{j['owner'][:10]:<10}  {j['created_at'][:19]}"
            )

    @app.command()
    def status(job_id: str) -> None:
        """One job: state, progress, latest loss and throughput."""
        j = call("GET", f"/v1/jobs/{job_id}")
        typer.echo(f"{j['id']}  {j['name']}  {j['state']}  attempts {j['attempts']}")
        if j["step"] is not None:
            typer.echo(f"step {j['step']}/{j['steps']}  loss {j['loss']:.4f}  {j['tokens_per_s']:,.0f} tok/s")
        if j["failure_reason"]:
            typer.echo(f"failure: {j['failure_reason']}")

    @app.command()
    def cancel(job_id: str) -> None:
        """Cancel a queued or running job (a running one stops after its current step)."""
        j = call("POST", f"/v1/jobs/{job_id}/cancel")
        typer.echo(f"{j['id']}  {j['state']}  (cancel requested)")

    @app.command()
    def logs(job_id: str, follow: Annotated[bool, typer.Option("--follow", "-f")] = False) -> None:
        """Print a job's log; --follow shows a live progress bar until the job ends."""
        after = 0
        while True:
            for line in call("GET", f"/v1/jobs/{job_id}/logs", params={"after_id": after}):
                after = line["id"]
                if not follow:
                    typer.echo(line["line"])
            if not follow:
                return
            j = call("GET", f"/v1/jobs/{job_id}")
            _bar(j)
            if j["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
                typer.echo(f"\n{j['state']}" + (f": {j['failure_reason']}" if j["failure_reason"] else ""))
                if j["state"] != "SUCCEEDED":
                    raise typer.Exit(1)
                return
            time.sleep(1)


def _bar(j: dict) -> None:
    step, steps = j["step"] or 0, max(j["steps"], 1)
    filled = int(30 * step / steps)
    loss = f"loss {j['loss']:.4f}" if j["loss"] is not None else "loss -"
    tps = f"{j['tokens_per_s']:,.0f} tok/s" if j["tokens_per_s"] is not None else ""
    sys.stdout.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {step}/{steps} {j['state']:<9} {loss} {tps}   ")
    sys.stdout.flush()
