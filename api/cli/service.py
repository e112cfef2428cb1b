"""The `fourfold` commands that run the service or talk to it over HTTP (FOURFOLD_URL).

fourfold up --detach --data-dir runs/svc      # a local Ray head, the store, the API and dashboard
id=$(fourfold submit examples/demo.yaml)      # prints the job id
fourfold logs $id --follow                    # a progress bar until the job ends (exit 1 unless SUCCEEDED)
fourfold jobs --state running;  fourfold status $id;  fourfold cancel $id;  fourfold down
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from api.cli.common import app, call, fail, settings_or_fail
from api.cli.tokens import auth_on

OPEN_NOTICE = "fourfold: no tokens configured: no authentication, listening on 127.0.0.1 only"


@app.command()
def up(
    host: Annotated[str | None, typer.Option(help="default: FOURFOLD_HOST, else 127.0.0.1")] = None,
    port: Annotated[int | None, typer.Option(help="default: FOURFOLD_PORT, else 8000")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="store, pid file and logs")] = None,
    detach: Annotated[bool, typer.Option(help="run in the background")] = False,
) -> None:
    """Start the service: a local Ray head (unless RAY_ADDRESS names one), the store and the API."""
    settings = settings_or_fail(host=host, port=port, data_dir=data_dir)
    host, port = settings.host, settings.port
    auth = auth_on(settings)  # tokens in the environment or in the store
    if not auth and host not in ("127.0.0.1", "localhost"):
        raise fail(
            f"--host {host}: no tokens are configured (FOURFOLD_TOKENS or `fourfold token create`), "
            "so only 127.0.0.1 is allowed"
        )
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    url = f"http://{host}:{port}/"
    if _healthy(url):
        typer.echo(f"fourfold is already up; dashboard: {url}")
        return
    if detach:
        _start_detached(host, port, settings.data_dir, url, auth)
        return
    from api.app import create_app, serve

    if not auth:
        typer.echo(OPEN_NOTICE)
    pid_file = settings.data_dir / "fourfold.pid"
    pid_file.write_text(str(os.getpid()))
    typer.echo(f"fourfold: dashboard at {url}  (store: {settings.db_url})", err=False)
    try:
        serve(create_app(settings, supervise=True), host, port)
    finally:
        pid_file.unlink(missing_ok=True)


@app.command()
def down(data_dir: Annotated[Path | None, typer.Option(help="as given to `up`")] = None) -> None:
    """Stop the service that `fourfold up` started."""
    pid_file = settings_or_fail(data_dir=data_dir).data_dir / "fourfold.pid"
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

    from parallel.spec_files import read_yaml

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
        if j["finished"]:  # the server says which states are terminal
            typer.echo(f"\n{j['state']}" + (f": {j['failure_reason']}" if j["failure_reason"] else ""))
            if j["state"] != "SUCCEEDED":
                raise typer.Exit(1)
            return
        time.sleep(1)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _start_detached(host: str, port: int, data_dir: Path, url: str, auth: bool) -> None:
    """`fourfold up` again in a new session, its output in `service.log`; back once it answers."""
    args = [sys.executable, "-m", "api.cli", "up", "--host", host, "--port", str(port), "--data-dir", str(data_dir)]
    with open(data_dir / "service.log", "ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise fail(f"the service exited (code {proc.returncode}); see {data_dir / 'service.log'}")
        if _healthy(url):
            if not auth:
                typer.echo(OPEN_NOTICE)
            typer.echo(f"fourfold is up (pid {proc.pid}); dashboard: {url}")
            return
        time.sleep(0.5)
    raise fail(f"the service did not answer within 120 s; see {data_dir / 'service.log'}")


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


def _bar(j: dict[str, Any]) -> None:
    step, steps = j["step"] or 0, max(j["steps"], 1)
    filled = int(30 * step / steps)
    loss = f"loss {j['loss']:.4f}" if j["loss"] is not None else "loss -"
    tps = f"{j['tokens_per_s']:,.0f} tok/s" if j["tokens_per_s"] is not None else ""
    sys.stdout.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {step}/{steps} {j['state']:<9} {loss} {tps}   ")
    sys.stdout.flush()
