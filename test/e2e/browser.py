"""Headless Chromium (Debian's ``chromium``) driven over the DevTools protocol, for page tests."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
import websocket

# The flags this machine's closed network needs (no background fetches, no QUIC) plus a private profile.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--remote-debugging-port=0", "--window-size=1360,1000")

# A dialog (alert/confirm/prompt) the page opens: message -> (accept, prompt text).
DialogAnswer = Callable[[str], tuple[bool, str]]


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Tab:
    """One page target: commands, JavaScript evaluation, dialogs, screenshots."""

    def __init__(self, ws_url: str) -> None:
        self.ws = websocket.create_connection(ws_url, timeout=120, suppress_origin=True)
        self._next_id = 0
        self.dialogs: list[str] = []
        self.answer_dialog: DialogAnswer = lambda message: (True, "")
        self.send("Page.enable")
        self.send("Runtime.enable")

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        sent = self._next_id
        self.ws.send(json.dumps({"id": sent, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("method") == "Page.javascriptDialogOpening":
                text = message["params"]["message"]
                self.dialogs.append(text)
                accept, prompt_text = self.answer_dialog(text)
                self._next_id += 1
                self.ws.send(json.dumps({"id": self._next_id, "method": "Page.handleJavaScriptDialog",
                                         "params": {"accept": accept, "promptText": prompt_text}}))
            elif message.get("id") == sent:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (promises awaited)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'")

    def wait_for(self, expression: str, timeout: float = 60.0) -> Any:
        """Evaluate ``expression`` until it is truthy; its value. Raises with the expression on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"still false after {timeout:.0f}s: {expression}")
            time.sleep(0.2)

    def wait_dialog(self, timeout: float = 60.0) -> str:
        """The message of the next dialog the page opens (answered by ``answer_dialog``)."""
        seen = len(self.dialogs)
        deadline = time.monotonic() + timeout
        while len(self.dialogs) == seen:
            if time.monotonic() > deadline:
                raise TimeoutError("the page opened no dialog")
            self.evaluate("true")
            time.sleep(0.1)
        return self.dialogs[-1]

    def click(self, selector: str) -> None:
        # Clicked from a timer so that a dialog the click opens does not block this evaluation.
        self.evaluate(f"setTimeout(() => document.querySelector({json.dumps(selector)}).click(), 0), true")

    def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page (beyond the window's height)."""
        size = self.send("Page.getLayoutMetrics")["cssContentSize"]
        shot = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                         clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def close(self) -> None:
        self.ws.close()


class Chromium:
    """A headless Chromium process with a fresh profile in ``workdir``; downloads go to ``workdir/downloads``."""

    def __init__(self, workdir: Path) -> None:
        exe = chromium_path()
        if exe is None:
            raise RuntimeError("chromium is not installed")
        self.profile = workdir / "profile"
        self.downloads = workdir / "downloads"
        self.profile.mkdir(parents=True)
        self.downloads.mkdir()
        self._log = open(workdir / "chromium.log", "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([exe, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.http = f"http://127.0.0.1:{self._debugging_port()}"
        self.tabs: list[Tab] = []

    def _debugging_port(self, timeout: float = 60.0) -> int:
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}: {(self.profile.parent / 'chromium.log').read_text()[-2000:]}")
            if port_file.exists() and port_file.read_text().strip():
                return int(port_file.read_text().split()[0])
            time.sleep(0.2)
        raise TimeoutError("chromium did not open its debugging port")

    def new_tab(self) -> Tab:
        """A new top-level tab (its own session storage); downloads are allowed into ``downloads``."""
        target = requests.put(self.http + "/json/new?about:blank", timeout=30).json()
        tab = Tab(target["webSocketDebuggerUrl"])
        tab.send("Browser.setDownloadBehavior", behavior="allow", downloadPath=str(self.downloads))
        self.tabs.append(tab)
        return tab

    def wait_download(self, name: str, timeout: float = 60.0) -> bytes:
        """The bytes of ``downloads/name`` once the download is complete; the file is then removed."""
        path = self.downloads / name
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            partial = list(self.downloads.glob("*.crdownload"))
            if path.exists() and not partial:
                data = path.read_bytes()
                path.unlink()
                return data
            time.sleep(0.2)
        raise TimeoutError(f"no download {name} in {self.downloads}: {sorted(p.name for p in self.downloads.iterdir())}")

    def close(self) -> None:
        for tab in self.tabs:
            tab.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)
        self._log.close()

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
