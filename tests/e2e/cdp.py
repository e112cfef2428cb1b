"""Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON
messages ending in NUL on file descriptors 3 and 4), standard library only. What `--dump-dom` cannot
show: the address bar after scripts ran, console and CSP messages, requests and response headers.

    with Chromium() as browser:
        page = browser.page()
        page.navigate(url)
        page.wait_for("document.body.dataset.state === 'SUCCEEDED'")
        page.evaluate("location.href"); page.log_entries(); page.requests()
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Any

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


class Chromium:
    """One browser with a fresh profile (its own localStorage), closed on leaving the `with`."""

    def __init__(self, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s
        self._profile = tempfile.TemporaryDirectory(prefix="cdp-")
        to_browser, ours_w = os.pipe()
        ours_r, from_browser = os.pipe()
        # The browser reads fd 3 and writes fd 4: move our ends above them, then let bash place them.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser, from_browser)]
        for fd in (to_browser, from_browser):
            os.close(fd)
        r, w = high
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--remote-debugging-pipe",
                f"--user-data-dir={self._profile.name}", "--window-size=1200,900", "about:blank"]  # fmt: skip
        self._proc = subprocess.Popen(
            ["bash", "-c", f'exec 3<&{r} 4>&{w} {r}<&- {w}>&-; exec "$@"', "chromium", CHROMIUM, *args],
            pass_fds=(r, w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(r)
        os.close(w)
        self._out = os.fdopen(ours_w, "wb", buffering=0)
        self._in = os.fdopen(ours_r, "rb", buffering=0)
        self._next = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition(threading.RLock())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buf = b""
        while chunk := self._in.read(1 << 16):
            buf += chunk
            *messages, buf = buf.split(b"\0")
            with self._cond:
                for raw in messages:
                    msg = json.loads(raw)
                    if "id" in msg:
                        self._replies[msg["id"]] = msg
                    else:
                        self.events.append(msg)
                self._cond.notify_all()

    def send(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        with self._cond:
            self._next += 1
            ident = self._next
        msg: dict[str, Any] = {"id": ident, "method": method, "params": params}
        if session is not None:
            msg["sessionId"] = session
        self._out.write(json.dumps(msg).encode() + b"\0")
        with self._cond:
            if not self._cond.wait_for(lambda: ident in self._replies, timeout=self.timeout_s):
                raise TimeoutError(f"chromium did not answer {method} in {self.timeout_s} s")
            reply = self._replies.pop(ident)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def page(self) -> Page:
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session)
        return Page(self, session)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError, RuntimeError, TimeoutError):
            self.send("Browser.close")
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._out.close()
        self._reader.join(timeout=5)
        self._in.close()
        self._profile.cleanup()


class Page:
    def __init__(self, browser: Chromium, session: str) -> None:
        self.browser = browser
        self.session = session

    def navigate(self, url: str) -> None:
        """Open `url` and wait for its load event (scripts may still be fetching: see `wait_for`)."""
        loads = len(self._events("Page.loadEventFired"))
        self.browser.send("Page.navigate", self.session, url=url)
        with self.browser._cond:
            if not self.browser._cond.wait_for(lambda: len(self._events("Page.loadEventFired")) > loads, 30):
                raise TimeoutError(f"{url} did not load in 30 s")

    def evaluate(self, expression: str) -> Any:
        result = self.browser.send("Runtime.evaluate", self.session, expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 30.0) -> Any:
        """The expression's value once it is truthy (an exception counts as not yet)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if value := self.evaluate(expression):
                    return value
                last = "false"
            except RuntimeError as err:
                last = str(err)[:300]
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression}: still not true after {timeout_s} s ({last})")
            time.sleep(0.1)

    def _events(self, method: str) -> list[dict[str, Any]]:
        with self.browser._cond:  # reentrant: `navigate` holds it while waiting
            return [
                e["params"] for e in self.browser.events if e["method"] == method and e.get("sessionId") == self.session
            ]

    def log_entries(self) -> list[dict[str, Any]]:
        """The console's messages: the browser's own (CSP violations: source `security`), the page's
        console calls and uncaught exceptions, each as {source, level, text}."""
        entries = [e["entry"] for e in self._events("Log.entryAdded")]
        for call in self._events("Runtime.consoleAPICalled"):
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in call["args"])
            entries.append({"source": "console-api", "level": call["type"], "text": text})
        for thrown in self._events("Runtime.exceptionThrown"):
            details = thrown["exceptionDetails"]
            entries.append({"source": "exception", "level": "error",
                            "text": details.get("exception", {}).get("description", details["text"])})  # fmt: skip
        return entries

    def requests(self) -> list[dict[str, Any]]:
        """Every request the page made, in order: {url, method, headers}."""
        return [e["request"] for e in self._events("Network.requestWillBeSent")]

    def responses(self) -> list[dict[str, Any]]:
        """Every response the page got: {url, status, headers}."""
        return [e["response"] for e in self._events("Network.responseReceived")]
