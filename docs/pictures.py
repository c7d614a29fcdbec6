"""Makes the documentation's pictures (docs/img/) from one real time-budgeted `main` run on digits:

    python docs/pictures.py                     # run `main` (90 s budget) in /tmp/cnn-search-pictures, then the pictures
    python docs/pictures.py --folder DIR --no-run   # the pictures of the run already in DIR (mlflow.db, optuna.db, mlruns/)
    python docs/pictures.py --no-screenshots    # without the MLflow UI screenshots (no Chromium needed)

From the run's records: the parent run's `optimization_history.png`, `param_importances.png` and
`rungs.png` (pipeline.report writes them), and `timeline.png`, drawn here by
pipeline.report.timeline_png (the refit ends after the study report is logged, so the run itself
cannot draw it). With Chromium (Debian's `chromium`) on the PATH: screenshots of the real MLflow
UI (`mlflow ui` on 127.0.0.1 over the run's store, driven over the DevTools protocol):
`mlflow_runs.png` (the runs table, the parent expanded to its trial runs), `mlflow_parent.png`
(the parent run's page) and `mlflow_chart.png` (the trial runs' metrics side by side). Writes
`docs/img/pictures.json`: the command, its wall seconds, the commit, the date and the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMG = ROOT / "docs" / "img"
STUDY = "pictures"
COMMAND = ["main", "--dataset", "digits", "--time-budget", "90", "--n-trials", "1000", "--threads", "1",
           "--study-name", STUDY, "--experiment-name", STUDY]
ARTIFACTS = ("optimization_history.png", "param_importances.png", "rungs.png")
WIDTH, HEIGHT = 1400, 900  # the browser window of the screenshots
MAX_BYTES = 300_000  # a committed picture stays under this


def pipeline_env(folder: Path) -> dict:
    """A `python -m pipeline` process's environment, its MLflow store `folder`/mlflow.db (as bench/common.py's)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db", "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_RUN_ID", None)
    return env


