"""The demo-like run report rendered in headless Chromium (Debian's ``chromium``; .ci/run installs
it). Driven over the Chrome DevTools protocol on ``--remote-debugging-pipe`` (no port, no
websocket): the page must draw something, log no console error, request nothing outside the
report's folder, and every figure it references must exist and decode."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from report_fake_run import fake_demo_run

from pipeline.views.report import build

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                                "(apt-get install -y chromium; .ci/run does it where apt is available)")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio", "--remote-debugging-pipe"]


class DevTools:
    """CDP over the pipe Chromium opens on fds 3 (commands in) and 4 (messages out), NUL-delimited JSON."""

    def __init__(self, user_data_dir: Path):
        import fcntl

        def high(fd: int) -> int:  # above 9, so the 3<& / 4>& redirections never clobber one another (bash: dash allows one digit)
            dup = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
            os.close(fd)
            return dup

        to_chrome_r, self._to_chrome = map(high, os.pipe())
        self._from_chrome, from_chrome_w = map(high, os.pipe())
        # chromium's fd 3 reads our commands, its fd 4 writes its messages
        shell = f'exec "$@" 3<&{to_chrome_r} 4>&{from_chrome_w} {to_chrome_r}<&- {from_chrome_w}>&-'
        self.proc = subprocess.Popen(["bash", "-c", shell, "bash", CHROMIUM, *FLAGS, f"--user-data-dir={user_data_dir}",
                                      "about:blank"], pass_fds=(to_chrome_r, from_chrome_w),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        os.set_blocking(self._from_chrome, False)
        self._buf, self._id, self.events = b"", 0, []

    def _read(self, timeout: float) -> list[dict]:
        import select

        ready, _, _ = select.select([self._from_chrome], [], [], timeout)
        if not ready:
            return []
        chunk = os.read(self._from_chrome, 1 << 20)
        if not chunk:
            raise RuntimeError(f"chromium closed the pipe: {self.proc.stderr.read().decode(errors='replace')[-2000:]}")
        self._buf += chunk
        *msgs, self._buf = self._buf.split(b"\0")
        return [json.loads(m) for m in msgs if m]

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while time.time() < deadline:
            for m in self._read(0.5):
                if m.get("id") == self._id:
                    if "error" in m:
                        raise RuntimeError(f"{method}: {m['error']}")
                    return m["result"]
                self.events.append(m)
        raise TimeoutError(f"no answer to {method} in {timeout}s")

    def wait_for(self, method: str, timeout: float = 30) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for i, m in enumerate(self.events):
                if m.get("method") == method:
                    return self.events.pop(i)
            self.events += self._read(0.5)
        raise TimeoutError(f"no {method} event in {timeout}s")

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self._to_chrome)
        os.close(self._from_chrome)


def _not_blank(png: bytes) -> int:
    """The number of distinct colours in the screenshot."""
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    return len(img.getcolors(maxcolors=1 << 20) or [])


def test_demo_like_report_in_headless_chromium(tmp_path):
    _, run_id = fake_demo_run(tmp_path / "root")
    page = build("latest", str(tmp_path / "root"), tmp_path / "report")
    folder = page.parent
    html_text = page.read_text()

    # every figure the page references exists and is a decodable image
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]+)"', html_text)
    assert len(srcs) >= 8 and all(s.startswith("figures/") for s in srcs)
    from PIL import Image

    for s in srcs:
        with Image.open(folder / s) as im:
            assert im.size[0] > 100 and im.size[1] > 50, s
    # nothing points outside the folder: no scripts, stylesheets or fonts from anywhere
    assert not re.search(r"(?i)<script|<link|@import|url\(|https?://", html_text)
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < 5 * 2**20

    tools = DevTools(tmp_path / "chromium-profile")
    try:
        targets = tools.send("Target.getTargets")["targetInfos"]
        target = next(t["targetId"] for t in targets if t["type"] == "page")
        session = tools.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            tools.send(f"{domain}.enable", session=session)
        tools.send("Emulation.setDeviceMetricsOverride",
                   {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=session)
        tools.send("Page.navigate", {"url": page.as_uri()}, session=session)
        tools.wait_for("Page.loadEventFired", timeout=60)
        images = tools.send("Runtime.evaluate", {
            "expression": "JSON.stringify(Array.from(document.images).map(i => [i.src, i.complete, i.naturalWidth]))",
            "returnByValue": True}, session=session)["result"]["value"]
        shot = base64.b64decode(tools.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                                           session=session)["data"])
        tools.events += tools._read(0.5)
    finally:
        tools.close()

    images = json.loads(images)
    assert len(images) == len(srcs)
    assert all(ok and width > 0 for _, ok, width in images), images  # every figure loaded
    assert _not_blank(shot) > 20
    errors = [e for e in tools.events
              if (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
              or e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
              or e.get("method") == "Network.loadingFailed"]
    assert errors == []
    requests = [e["params"]["request"]["url"] for e in tools.events if e.get("method") == "Network.requestWillBeSent"]
    assert page.as_uri() in requests
    inside = folder.resolve().as_uri() + "/"
    assert [u for u in requests if not u.startswith(inside)] == []
    assert len(requests) == 1 + len(set(srcs))  # the page and its figures, nothing else
