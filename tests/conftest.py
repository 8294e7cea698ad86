"""Shared fixtures: composed run configs that train in seconds on a small cached synthetic set."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from galaxy_lightning.config import CONFIG_PACKAGE

ROOT = Path(__file__).resolve().parents[1]

#: A run that exercises every part of a real one in a few seconds: 32 px simulated galaxies,
#: 20 steps, validation every 10.
TINY = [
    "data=synthetic",
    "data.source.n_per_class=60",
    "data.source.image_size=32",
    "data.splits=[280,70,70]",
    "data.batch_size=40",
    "data.eval_batch_size=70",
    "trainer.max_steps=20",
    "trainer.val_check_interval=10",
    "trainer.log_every_n_steps=1",
    "trainer.accelerator=cpu",
    "trainer.enable_model_summary=false",
    "callbacks.progress_bar.every_n_steps=1000",
    # drawing figures is most of a tiny run's time: only the tests of figures draw them
    "callbacks.run_artifacts.figures=false",
    "seed=0",
]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data directory for the session, so simulated sets are generated once."""
    return tmp_path_factory.mktemp("data")


def compose_run(overrides: list[str], output_dir: Path, data_dir: Path) -> DictConfig:
    """Compose the packaged conf/train.yaml as `galaxy-train <overrides>` would, writing into
    output_dir."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_PACKAGE, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir.parent)
        cfg.paths.data_dir = str(data_dir)
    return cfg


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[Path, dict, Path]:
    """One trained run of the tiny config, shared by every test that needs a trained checkpoint
    (evaluation, prediction, export, refused resumes): (best checkpoint, its metrics.json, the
    data dir). Tests read it; a test that damages a file copies it first."""
    from galaxy_lightning.train import train  # deferred: the package is imported by the tests

    run = tmp_path_factory.mktemp("tiny_run") / "run"
    cfg = compose_run([*TINY, "callbacks.run_artifacts.figures=true"], run, data_dir)  # its figures: the report's tests
    train(cfg)
    GlobalHydra.instance().clear()
    metrics = json.loads((run / "metrics.json").read_text())
    return Path(metrics["checkpoint"]), metrics, data_dir


@pytest.fixture
def make_cfg(tmp_path: Path, data_dir: Path) -> Callable[..., DictConfig]:
    """make_cfg(*overrides, run="run") -> a tiny run config writing into tmp_path/run."""

    def make(*overrides: str, run: str = "run", tiny: bool = True) -> DictConfig:
        return compose_run([*(TINY if tiny else []), *overrides], tmp_path / run, data_dir)

    yield make
    GlobalHydra.instance().clear()


# -- a local HTTP server for download tests (never the internet) ------------------------------
import threading  # noqa: E402
import time  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402


class FileServer(ThreadingHTTPServer):
    """Serves ``files`` (url path -> bytes) on 127.0.0.1 with HTTP Range support.

    Failure modes for tests: ``drop_after`` (bytes) cuts the next response's connection after
    that many bytes; ``delay`` (seconds) stalls before every response.
    """

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.drop_after: int | None = None
        self.delay = 0.0
        self.requests: list[tuple[str, str | None]] = []

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class _Handler(BaseHTTPRequestHandler):
    server: FileServer

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        if srv.delay:
            time.sleep(srv.delay)
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            if srv.drop_after is not None:
                cut, srv.drop_after = srv.drop_after, None
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.connection.shutdown(2)  # the server drops the connection mid-file
                return
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout tests)


@pytest.fixture
def http_server() -> FileServer:
    server = FileServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


# -- headless Chromium for the report and serving pages ----------------------------------------
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    """Headless Chromium driven by Playwright, with no network beyond the page's own file."""
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: the report and serving tests need Debian's chromium "
                    "(`make install-browser`)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield chromium
        chromium.close()
