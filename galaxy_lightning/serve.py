"""galaxy-serve: a trained model as a local web page and HTTP API, for people who will not install
the project: ``galaxy-serve CKPT_OR_EXPORTED_MODEL [--port 8000]``.

Built on FastAPI and uvicorn rather than LitServe: one process holds one copy of the model and
batches the images of concurrent requests itself (:class:`Batcher`, a few lines on an asyncio
queue), the page and the API share one app, and bad uploads are answered by FastAPI's own HTTP
errors. LitServe's worker processes would each hold the model and serve no page.

``POST /predict`` takes one or more files (multipart field ``files``: PNG, JPEG or FITS, read
exactly as ``galaxy-predict`` reads them: the input spec's FITS HDU, NaN fill and stretch, crop and
resize) and answers JSON: per file the predicted class and every class's probability (calibrated
when the checkpoint holds a temperature), optionally the image as the model saw it. Query
parameters: ``tta`` (test-time augmentation; default the run's), ``resize`` (center-crop and
resize other sizes, as ``--resize``), ``include_image``. ``GET /`` is a page to drop cutouts on;
``GET /info`` the model and its input spec; ``GET /health``. A bad upload (not an image, other
FITS bands than the model's, another size, too large, too many) gets a 4xx answer whose
``detail`` is one line naming the file and the problem; the server keeps serving. It listens on
127.0.0.1 unless ``--host`` says otherwise.
"""

# (no `from __future__ import annotations`: FastAPI reads the endpoints' annotations at runtime)

import argparse
import asyncio
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np

from PIL import Image

from galaxy_lightning.data.images import FITS_SUFFIXES, RASTER_SUFFIXES
from galaxy_lightning.errors import ConfigError, DataError, GalaxyError, cli_boundary

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Limits:
    """What one request may hold, and how requests are batched."""

    max_files: int = 64
    max_file_bytes: int = 16 * 2**20
    max_batch: int = 64
    batch_wait_ms: float = 5.0


