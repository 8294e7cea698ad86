"""galaxy-serve: a trained model behind a local web page and HTTP API. The API must answer
exactly what galaxy-predict writes for the same files (PNG, JPEG and FITS, read through the
input spec), refuse bad uploads with one line and a 4xx while it keeps serving, batch concurrent
requests without failures or growing memory, and the page must work in headless Chromium."""

from __future__ import annotations

import base64
import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from astropy.io import fits
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from galaxy_lightning.data.synthetic import render, write_survey_files
from galaxy_lightning.predict import predict
from galaxy_lightning.serve import Classifier, Limits, create_app, load_test, main, serving
from tests.conftest import compose_run

LIMITS = Limits(max_files=8, max_file_bytes=100_000, max_batch=32, batch_wait_ms=5)


@pytest.fixture(scope="module")
def png_server(tiny_run: tuple[Path, dict, Path]) -> Iterator[tuple[str, Path, object]]:
    """The shared tiny run's checkpoint (32 px simulated RGB galaxies) served on 127.0.0.1."""
    app = create_app(Classifier(tiny_run[0]), LIMITS)
    with serving(app) as url:
        yield url, tiny_run[0], app


@pytest.fixture(scope="module")
def fits_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[Path, Path]:
    """A model trained (a few steps) on simulated 3-band FITS cubes: (checkpoint, survey folder)."""
    from galaxy_lightning.train import train  # deferred: heavy import

    folder = tmp_path_factory.mktemp("fits_survey")
    catalog = write_survey_files(folder, n_per_class=3, image_size=32, seed=5)
    run = folder / "run"
    cfg = compose_run([
        "data=catalog", f"data.source.catalog={catalog}", f"data.source.image_root={folder}",
        "data.source.image_columns=['fits/{objid}.fits']", "data.source.label_column=label",
        "data.source.split_column=split", "data.source.prepared_name=serve_fits.h5",
        "data.batch_size=4", "data.eval_batch_size=4", "trainer.max_steps=2",
        "trainer.val_check_interval=2", "trainer.accelerator=cpu", "logger=none",
        "trainer.enable_model_summary=false", "callbacks.progress_bar.every_n_steps=1000",
        "seed=0"], run, data_dir)
    train(cfg)
    GlobalHydra.instance().clear()
    return Path(json.loads((run / "metrics.json").read_text())["checkpoint"]), folder


def predicted(checkpoint: Path, files: list[Path], out: Path) -> dict[str, list[float]]:
    """galaxy-predict's probabilities by file name."""
    done, skipped = predict(checkpoint, [str(f) for f in files], out, progress=False)
    assert (done, skipped) == (len(files), [])
    rows = list(csv.DictReader(open(out)))
    return {Path(r["file"]).name: [float(v) for k, v in r.items() if k.startswith("p_")] for r in rows}


def post(url: str, paths: list[Path], **params: object) -> httpx.Response:
    return httpx.post(f"{url}/predict", params=params, timeout=60,
                      files=[("files", (p.name, p.read_bytes())) for p in paths])


def test_the_api_answers_png_jpeg_and_fits_as_galaxy_predict_does(
        png_server: tuple[str, Path, object], fits_run: tuple[Path, Path], tmp_path: Path) -> None:
    url, checkpoint, _ = png_server
    files = []
    for i, suffix in enumerate([".png", ".png", ".jpg"]):
        files.append(tmp_path / f"galaxy{i}{suffix}")
        Image.fromarray(render(i, 0, i, 32)).save(files[-1], quality=90)
    expected = predicted(checkpoint, files, tmp_path / "png.csv")
    answer = post(url, files)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert [r["file"] for r in body["results"]] == [f.name for f in files]
    for r in body["results"]:
        assert list(r["probabilities"].values()) == pytest.approx(expected[r["file"]], abs=1e-5)
        assert r["predicted_class"] == max(r["probabilities"], key=r["probabilities"].get)
    # FITS: another model, served by the command-line's own app
    fits_checkpoint, folder = fits_run
    cubes = sorted((folder / "fits").glob("*.fits"))[:3]
    expected = predicted(fits_checkpoint, cubes, tmp_path / "fits.csv")
    with serving(create_app(Classifier(fits_checkpoint), LIMITS)) as fits_url:
        body = post(fits_url, cubes, include_image=True).json()
        for r in body["results"]:
            assert list(r["probabilities"].values()) == pytest.approx(expected[r["file"]], abs=1e-5)
            image = Image.open(io.BytesIO(base64.b64decode(r["image"].split(",")[1])))
            assert image.size == (32, 32)  # the cutout as the model saw it
        # a FITS file with one band, for a model of three: refused, named, one line
        flat = tmp_path / "one_band.fits"
        fits.PrimaryHDU(np.ones((32, 32), np.float32)).writeto(flat)
        refused = post(fits_url, [flat])
        assert refused.status_code == 422 and "one_band.fits" in refused.json()["detail"]
        assert "band" in refused.json()["detail"] and "\n" not in refused.json()["detail"]
        refused = post(fits_url, [files[0]])  # a PNG to a model of FITS fluxes
        assert refused.status_code == 415 and "FITS" in refused.json()["detail"]


