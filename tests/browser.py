"""A headless Chromium driven over the DevTools protocol: open a local page as a person would see it, read its DOM
text, its console errors and every network request it attempted, take screenshots.

Used by the browser test (``tests/test_report_browser.py``) and the screenshot script (``scripts/screenshots.py``).
Pure Python: Debian's ``chromium`` package plus ``websocket-client`` (a test extra). No network: the browser is
launched with background networking, component updates and sync off, an empty profile, and a proxy that refuses
everything, and the DevTools ``Network`` domain records every request the page attempts (refused ones included).

Example::

    with Browser(find_chromium()) as b:
        page = b.open(Path("report.html"))
        page.text, page.console_errors, page.requests
        b.screenshot("report.png")
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-extensions", "--disable-default-apps",
         "--mute-audio", "--hide-scrollbars",
         # nothing may leave the machine: every proxied request is refused (the page's attempts are still recorded)
         "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>"]
NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The Chromium executable on ``PATH`` (or ``$CHROMIUM``), or None."""
    env = os.environ.get("CHROMIUM")
    if env and Path(env).is_file():
        return env
    for name in NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class Page:
    """What a person would see of one page: its text, and what went wrong while it loaded."""

    url: str
    text: str
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    @property
    def network_requests(self) -> list[str]:
        """Requests that would leave the machine (anything but the page itself, ``data:`` and ``blob:`` URLs)."""
        return [u for u in self.requests if u != self.url and not u.startswith(("data:", "blob:", "about:"))]


class Browser:
    """Headless Chromium with one tab, driven over the DevTools protocol (a context manager)."""

    def __init__(self, executable: str, *, width: int = 1280, height: int = 900, timeout: float = 60.0):
        self.executable, self.width, self.height, self.timeout = executable, width, height, timeout
        self._id = 0
        self._events: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "Browser":
        import websocket  # websocket-client, a test extra

        self._profile = tempfile.mkdtemp(prefix="mi-lenses-chromium-")
        self._proc = subprocess.Popen(
            [self.executable, *FLAGS, f"--user-data-dir={self._profile}", "--remote-debugging-port=0",
             f"--window-size={self.width},{self.height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            port = self._port()
            deadline = time.monotonic() + self.timeout
            while True:
                targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5))
                pages = [t for t in targets if t.get("type") == "page"]
                if pages or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            if not pages:
                raise RuntimeError("Chromium opened no page target")
            self._ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=self.timeout,
                                                   suppress_origin=True)
            for domain in ("Page", "Runtime", "Log", "Network"):
                self.call(f"{domain}.enable")
            self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                      deviceScaleFactor=1, mobile=False)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        ws = getattr(self, "_ws", None)
        if ws is not None:
            try:
                ws.close()
            except Exception:
                pass
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stderr is not None:
            self._proc.stderr.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def _port(self) -> int:
        """The DevTools port Chromium picked (it writes ``DevToolsActivePort`` into the profile)."""
        marker = Path(self._profile) / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise RuntimeError(f"Chromium exited with status {self._proc.returncode}: {err[-2000:]}")
            if marker.is_file():
                lines = marker.read_text().splitlines()
                if lines and lines[0].strip().isdigit():
                    return int(lines[0])
            time.sleep(0.05)
        raise RuntimeError(f"Chromium did not open its DevTools port within {self.timeout:.0f} s")

    # ------------------------------------------------------------------------------------------ protocol
    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and return its result (events that arrive meanwhile are kept)."""
        self._id += 1
        mine = self._id
        self._ws.send(json.dumps({"id": mine, "method": method, "params": params}))
        while True:
            msg = json.loads(self._ws.recv())
            if msg.get("id") == mine:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self._events.append(msg)

    def _drain(self, seconds: float) -> None:
        """Collect events for ``seconds``."""
        import websocket

        end = time.monotonic() + seconds
        self._ws.settimeout(0.05)
        try:
            while time.monotonic() < end:
                try:
                    msg = json.loads(self._ws.recv())
                except websocket.WebSocketTimeoutException:
                    continue
                if "method" in msg:
                    self._events.append(msg)
        finally:
            self._ws.settimeout(self.timeout)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression!r} raised: {res['exceptionDetails']}")
        return res.get("result", {}).get("value")

    # ------------------------------------------------------------------------------------------ pages
    def open(self, path: str | Path, *, ready: str | None = None, settle: float = 0.5) -> Page:
        """Load a local file, wait for its load event and until the JavaScript condition ``ready`` holds (default:
        every circuitsvis view has rendered), then report what a person would see."""
        url = Path(path).resolve().as_uri()
        self._events.clear()
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + self.timeout
        while not any(e["method"] == "Page.loadEventFired" for e in self._events):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not finish loading within {self.timeout:.0f} s")
            self._drain(0.1)
        ready = ready or ("Array.from(document.querySelectorAll('[id^=circuits-vis-]'))"
                          ".every(d => d.childElementCount > 0)")
        while not self.evaluate(ready):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url}: the views did not render within {self.timeout:.0f} s ({ready})")
            self._drain(0.1)
        self._drain(settle)
        return Page(url, self.evaluate("document.body.innerText"), self._errors(),
                    [e["params"]["request"]["url"] for e in self._events if e["method"] == "Network.requestWillBeSent"])

    def _errors(self) -> list[str]:
        out = []
        for e in self._events:
            p = e["params"]
            if e["method"] == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                out.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
            elif e["method"] == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
                out.append("console.error: " + " ".join(str(a.get("value", a.get("description", "")))
                                                        for a in p["args"]))
            elif e["method"] == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}".strip())
        return out

    def screenshot(self, path: str | Path, *, selector: str | None = None, full_page: bool = False,
                   max_height: int = 4000) -> Path:
        """A PNG of the viewport, the whole page (``full_page``) or one element (CSS ``selector``)."""
        params: dict[str, Any] = {"format": "png", "captureBeyondViewport": bool(full_page or selector)}
        if selector or full_page:
            box = self.evaluate(
                "(() => { const e = " + (f"document.querySelector({json.dumps(selector)})" if selector else
                                         "document.documentElement") +
                "; const r = e.getBoundingClientRect(); return [r.left + scrollX, r.top + scrollY, "
                "Math.max(r.width, e.scrollWidth), Math.max(r.height, e.scrollHeight)]; })()")
            x, y, w, h = box
            params["clip"] = {"x": x, "y": y, "width": w, "height": min(h, max_height), "scale": 1}
        data = self.call("Page.captureScreenshot", **params)["data"]
        path = Path(path)
        path.write_bytes(base64.b64decode(data))
        return path