class UploadError(GalaxyError):
    """A bad upload: ``status`` is its HTTP status, the message one line."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Classifier:
    """A checkpoint or an exported model (``.pt2``/``.onnx``) with the reader of its input spec:
    raw file bytes in, probabilities out, exactly as ``galaxy-predict`` computes them."""

    def __init__(self, path: str | Path) -> None:
        from galaxy_lightning.data.images import ImageReader

        self.path = Path(path)
        if self.path.suffix in (".pt2", ".onnx"):
            from galaxy_lightning.export import load_exported

            self.exported = load_exported(self.path)
            self.module = None
            self.spec = self.exported.spec
            self.default_tta = bool(self.exported.inference.get("tta", False))
            self.calibrated = bool(self.exported.inference.get("calibrated", False))
        else:
            from galaxy_lightning.checkpoints import load_classifier
            from galaxy_lightning.predict import prediction_spec

            self.exported = None
            self.module = load_classifier(self.path).set_inference()
            self.spec = prediction_spec(self.module)
            self.default_tta = bool(self.module.tta)
            self.calibrated = bool(getattr(self.module, "calibrated", False))
        self.readers = {resize: ImageReader.for_spec(self.spec, resize) for resize in (False, True)}

    @property
    def class_names(self) -> list[str]:
        return list(self.spec.class_names)

    def info(self) -> dict[str, Any]:
        return {"model": self.path.name, "kind": "exported" if self.exported else "checkpoint",
                "classes": self.class_names, "tta_default": self.default_tta,
                "calibrated": self.calibrated, "input_spec": self.spec.to_dict(),
                "accepts": "FITS" if self.spec.stretch is not None else "PNG, JPEG"}

    def read(self, name: str, data: bytes, resize: bool) -> np.ndarray:
        """One uploaded file as the model-ready uint8 image (through a temporary file, so that
        it is read by the very code that reads training and prediction files)."""
        lower = name.lower()
        suffix = next((s for s in (*FITS_SUFFIXES, *RASTER_SUFFIXES) if lower.endswith(s)), None)
        if suffix is None:
            raise UploadError(415, f"{name}: not a PNG, JPEG or FITS file name; the model takes "
                                   f"{self.info()['accepts']} cutouts")
        is_fits = suffix in FITS_SUFFIXES
        if is_fits != (self.spec.stretch is not None):
            kind = "FITS fluxes" if self.spec.stretch is not None else "8-bit PNG/JPEG images"
            raise UploadError(415, f"{name}: this model was trained on {kind}; send those")
        with tempfile.TemporaryDirectory(prefix="galaxy-serve-") as tmp:
            path = Path(tmp) / f"upload{suffix}"
            path.write_bytes(data)
            try:
                image = self.readers[resize]([path])
            except ConfigError as err:  # the size: SizeMismatch
                raise UploadError(422, _one_line(name, err, path) + " (or ask ?resize=true)") from None
            except Image.DecompressionBombError as err:
                raise UploadError(413, _one_line(name, err, path)) from None
            except (DataError, OSError, ValueError) as err:
                # a readable FITS file the model cannot take (its bands) is 422; unreadable, 415
                raise UploadError(422 if is_fits and "band" in str(err) else 415,
                                  _one_line(name, err, path)) from None
        return image

    def probabilities(self, images: np.ndarray, tta: bool) -> np.ndarray:
        """(N, K) probabilities of model-ready uint8 images; one call at a time."""
        if self.exported is not None:
            return np.asarray(self.exported(images), dtype=np.float64)
        import torch

        self.module.set_inference(tta=tta)
        with torch.no_grad():
            return self.module.probabilities(torch.from_numpy(images)).double().numpy()


def _one_line(name: str, err: BaseException, path: Path) -> str:
    text = " ".join(str(err).split()).replace(str(path), name)
    return text if text.startswith(name) else f"{name}: {text}"


class Batcher:
    """Batches the images of concurrent requests: the first waiting image starts a batch that
    takes whatever else arrives within ``wait_ms`` (up to ``max_batch``), run in one thread, so
    many small requests cost about what one large one does."""

    def __init__(self, classifier: Classifier, max_batch: int, wait_ms: float) -> None:
        self.classifier = classifier
        self.max_batch = max_batch
        self.wait = wait_ms / 1000
        self.queue: asyncio.Queue[tuple[np.ndarray, bool, asyncio.Future[np.ndarray]]] | None = None
        self.executor: ThreadPoolExecutor | None = None
        self.batches = 0
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        # (per start: an app served again, e.g. by a second test client, gets a live executor)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="galaxy-infer")
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, images: list[np.ndarray], tta: bool) -> np.ndarray:
        assert self.queue is not None, "the batcher runs inside the app's lifespan"
        loop = asyncio.get_running_loop()
        futures = []
        for image in images:
            future: asyncio.Future[np.ndarray] = loop.create_future()
            await self.queue.put((image, tta, future))
            futures.append(future)
        return np.stack(await asyncio.gather(*futures))

    async def _run(self) -> None:
        assert self.queue is not None
        loop = asyncio.get_running_loop()
        while True:
            first = await self.queue.get()
            batch = [first]
            deadline = loop.time() + self.wait
            while len(batch) < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            for tta in sorted({item[1] for item in batch}):
                group = [item for item in batch if item[1] == tta]
                images = np.stack([item[0] for item in group])
                try:
                    probs = await loop.run_in_executor(
                        self.executor, self.classifier.probabilities, images, tta)
                except Exception as err:  # noqa: BLE001 (answered to each waiting request)
                    for item in group:
                        if not item[2].done():
                            item[2].set_exception(err)
                    continue
                self.batches += 1
                for item, p in zip(group, probs):
                    if not item[2].done():
                        item[2].set_result(p)


def create_app(classifier: Classifier, limits: Limits = Limits()) -> Any:
    """The FastAPI app: the page, ``/predict``, ``/info`` and ``/health``."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import HTMLResponse
    from starlette.concurrency import run_in_threadpool

    batcher = Batcher(classifier, limits.max_batch, limits.batch_wait_ms)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="galaxy_lightning", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher = batcher
    page = files("galaxy_lightning").joinpath("templates/serve.html").read_text()

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "batches": batcher.batches}

    @app.get("/info")
    async def info() -> dict[str, Any]:
        return {**classifier.info(), "limits": limits.__dict__}

    @app.post("/predict")
    async def predict(request: Request, tta: bool | None = None, resize: bool = False,
                      include_image: bool = False) -> dict[str, Any]:
        length = request.headers.get("content-length")
        whole = limits.max_files * limits.max_file_bytes + 2**20
        if length is not None and length.isdigit() and int(length) > whole:
            raise HTTPException(413, f"the request is {int(length) / 2**20:.1f} MB; at most "
                                     f"{limits.max_files} files of {limits.max_file_bytes / 2**20:g} MB")
        try:
            form = await request.form(max_files=limits.max_files + 1, max_fields=16)
        except Exception as err:  # noqa: BLE001 (Starlette's parser errors, one line)
            detail = " ".join(str(getattr(err, "detail", err)).split())
            if "Too many files" in detail:
                raise HTTPException(413, f"more than {limits.max_files} files in one request; "
                                         "send several requests") from None
            raise HTTPException(400, "could not read the upload as multipart/form-data with "
                                     f"files in the field 'files' ({detail})") from None
        try:
            return await _answer(form, tta, resize, include_image)
        finally:
            await form.close()

    async def _answer(form: Any, tta: bool | None, resize: bool,
                      include_image: bool) -> dict[str, Any]:
        uploads = [u for u in form.getlist("files") if hasattr(u, "read")]
        if not uploads:
            raise HTTPException(400, "no files: send images as multipart/form-data field 'files'")
        if len(uploads) > limits.max_files:
            raise HTTPException(413, f"{len(uploads)} files or more in one request; at most "
                                     f"{limits.max_files} (send several requests)")
        images, names = [], []
        for upload in uploads:
            name = upload.filename or "upload"
            data = await upload.read(limits.max_file_bytes + 1)
            if len(data) > limits.max_file_bytes:
                raise HTTPException(413, f"{name}: larger than {limits.max_file_bytes / 2**20:g} MB")
            try:
                images.append(await run_in_threadpool(classifier.read, name, data, resize))
            except UploadError as err:
                raise HTTPException(err.status, str(err)) from None
            names.append(name)
        use_tta = classifier.default_tta if tta is None else tta
        if classifier.exported is not None and use_tta != classifier.default_tta:
            raise HTTPException(400, f"this exported model has test-time augmentation "
                                     f"{'on' if classifier.default_tta else 'off'}, fixed at export; "
                                     "serve the checkpoint to choose per request")
        started = time.perf_counter()
        probs = await batcher.submit(images, use_tta)
        results = []
        for name, image, p in zip(names, images, probs):
            k = int(np.argmax(p))
            result: dict[str, Any] = {
                "file": name, "predicted_class": classifier.class_names[k], "predicted_index": k,
                "probabilities": {c: round(float(v), 6) for c, v in zip(classifier.class_names, p)}}
            if include_image:
                from galaxy_lightning.plots import display_cell, png_data_uri

                result["image"] = png_data_uri(display_cell(image, classifier.spec.display))
            results.append(result)
        return {"model": classifier.path.name, "tta": use_tta, "calibrated": classifier.calibrated,
                "milliseconds": round(1000 * (time.perf_counter() - started), 2),
                "results": results}

    return app


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """Run ``app`` with uvicorn on 127.0.0.1 on a free port in a background thread, for the
    duration of the block; yields its base URL (tests and the load test)."""
    import socket
    import threading

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def resident_mb() -> float:
    """This process's resident memory (MB), as the kernel counts it (Linux; else the peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_test(url: str, uploads: list[tuple[str, bytes]], clients: int, requests: int,
              per_request: int = 1) -> dict[str, Any]:
    """``clients`` threads each send ``requests`` POSTs of ``per_request`` files (cycling through
    ``uploads``) to ``url``/predict; latency percentiles, throughput, failures and this process's
    resident memory after each half (a server that keeps something per request grows between
    them)."""
    import threading

    import httpx

    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    memory: list[float] = []

    def client(worker: int, count: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            for i in range(count):
                chosen = [uploads[(worker + i + j) % len(uploads)] for j in range(per_request)]
                started = time.perf_counter()
                try:
                    answer = http.post("/predict", files=[("files", f) for f in chosen])
                    ok = answer.status_code == 200 and len(answer.json()["results"]) == per_request
                    problem = None if ok else f"{answer.status_code} {answer.text[:200]}"
                except httpx.HTTPError as err:
                    problem = f"{type(err).__name__}: {err}"
                with lock:
                    latencies.append(time.perf_counter() - started)
                    if problem:
                        failures.append(problem)

    started = time.perf_counter()
    for half in (requests // 2, requests - requests // 2):
        threads = [threading.Thread(target=client, args=(w, half)) for w in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        memory.append(resident_mb())
    wall = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000
    return {"clients": clients, "requests": len(latencies), "images_per_request": per_request,
            "failed": len(failures), "first_failures": failures[:3],
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "requests_per_s": len(latencies) / wall,
            "images_per_s": len(latencies) * per_request / wall,
            "rss_mb_after_first_half": memory[0], "rss_mb_after_second_half": memory[1]}


def run_load_test(classifier: Classifier, limits: Limits, clients: int, requests: int,
                  uploads: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    """The load test of ``--load-test``: single images, then batches of 16, on 127.0.0.1."""
    results = []
    with serving(create_app(classifier, limits)) as url:
        load_test(url, uploads, 2, 4)  # warm-up: first calls allocate
        for per_request in (1, min(16, limits.max_files)):
            results.append(load_test(url, uploads, clients, requests, per_request))
    return results


LOOPBACK = ("127.0.0.1", "localhost", "::1")


@cli_boundary
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="galaxy-serve", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a .ckpt written by galaxy-train, or a .pt2/.onnx written "
                                      "by galaxy-export")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (127.0.0.1: this machine only; 0.0.0.0 "
                             "serves the network, without authentication)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-files", type=int, default=Limits.max_files)
    parser.add_argument("--max-file-mb", type=float, default=Limits.max_file_bytes / 2**20)
    parser.add_argument("--max-batch", type=int, default=Limits.max_batch)
    parser.add_argument("--batch-wait-ms", type=float, default=Limits.batch_wait_ms)
    parser.add_argument("--load-test", nargs="+", metavar="CUTOUT",
                        help="instead of serving: run a bounded load test on 127.0.0.1 with these "
                             "cutouts (--clients threads x --requests each; single images, then "
                             "batches of 16) and print latency, throughput, failures and memory")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=50, help="per client (50)")
    args = parser.parse_args(argv)
    if min(args.max_files, args.max_batch) < 1 or args.max_file_mb <= 0 or args.batch_wait_ms < 0:
        raise ConfigError("--max-files, --max-batch and --max-file-mb must be positive, "
                          "--batch-wait-ms not negative")
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as err:
        raise ConfigError(f"galaxy-serve needs {err.name}: pip install 'galaxy_lightning[serve]'") from None
    classifier = Classifier(args.model)
    limits = Limits(args.max_files, int(args.max_file_mb * 2**20), args.max_batch, args.batch_wait_ms)
    if args.load_test:
        uploads = []
        for name in args.load_test:
            if not Path(name).is_file():
                raise DataError(f"{name}: no such file; give cutouts for the load test")
            uploads.append((Path(name).name, Path(name).read_bytes()))
        from galaxy_lightning.perf import cpu_has_native_bf16, cpu_name

        print(f"load test on 127.0.0.1: {cpu_name()}, {os.cpu_count()} cores, native bfloat16 "
              f"{cpu_has_native_bf16()}; {args.clients} clients x {args.requests} requests")
        for r in run_load_test(classifier, limits, args.clients, args.requests, uploads):
            print(f"{r['images_per_request']:>2} image(s)/request: p50 {r['p50_ms']:.1f} ms, p99 "
                  f"{r['p99_ms']:.1f} ms, {r['requests_per_s']:.1f} requests/s "
                  f"({r['images_per_s']:.1f} images/s), {r['failed']} failed of {r['requests']}; "
                  f"resident memory {r['rss_mb_after_first_half']:.0f} MB after half, "
                  f"{r['rss_mb_after_second_half']:.0f} MB at the end", flush=True)
        return
    if args.host not in LOOPBACK:
        print(f"galaxy-serve: listening on {args.host}, reachable from other machines, with no "
              "authentication", flush=True)
    print(f"galaxy-serve: {classifier.path.name} ({len(classifier.class_names)} classes) on "
          f"http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(create_app(classifier, limits), host=args.host, port=args.port,
                log_level=os.environ.get("GALAXY_SERVE_LOG", "warning"))


if __name__ == "__main__":
    main()