def test_bad_uploads_get_one_line_4xx_and_the_server_keeps_serving(
        png_server: tuple[str, Path, object], tmp_path: Path) -> None:
    url, _, _ = png_server
    good = tmp_path / "good.png"
    Image.fromarray(render(0, 0, 0, 32)).save(good)
    big = tmp_path / "big.png"
    Image.fromarray(render(0, 0, 0, 64)).save(big)
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    huge = tmp_path / "huge.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), np.uint8)).save(huge)
    cases = [
        (post(url, [text]), 415, "notes.png: not a readable image"),
        (post(url, [tmp_path / "good.png"], tta="maybe"), 422, None),  # FastAPI's own validation
        (post(url, [big]), 422, "big.png"),
        (post(url, [huge]), 413, "huge.png: larger than"),
        (post(url, [good] * 9), 413, "at most 8"),
        (httpx.post(f"{url}/predict", files=[("other", ("x.png", b"x"))]), 400, "no files"),
        (httpx.post(f"{url}/predict", content=b"garbage",
                    headers={"content-type": "multipart/form-data; boundary=zz"}), 400, None),
        (httpx.post(f"{url}/predict", files=[("files", ("cutout.gif", b"GIF89a"))]), 415,
         "cutout.gif: not a PNG, JPEG or FITS file name"),
    ]
    for answer, status, line in cases:
        assert answer.status_code == status, (answer.status_code, answer.text)
        detail = answer.json()["detail"]
        if line is not None:
            assert isinstance(detail, str) and line in detail and "\n" not in detail, detail
    assert "resize=true" in post(url, [big]).json()["detail"]
    assert post(url, [big], resize=True).status_code == 200  # as galaxy-predict --resize
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert post(url, [good]).status_code == 200  # still serving


@pytest.mark.slow  # a load test
def test_concurrent_requests_are_batched_without_failures_or_growing_memory(
        png_server: tuple[str, Path, object]) -> None:
    url, _, app = png_server
    uploads = []
    for i in range(7):
        buffer = io.BytesIO()
        Image.fromarray(render(i, 1, i, 32)).save(buffer, format="PNG")
        uploads.append((f"g{i}.png", buffer.getvalue()))
    load_test(url, uploads, 2, 4)  # warm-up
    batches = app.state.batcher.batches  # type: ignore[attr-defined]
    single = load_test(url, uploads, clients=6, requests=16, per_request=1)
    several = load_test(url, uploads, clients=4, requests=8, per_request=4)
    for r in (single, several):
        assert r["failed"] == 0, r["first_failures"]
        assert r["p99_ms"] >= r["p50_ms"] > 0
        # memory: what the second half of the requests added (nothing kept per request)
        assert r["rss_mb_after_second_half"] - r["rss_mb_after_first_half"] < 40, r
    assert (single["requests"], several["requests"]) == (6 * 16, 4 * 8)
    ran = app.state.batcher.batches - batches  # type: ignore[attr-defined]
    images = single["requests"] + several["requests"] * 4
    assert ran < single["requests"] + several["requests"] < images  # concurrent images shared batches


@pytest.mark.slow  # headless Chromium
def test_the_page_classifies_dropped_cutouts_in_chromium(
        png_server: tuple[str, Path, object], browser: object, tmp_path: Path) -> None:
    url, _, _ = png_server
    files = []
    for i in range(3):
        files.append(tmp_path / f"cutout{i}.png")
        Image.fromarray(render(i, 2, i, 32)).save(files[-1])
    page = browser.new_page(viewport={"width": 1000, "height": 800})  # type: ignore[attr-defined]
    outside: list[str] = []
    page.on("request", lambda r: None if r.url.startswith((url, "data:")) else outside.append(r.url))
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('classes')")
    page.set_input_files("#pick", [str(f) for f in files])
    page.wait_for_selector(".card >> nth=2")
    assert page.locator(".card").count() == 3
    assert page.evaluate("Array.from(document.querySelectorAll('.card img'))"
                         ".every(i => i.complete && i.naturalWidth === 32)")
    assert page.locator(".card").first.locator(".row").count() == 7
    assert "3 classified" in page.inner_text("#status") and outside == []
    page.set_input_files("#pick", [str(tmp_path / "cutout0.png"), str(Path(__file__))])
    page.wait_for_function("document.getElementById('status').className === 'error'")
    assert "test_serve.py: not a PNG, JPEG or FITS file name" in page.inner_text("#status")
    page.close()


def test_galaxy_serve_refuses_a_missing_model_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "missing.ckpt")])
    err = capsys.readouterr().err.strip()
    assert stop.value.code != 0 and "missing.ckpt" in err and "\n" not in err, err


def test_an_exported_model_serves_what_its_checkpoint_does(
        png_server: tuple[str, Path, object], tmp_path: Path) -> None:
    from galaxy_lightning.export import export

    url, checkpoint, _ = png_server
    exported = export(checkpoint, tmp_path / "export", formats=("pt2",))["pt2"]
    files = []
    for i in range(2):
        files.append(tmp_path / f"g{i}.png")
        Image.fromarray(render(i, 3, i, 32)).save(files[-1])
    from_checkpoint = post(url, files).json()["results"]
    with serving(create_app(Classifier(exported), LIMITS)) as exported_url:
        info = httpx.get(f"{exported_url}/info").json()
        assert info["kind"] == "exported" and info["input_spec"]["image_size"] == 32
        from_export = post(exported_url, files).json()["results"]
        for a, b in zip(from_checkpoint, from_export):
            assert list(a["probabilities"].values()) == pytest.approx(
                list(b["probabilities"].values()), abs=1e-5)
        # its TTA was fixed at export: asking otherwise is refused, not silently ignored
        refused = post(exported_url, files, tta=not info["tta_default"])
        assert refused.status_code == 400 and "fixed at export" in refused.json()["detail"]
