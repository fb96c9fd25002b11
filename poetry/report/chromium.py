"""Headless Chromium driven over the DevTools protocol, for the page's browser test and its benchmark: open a page,
run a script in it, time the load, take a screenshot.

The protocol goes over a pipe (`--remote-debugging-pipe`: Chromium reads commands on fd 3 and answers on fd 4, each
message JSON ended by a NUL byte), which needs no websocket client and no free port."""
from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

EXECUTABLES = ("chromium", "chromium-browser", "google-chrome")


class BrowserError(Exception):
    """Chromium could not be started, or did not answer in time."""


def find_chromium() -> str | None:
    return next((path for path in map(shutil.which, EXECUTABLES) if path), None)


def _on_fds_3_and_4(commands: int, answers: int):
    """A preexec_fn placing the pipe's two ends where Chromium looks for them. Both are first copied to fds >= 10,
    so that placing one cannot overwrite the other (os.pipe may have returned 3 or 4 itself)."""
    def place() -> None:
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (commands, answers)]
        os.dup2(high[0], 3)
        os.dup2(high[1], 4)

    return place


class Chromium:
    """One headless browser with one page, used as a context manager."""

    def __init__(self, width: int = 1400, height: int = 1000, timeout_s: float = 60.0):
        self.width, self.height, self.timeout_s = width, height, timeout_s
        self.next_id, self.buffer, self.events, self.session = 0, b"", [], None

    def __enter__(self) -> Chromium:
        executable = find_chromium()
        if executable is None:
            raise BrowserError(f"no Chromium found (looked for {', '.join(EXECUTABLES)})")
        # a helper process may still be writing to the profile as it is removed: that must not fail the caller
        self.profile = tempfile.TemporaryDirectory(prefix="poetry-report-chromium-", ignore_cleanup_errors=True)
        commands_read, self.commands = os.pipe()
        self.answers, answers_write = os.pipe()
        self.process = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             "--remote-debugging-pipe", f"--user-data-dir={self.profile.name}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=False,
            preexec_fn=_on_fds_3_and_4(commands_read, answers_write))
        os.close(commands_read)
        os.close(answers_write)
        try:
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            self.call("Page.enable")
            self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                      deviceScaleFactor=1, mobile=False)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.session = None
        try:
            self.call("Browser.close")  # its helper processes exit with it, before the profile is removed
            self.process.wait(timeout=10)
        except (BrowserError, OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        os.close(self.commands)
        os.close(self.answers)
        self.profile.cleanup()

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.answers], [], [], left)[0]:
                raise BrowserError(f"Chromium did not answer within {self.timeout_s:.0f} s")
            chunk = os.read(self.answers, 1 << 20)
            if not chunk:
                raise BrowserError(f"Chromium exited (code {self.process.poll()})")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, **params) -> dict:
        """Send one DevTools command (to the page, once attached) and return its result; events that arrive
        meanwhile are kept for wait_for."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout_s
        while True:
            answer = self._receive(deadline)
            if answer.get("id") == self.next_id:
                if "error" in answer:
                    raise BrowserError(f"{method}: {answer['error'].get('message')}")
                return answer.get("result", {})
            self.events.append(answer)

    def wait_for(self, event: str) -> dict:
        deadline = time.monotonic() + self.timeout_s
        while True:
            for position, message in enumerate(self.events):
                if message.get("method") == event:
                    return self.events.pop(position)["params"]
            self.events.append(self._receive(deadline))

    def open(self, path: str | Path) -> float:
        """Load a file and wait for its load event and the next painted frame; the seconds that took."""
        self.events.clear()
        started = time.perf_counter()
        self.call("Page.navigate", url=Path(path).resolve().as_uri())
        self.wait_for("Page.loadEventFired")
        self.evaluate("new Promise(done => requestAnimationFrame(() => setTimeout(done)))")
        return time.perf_counter() - started

    def evaluate(self, expression: str) -> object:
        """The value of a JavaScript expression in the page (a promise is awaited); a thrown error is raised."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"script failed: {result['exceptionDetails'].get('text')} "
                               f"{result['exceptionDetails'].get('exception', {}).get('description', '')}")
        return result["result"].get("value")

    def screenshot(self, full_page: bool = False) -> bytes:
        """PNG of the window, or of the whole page."""
        return base64.b64decode(self.call("Page.captureScreenshot", format="png",
                                          captureBeyondViewport=full_page)["data"])
