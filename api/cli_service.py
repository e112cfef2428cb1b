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
            if isinstance(detail, list):  # FastAPI's validation errors: say field and reason, not JSON
                detail = "; ".join(f"{'.'.join(str(x) for x in d.get('loc', [])[1:])}: {d.get('msg')}" for d in detail)
            raise fail(f"{r.status_code}: {detail if isinstance(detail, str) else json.dumps(detail)}")
        return r.json()

    @app.command()
    def up(
        host: Annotated[str | None, typer.Option(help="default: FOURFOLD_HOST, else 127.0.0.1")] = None,
        port: Annotated[int | None, typer.Option(help="default: FOURFOLD_PORT, else 8000")] = None,
        data_dir: Annotated[Path | None, typer.Option(help="store, pid file and logs")] = None,
        detach: Annotated[bool, typer.Option(help="run in the background")] = False,
    ) -> None:
        """Start the service: a local Ray head (unless RAY_ADDRESS names one), the store and the API."""
        from pydantic import ValidationError

        from service.settings import Settings

        given = {"host": host, "port": port, "data_dir": data_dir}
        try:
            settings = Settings(**{k: v for k, v in given.items() if v is not None})
        except ValidationError as err:
            first = err.errors()[0]
            raise fail(f"settings: {'.'.join(str(x) for x in first['loc'])}: {first['msg']}") from None
        host, port = settings.host, settings.port
        from api.cli_tokens import auth_on as _auth_on

        auth_on = _auth_on(settings, fail)  # tokens in the environment or in the store
        if not auth_on and host not in ("127.0.0.1", "localhost"):
            raise fail(
                f"--host {host}: no tokens are configured (FOURFOLD_TOKENS or `fourfold token create`), "
                "so only 127.0.0.1 is allowed"
            )
        open_notice = "fourfold: no tokens configured: no authentication, listening on 127.0.0.1 only"
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
                        if not auth_on:
                            typer.echo(open_notice)
                        typer.echo(f"fourfold is up (pid {proc.pid}); dashboard: {url}")
                        return
                except httpx.HTTPError:
                    time.sleep(0.5)
            raise fail(f"the service did not answer within 120 s; see {settings.data_dir / 'service.log'}")
        import uvicorn

        from api.app import create_app

        if not auth_on:
            typer.echo(open_notice)
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
        # Running jobs stop at a step boundary and checkpoint first (up to 30 s), then it exits.
        deadline = time.monotonic() + 90
        while _alive(pid):
            if time.monotonic() > deadline:
                raise fail(f"fourfold (pid {pid}) did not stop within 90 s; `kill -9 {pid}` ends it")
            time.sleep(0.5)
        pid_file.unlink(missing_ok=True)
        typer.echo(f"stopped fourfold (pid {pid})")

    @app.command()
    def submit(file: Path, priority: Annotated[int | None, typer.Option(help="higher starts first")] = None) -> None:
        """Submit a job spec (YAML); prints the job id."""
        import yaml

        from parallel.config import read_yaml

        if not file.is_file():
            raise fail(f"{file}: no such file")
        try:
            spec = read_yaml(file.read_text()) or {}  # `lr: 1e-3` a number, as the server reads YAML
        except (OSError, UnicodeError) as err:
            raise fail(f"{file}: cannot read it as text ({err})") from None
        except yaml.YAMLError as err:
            raise fail(f"{file}: not valid YAML ({str(err).splitlines()[0]})") from None
        if priority is not None and isinstance(spec, dict):
            spec["priority"] = priority
        job = call("POST", "/v1/jobs", json=spec)
        typer.echo(job["id"])

    @app.command()
    def jobs(state: Annotated[str | None, typer.Option(help="only jobs in this state")] = None) -> None:
        """List jobs, newest first."""
        from service.states import JobState

        if state is not None and state.upper() not in JobState.__members__:
            raise fail(f"--state {state}: not a job state; valid: {', '.join(JobState.__members__)}")
        data = call("GET", "/v1/jobs", params={"state": state.upper()} if state else {})
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
            page = call("GET", f"/v1/jobs/{job_id}/logs", params={"after_id": after})
            for line in page:
                after = line["id"]
                if not follow:
                    typer.echo(line["line"])
            if not follow:
                if page:
                    continue  # the server pages; read to the end
                return
            j = call("GET", f"/v1/jobs/{job_id}")
            _bar(j)
            if j["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
                typer.echo(f"\n{j['state']}" + (f": {j['failure_reason']}" if j["failure_reason"] else ""))
                if j["state"] != "SUCCEEDED":
                    raise typer.Exit(1)
                return
            time.sleep(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A child of ours that exited (the detached service) lingers as a zombie until reaped.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return True


def _bar(j: dict) -> None:
    step, steps = j["step"] or 0, max(j["steps"], 1)
    filled = int(30 * step / steps)
    loss = f"loss {j['loss']:.4f}" if j["loss"] is not None else "loss -"
    tps = f"{j['tokens_per_s']:,.0f} tok/s" if j["tokens_per_s"] is not None else ""
    sys.stdout.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {step}/{steps} {j['state']:<9} {loss} {tps}   ")
    sys.stdout.flush()
