"""Headless Chromium as a real browser for web UIs under test, driven over the DevTools protocol on a pipe.

``--remote-debugging-pipe`` takes the protocol's JSON messages, NUL-terminated, on the browser's fd 3 and answers
on its fd 4: no port to race for and no websocket client, only the standard library. Tests poll the page with
JavaScript until what they wait for has rendered (a single-page app fills itself in after loading).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
         "--disable-extensions", "--no-first-run", "--no-default-browser-check", "--window-size=1600,1000",
         "--remote-debugging-pipe"]


class BrowserError(RuntimeError):
    pass


def chromium_path() -> str:
    """Debian's ``chromium``; an error naming ``make test``, which installs it, when it is missing."""
    found = shutil.which("chromium")
    if found is None:
        raise BrowserError("chromium is not installed: `make test` installs Debian's chromium package "
                           "(apt-get install chromium), which the MLflow UI browser test needs")
    return found


def _high_fd(fd: int) -> int:
    """A copy of ``fd`` numbered 10 or above, so moving it onto fd 3 or 4 in the child clobbers nothing."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class Browser:
    """One headless Chromium with its own profile under ``profile``; a context manager that always ends it."""

    def __init__(self, chromium: str, profile: Path) -> None:
        commands_in, self._commands = os.pipe()
        self._answers, answers_out = os.pipe()
        child_in, child_out = _high_fd(commands_in), _high_fd(answers_out)
        log = (profile.parent / f"{profile.name}.log").open("wb")
        # bash moves the pipe ends onto fds 3 and 4, where Chromium expects them, then becomes Chromium.
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{child_in} 4>&{child_out} {child_in}<&- {child_out}>&-',
             chromium, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(child_in, child_out), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        os.close(child_in)
        os.close(child_out)
        self._buffer, self._next_id = b"", 0
        self._poll = select.poll()
        self._poll.register(self._answers, select.POLLIN)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, method: str, params: dict | None = None, session: str | None = None,
              timeout_s: float = 30) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout_s
        while True:  # events arrive between the answers: skip them
            answer = self._read(deadline)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise BrowserError(f"{method}: {answer['error']}")
                return answer["result"]

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            # poll, not select: in a long test session the pipe's descriptor can be above select's 1024
            if left <= 0 or not self._poll.poll(left * 1000):
                raise BrowserError("Chromium did not answer in time")
            chunk = os.read(self._answers, 1 << 16)
            if not chunk:
                raise BrowserError(f"Chromium exited ({self.process.poll()})")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, url: str) -> str:
        """A new tab loading ``url``; returns its session for :meth:`wait_for`."""
        target = self._send("Target.createTarget", {"url": url})["targetId"]
        return self._send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def evaluate(self, session: str, expression: str) -> Any:
        """The JSON value of ``expression`` in the tab (awaited when it is a promise)."""
        result = self._send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                 "awaitPromise": True}, session)
        if "exceptionDetails" in result:
            raise BrowserError(result["exceptionDetails"].get("exception", {}).get("description")
                               or result["exceptionDetails"].get("text"))
        return result["result"].get("value")

    def wait_for(self, session: str, expression: str, timeout_s: float = 90) -> Any:
        """Poll ``expression`` until it is truthy (the page has rendered what it computes); return that value."""
        deadline, last = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(session, expression)
            except BrowserError as err:  # e.g. the page is still navigating: no context to evaluate in yet
                value, last = None, err
            if value:
                return value
            time.sleep(0.25)
        raise BrowserError(f"the page did not render what was awaited within {timeout_s}s (last error: {last})")

    def close(self) -> None:
        with contextlib.suppress(BrowserError, OSError):  # it may have exited already
            self._send("Browser.close", timeout_s=5)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:  # it and its renderers and helpers share its process group
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        for fd in (self._commands, self._answers):
            os.close(fd)