def machine() -> dict:
    """The commit, the date and the CPU (model name, family and model number: one name covers several kinds)."""
    info = Path("/proc/cpuinfo").read_text().splitlines()
    field = lambda name: next((line.split(":", 1)[1].strip() for line in info  # noqa: E731
                               if line.split(":", 1)[0].strip() == name), "?")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {"commit": commit.stdout.strip(), "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "cpu": field("model name"), "cpu_kind": f"family {field('cpu family')}, model {field('model')}"}


def run_main(folder: Path) -> float:
    """`python -m pipeline main ...` (COMMAND) in `folder`, a fresh store; its wall seconds."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", *COMMAND], cwd=folder, env=pipeline_env(folder), check=True)
    return time.perf_counter() - start


def small_png(data: bytes, path: Path) -> None:
    """Save a PNG, quantised to 256 colours (plots and UI screenshots keep their look) and halved
    until it is under MAX_BYTES."""
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    while True:
        out = io.BytesIO()
        image.quantize(256, dither=Image.Dither.NONE).save(out, "PNG", optimize=True)
        if out.tell() <= MAX_BYTES or image.width < 600:
            break
        image = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.Resampling.LANCZOS)
    path.write_bytes(out.getvalue())
    print(f"{path.name}: {image.width}x{image.height}, {out.tell() // 1000} KB")


def study_pictures(folder: Path) -> tuple[str, str]:
    """The parent's plots and the time line into IMG; returns (experiment id, parent run id)."""
    import mlflow
    import optuna

    from pipeline import names
    from pipeline.report import timeline_png

    mlflow.set_tracking_uri(f"sqlite:///{folder}/mlflow.db")
    client = mlflow.MlflowClient()
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{folder}/optuna.db")
    run_id = study.user_attrs[names.PARENT_RUN]
    with tempfile.TemporaryDirectory() as tmp:
        for name in ARTIFACTS:
            small_png(Path(client.download_artifacts(run_id, name, tmp)).read_bytes(), IMG / name)
        timeline_png(study, client, run_id, Path(tmp) / "timeline.png")
        small_png((Path(tmp) / "timeline.png").read_bytes(), IMG / "timeline.png")
    return client.get_run(run_id).info.experiment_id, run_id


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float = 120) -> bytes:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class Browser:
    """Headless Chromium over the DevTools protocol (aiohttp's websocket): open a page, run a
    script in it, screenshot it."""

    def __init__(self, session, ws):
        self.session, self.ws, self.ids = session, ws, 0

    async def call(self, method: str, **params) -> dict:
        self.ids += 1
        await self.ws.send_json({"id": self.ids, "method": method, "params": params})
        while True:
            message = await self.ws.receive_json()
            if message.get("id") == self.ids:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    async def js(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        return result["result"].get("value")

    async def until(self, expression: str, seconds: float = 60) -> None:
        """Wait until `expression` is true in the page (the UI is a React app that renders late)."""
        deadline = time.monotonic() + seconds
        while not await self.js(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(expression)
            await asyncio.sleep(0.5)

    async def open(self, url: str, ready: str) -> None:
        await self.call("Page.navigate", url=url)
        await self.until(ready)
        await asyncio.sleep(2)  # charts and fonts settle

    async def click(self, selector: str) -> None:
        """Click the first element `selector` matches (a CSS selector)."""
        if not await self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
                             "if (e) e.click(); return !!e; })()"):
            raise LookupError(selector)

    async def shot(self, path: Path, height: int = HEIGHT) -> None:
        """The page's top `height` pixels."""
        data = await self.call("Page.captureScreenshot", format="png",
                               clip={"x": 0, "y": 0, "width": WIDTH, "height": height, "scale": 1})
        small_png(base64.b64decode(data["data"]), path)


async def _screenshots(debug_port: int, ui: str, experiment_id: str, run_id: str) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        pages = json.loads(wait_for(f"http://127.0.0.1:{debug_port}/json"))
        page = next(p for p in pages if p["type"] == "page")
        async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            b = Browser(session, ws)
            await b.call("Page.enable")
            await b.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1,
                         mobile=False)
            runs = f"{ui}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            await b.open(runs, f"document.body.innerText.includes({json.dumps(STUDY)})")
            await b.click('button[data-component-id="mlflow.assistant.chat_panel.close"]')  # a chat panel, a third wide
            await b.click('button[data-component-id*="runnamecellrenderer"]')  # the parent's "+": its trial runs
            await b.until("document.body.innerText.includes('trial-0')")
            await asyncio.sleep(1)
            await b.shot(IMG / "mlflow_runs.png", height=520)
            await b.open(runs + "&compareRunsMode=CHART", "document.body.innerText.includes('val_accuracy')")
            await b.js("document.querySelector('input[placeholder=\"Search metric charts\"]').focus()")
            await b.call("Input.insertText", text="val_accuracy")  # the trials' validation curves, best_val_accuracy
            await b.until("document.querySelectorAll('.js-plotly-plot').length >= 2")  # both charts drawn
            await asyncio.sleep(2)
            await b.shot(IMG / "mlflow_chart.png", height=660)
            await b.open(f"{ui}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning",
                         "document.body.innerText.includes('plan_budget_seconds')")
            if await b.js("[...document.querySelectorAll('button')].some(e => e.innerText == 'Show more')"):
                await b.js("[...document.querySelectorAll('button')].find(e => e.innerText == 'Show more').click()")
                await asyncio.sleep(1)
            await b.shot(IMG / "mlflow_parent.png")


def screenshots(folder: Path, experiment_id: str, run_id: str) -> None:
    """`mlflow ui` over the run's store and headless Chromium, each in its own process group,
    both stopped at the end."""
    ui_port, debug_port = free_port(), free_port()
    env = pipeline_env(folder)
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    server = subprocess.Popen([mlflow_bin, "ui", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
                               "--host", "127.0.0.1", "--port", str(ui_port)], cwd=folder, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    profile = tempfile.mkdtemp(prefix="chromium-")
    browser = subprocess.Popen([shutil.which("chromium") or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
                                f"--remote-debugging-port={debug_port}", f"--user-data-dir={profile}",
                                f"--window-size={WIDTH},{HEIGHT}", "--hide-scrollbars", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        ui = f"http://127.0.0.1:{ui_port}"
        wait_for(ui)
        asyncio.run(_screenshots(debug_port, ui, experiment_id, run_id))
    finally:
        for process in (browser, server):
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/cnn-search-pictures"),
                        help="where the run's stores are (made afresh unless --no-run)")
    parser.add_argument("--no-run", action="store_true", help="take the run already in --folder")
    parser.add_argument("--no-screenshots", action="store_true", help="skip the MLflow UI screenshots")
    args = parser.parse_args()
    folder = args.folder.resolve()
    IMG.mkdir(exist_ok=True)
    record_path = IMG / "pictures.json"
    record = json.loads(record_path.read_text()) if args.no_run and record_path.exists() else {}
    if not args.no_run:
        seconds = run_main(folder)
        record = {"command": "python -m pipeline " + " ".join(COMMAND), "wall_seconds": round(seconds, 1), **machine()}
    experiment_id, run_id = study_pictures(folder)
    if not args.no_screenshots:
        screenshots(folder, experiment_id, run_id)
    record_path.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
