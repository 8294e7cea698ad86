"""Catalogs and image folders as astronomers have them: the real Galaxy Zoo DECaLS sample, FITS
cutouts written with astropy, stretches, vote labels, and every bad input refused in one line."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from omegaconf import DictConfig

from galaxy_lightning.data.catalog import CatalogSource, labels_from_votes, read_table, table_column
from galaxy_lightning.data.images import DEFAULT_STRETCH, check_stretch, fill_nan, stretch_to_uint8
from galaxy_lightning.data.prepared import read_prepared
from galaxy_lightning.errors import ConfigError, DataError, GalaxyError
from galaxy_lightning.predict import CatalogInput, predict
from galaxy_lightning.report import LEGACY_VIEWER
from galaxy_lightning.train import train

from .helpers import read_image

#: The real sample ships in the repository (examples/), never beside it.
SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "gz_decals_sample"
VOTES = {"question": "smooth-or-featured"}


@pytest.fixture(scope="module")
def gz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test-local copy of the real sample (tests that break files must not touch the
    repository's copy)."""
    if not SAMPLE.is_dir():
        pytest.fail(f"{SAMPLE} is missing: it is part of the repository (git checkout -- examples)")
    root = tmp_path_factory.mktemp("gz") / "gz_decals_sample"
    shutil.copytree(SAMPLE, root)
    return root


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- the real Galaxy Zoo DECaLS sample -------------------------------------------------------------
def test_votes_give_labels_as_galaxy10_was_made(gz: Path) -> None:
    table = read_table(gz / "gz_decals_volunteers_5.csv")
    labels, answers, fractions, dropped = labels_from_votes(table, gz, "smooth-or-featured", None,
                                                            0.0, 0)
    assert answers == ["smooth", "featured-or-disk", "artifact"]
    expected = np.argmax(np.stack([np.asarray(table[f"smooth-or-featured_{a}_fraction"], float)
                                   for a in answers], 1), 1)
    assert labels.tolist() == expected.tolist() and fractions.shape == (6, 3)
    assert np.allclose(fractions.sum(1), 1, atol=0.02)
    votes = np.asarray(table["smooth-or-featured_total-votes"])
    labels, _, _, dropped = labels_from_votes(table, gz, "smooth-or-featured", None, 0.0, 10)
    assert (labels == -1).sum() == (votes < 10).sum() == dropped["below_min_votes"] > 0
    labels, _, _, dropped = labels_from_votes(table, gz, "smooth-or-featured", None, 0.75, 0)
    assert dropped["below_min_fraction"] == int((fractions.max(1) < 0.75).sum())


def test_the_real_sample_end_to_end(gz: Path, tmp_path: Path, make_cfg: Callable[..., DictConfig]) -> None:
    """catalog -> prepared file -> a few training steps -> predictions keyed by iauname, ra, dec."""
    before = snapshot(gz)
    cfg = make_cfg(
        "data=catalog", f"data.source.catalog={gz / 'gz_decals_volunteers_5.csv'}",
        f"data.source.image_root={gz}", "data.source.image_columns=[png_loc]", "data.source.match=name",
        "+data.source.votes={question:smooth-or-featured}", "data.source.classes=[smooth,featured-or-disk]",
        "data.source.id_column=iauname", "data.source.ra_column=ra", "data.source.dec_column=dec",
        "data.source.crop=256", "data.source.resize=64", "data.source.min_per_class=1",
        "data.splits=[2,2,2]", "data.batch_size=2", "data.eval_batch_size=2", "trainer.max_steps=4",
        "trainer.val_check_interval=2", "logger=none", tiny=False)
    train(cfg)
    run = Path(cfg.paths.output_dir)
    prepared = read_prepared(Path(cfg.paths.data_dir) / "gz_decals_volunteers_5.prepared.h5")
    table = read_table(gz / "gz_decals_volunteers_5.csv")
    assert prepared.images.shape == (6, 64, 64, 3)
    assert sorted(prepared.columns["id"]) == sorted(np.asarray(table["iauname"]).astype(str))
    assert prepared.info.spec.crop == 256 and prepared.info.spec.class_names == ("smooth", "featured-or-disk")
    assert prepared.columns["targets"].shape == (6, 2)
    assert (run / "mistakes.png").is_file() or json.loads((run / "metrics.json").read_text())["test/acc"] == 1
    # the report links every mistake to the sky viewer at its catalog position
    report = (run / "report.html").read_text()
    mistakes = json.loads((run / "mistakes.json").read_text()) if (run / "mistakes.json").is_file() else []
    ids = set(np.asarray(table["iauname"]).astype(str))
    assert mistakes or json.loads((run / "metrics.json").read_text())["test/acc"] == 1
    for m in mistakes:
        assert m["id"] in ids and m["image"].startswith("data:image/png;base64,")
        assert LEGACY_VIEWER.format(ra=m["ra"], dec=m["dec"]).replace("&", "&amp;") in report
    ckpt = json.loads((run / "metrics.json").read_text())["checkpoint"]
    out = tmp_path / "predictions.csv"
    done, skipped = predict(ckpt, [], out, progress=False,
                            catalog=CatalogInput(str(gz / "gz_decals_volunteers_5.csv"), [str(gz)]))
    assert (done, skipped) == (6, [])
    rows = list(csv.DictReader(open(out)))
    assert [r["id"] for r in rows] == list(np.asarray(table["iauname"]).astype(str))
    assert [float(r["ra"]) for r in rows] == pytest.approx(np.asarray(table["ra"], float).tolist())
    assert [float(r["dec"]) for r in rows] == pytest.approx(np.asarray(table["dec"], float).tolist())
    assert all(abs(float(r["p_smooth"]) + float(r["p_featured-or-disk"]) - 1) < 1e-4 for r in rows)
    # the same images through the prepared file give the same probabilities
    by_id = {r["id"]: float(r["p_smooth"]) for r in rows}
    done, _ = predict(ckpt, [str(Path(cfg.paths.data_dir) / "gz_decals_volunteers_5.prepared.h5")],
                      tmp_path / "h5.csv", progress=False)
    h5_rows = list(csv.DictReader(open(tmp_path / "h5.csv")))
    assert done == 6 and all(by_id[r["id"]] == pytest.approx(float(r["p_smooth"]), abs=1e-5) for r in h5_rows)
    assert snapshot(gz) == before  # the user's catalog and images are untouched


def test_image_names_from_a_pattern_of_columns(gz: Path, tmp_path: Path) -> None:
    """The other catalog has no png_loc: its files are named by iauname."""
    source = CatalogSource(str(gz / "gz_decals_volunteers_1_and_2.csv"), ["{iauname}.png"],
                           image_root=str(gz), match="name", votes={**VOTES, "min_votes": 10},
                           classes=["smooth", "featured-or-disk"], id_column="iauname",
                           crop=200, resize=48, min_per_class=1)
    data = read_prepared(source.prepare(tmp_path, progress=False))
    assert data.images.shape[1:] == (48, 48, 3) and len(data.labels) == 6
    assert all(i.startswith("J") for i in data.columns["id"])


def test_parquet_fits_and_ecsv_catalogs_read_alike(gz: Path, tmp_path: Path) -> None:
    table = read_table(gz / "gz_decals_volunteers_5.csv")
    small = table["iauname", "ra", "dec", "png_loc", "smooth-or-featured_total-votes"]
    for name in ("cat.parquet", "cat.fits", "cat.ecsv"):
        small.write(tmp_path / name)
        again = read_table(tmp_path / name)
        assert list(np.asarray(again["iauname"]).astype(str)) == list(np.asarray(small["iauname"]).astype(str))
        assert np.allclose(np.asarray(again["ra"], float), np.asarray(small["ra"], float))


# -- FITS cutouts ------------------------------------------------------------------------------------
def galaxy_flux(seed: int, size: int = 40, bands: int = 1) -> np.ndarray:
    """A Sersic-like blob on a noisy sky: (bands, size, size) float32 fluxes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    r = np.hypot(x, y / rng.uniform(0.4, 1.0))
    blob = 1000 * np.exp(-7.67 * ((r / 6) ** 0.25 - 1)) if seed % 2 else 300 * np.exp(-r / 5)
    return np.stack([blob * (1 + 0.3 * b) + rng.normal(0, 3, (size, size))
                     for b in range(bands)]).astype(np.float32)


def write_fits_set(folder: Path, layout: str, n: int = 12) -> Path:
    """n objects as FITS (single band, a 3-band cube, or three files) with a header and a few NaN
    pixels, and a catalog with labels 'round'/'disky' by seed parity."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        flux = galaxy_flux(i, bands=1 if layout == "single" else 3)
        flux[:, 0, :3] = np.nan  # masked pixels at the edge
        header = fits.Header({"BUNIT": "nanomaggy", "PIXSCALE": 0.262, "OBJID": i})
        if layout == "bands":
            for b, band in enumerate("grz"):
                fits.PrimaryHDU(flux[b], header).writeto(folder / f"obj{i}_{band}.fits")
        else:
            fits.PrimaryHDU(flux[0] if layout == "single" else flux, header).writeto(folder / f"obj{i}.fits")
        rows.append({"objid": f"obj{i}", "label": "disky" if i % 2 == 0 else "round",
                     "ra": 150 + i * 0.01, "dec": 2.0 + i * 0.01})
    Table(rows=rows).write(folder / "catalog.csv")
    return folder / "catalog.csv"


@pytest.mark.parametrize("layout, columns, channels", [
    ("single", ["{objid}.fits"], 1), ("cube", ["{objid}.fits"], 3),
    ("bands", ["{objid}_g.fits", "{objid}_r.fits", "{objid}_z.fits"], 3)])
def test_fits_cutouts_single_band_cube_and_one_file_per_band(tmp_path: Path, layout: str,
                                                            columns: list[str], channels: int) -> None:
    catalog = write_fits_set(tmp_path / "cutouts", layout)
    before = snapshot(tmp_path / "cutouts")
    source = CatalogSource(str(catalog), columns, label_column="label", id_column="objid",
                           ra_column="ra", dec_column="dec", crop=32, min_per_class=1)
    data = read_prepared(source.prepare(tmp_path / "prepared", progress=False))
    assert data.images.shape == (12, 32, 32, channels)
    assert data.info.class_names == ["disky", "round"]
    spec = data.info.spec
    assert spec.stretch is not None and spec.stretch["kind"] == "asinh"  # recorded for prediction
    # each image is the astropy-stretched, NaN-filled, centre-cropped flux of its own file
    flux = np.moveaxis(galaxy_flux(3, bands=channels), 0, -1)
    flux[0, :3] = np.nan
    expected = stretch_to_uint8(fill_nan(flux, "median", "obj3"), spec.stretch)[4:36, 4:36]
    row = list(data.columns["id"]).index("obj3")
    assert np.array_equal(data.images[row], expected)
    assert snapshot(tmp_path / "cutouts") == before


def test_stretches_are_astropys_own(tmp_path: Path) -> None:
    from astropy.visualization import (
        AsinhStretch,
        ImageNormalize,
        LogStretch,
        PercentileInterval,
        SqrtStretch,
        ZScaleInterval,
    )

    flux = np.moveaxis(galaxy_flux(1, bands=2), 0, -1).astype(np.float64)
    cases = [({"kind": "asinh", "a": 0.05, "interval": "percentile"}, AsinhStretch(0.05),
              PercentileInterval(99.5)),
             ({"kind": "log", "interval": "percentile"}, LogStretch(), PercentileInterval(99.5)),
             ({"kind": "sqrt", "interval": "zscale"}, SqrtStretch(), ZScaleInterval())]
    for params, stretch, interval in cases:
        out = stretch_to_uint8(flux, check_stretch(params))
        for b in range(2):
            norm = ImageNormalize(flux[..., b], interval=interval, stretch=stretch, clip=True)
            expected = np.rint(np.asarray(norm(flux[..., b])) * 255).astype(np.uint8)
            assert np.abs(out[..., b].astype(int) - expected).max() <= 1, params
    fixed = check_stretch({"kind": "linear", "interval": "manual", "vmin": 0.0, "vmax": 100.0})
    out = stretch_to_uint8(np.full((2, 2, 1), 50.0), fixed)
    assert (out == 128).all()  # halfway between the fixed limits
    with pytest.raises(ConfigError, match="stretch.kind='gamma'"):
        check_stretch({"kind": "gamma"})
    with pytest.raises(ConfigError, match="needs stretch.vmin"):
        check_stretch({"interval": "manual"})


def test_fixed_stretch_limits_are_estimated_once_and_recorded(tmp_path: Path) -> None:
    catalog = write_fits_set(tmp_path / "cutouts", "single")
    source = CatalogSource(str(catalog), ["{objid}.fits"], label_column="label", crop=32,
                           stretch={"kind": "linear", "interval": "percentile", "per_image": False},
                           min_per_class=1)
    spec = read_prepared(source.prepare(tmp_path, progress=False)).info.spec
    assert len(spec.stretch["vmin"]) == 1 and spec.stretch["vmax"][0] > spec.stretch["vmin"][0]
    # prediction applies exactly these limits to a new image: the same flux maps to the same
    # pixels whatever the image's own range
    path = tmp_path / "cutouts" / "obj5.fits"
    with fits.open(path) as hdul:
        flux = fill_nan(np.asarray(hdul[0].data, dtype=np.float32)[..., None], "median", "obj5")
    image = read_image([path], stretch=spec.stretch)
    assert np.array_equal(image, stretch_to_uint8(flux, spec.stretch))
    lo, hi = spec.stretch["vmin"][0], spec.stretch["vmax"][0]
    assert np.array_equal(image[..., 0] == 255, flux[..., 0] >= hi)
    assert np.array_equal(image[..., 0] == 0, flux[..., 0] <= lo)


def test_duplicates_by_sky_position_within_a_tolerance(tmp_path: Path) -> None:
    catalog = write_fits_set(tmp_path / "cutouts", "single")
    table = Table.read(catalog)
    table["ra"][5] = table["ra"][4] + 0.5 / 3600 / np.cos(np.radians(table["dec"][4]))  # 0.5" away
    table["dec"][5] = table["dec"][4]
    table.write(catalog, overwrite=True)
    kept = read_prepared(CatalogSource(str(catalog), ["{objid}.fits"], label_column="label",
                                       id_column="objid", ra_column="ra", dec_column="dec",
                                       dedupe="position", dedupe_arcsec=1.0, crop=32,
                                       min_per_class=1).prepare(tmp_path / "a", progress=False))
    assert "obj5" not in set(kept.columns["id"]) and len(kept.labels) == 11
    assert kept.info.provenance["counts"]["dropped"]["duplicates"] == 1
    strict = read_prepared(CatalogSource(str(catalog), ["{objid}.fits"], label_column="label",
                                         ra_column="ra", dec_column="dec", dedupe="position",
                                         dedupe_arcsec=0.1, crop=32, min_per_class=1)
                           .prepare(tmp_path / "b", progress=False))
    assert len(strict.labels) == 12  # 0.5 arcsec apart: not the same object at 0.1 arcsec


# -- bad input ---------------------------------------------------------------------------------------
def refused(source: CatalogSource, tmp_path: Path, match: str, error: type = GalaxyError) -> str:
    with pytest.raises(error) as err:
        source.prepare(tmp_path / "prepared", progress=False)
    message = str(err.value)
    assert match in message, message
    assert "\n" not in message
    out = tmp_path / "prepared"
    # nothing half-written (only the empty lock file that serialises preparations)
    assert not out.exists() or not [p for p in out.iterdir() if not p.name.endswith(".lock")]
    return message


def test_bad_catalogs_and_images_are_refused_in_one_line(gz: Path, tmp_path: Path) -> None:
    catalog = write_fits_set(tmp_path / "cutouts", "single")
    before = snapshot(tmp_path / "cutouts")
    base = {"catalog": str(catalog), "image_columns": ["{objid}.fits"], "label_column": "label",
            "crop": 32, "min_per_class": 1}
    message = refused(CatalogSource(**{**base, "label_column": "morphology"}), tmp_path,
                      "no column 'morphology' (columns: objid, label, ra, dec); set label_column")
    assert str(catalog) in message
    refused(CatalogSource(**{**base, "image_columns": ["{objid}.fit"]}), tmp_path,
            "12 of 12 image paths do not resolve under")
    message = refused(CatalogSource(**{**base, "image_columns": ["{objid}.fit"]}), tmp_path,
                      "first three: obj0.fit, obj1.fit, obj2.fit")
    assert "match=name" in message
    refused(CatalogSource(**{**base, "split_column": "label"}), tmp_path,
            "column 'label' holds ['disky', 'round']; use train/val/test")
    refused(CatalogSource(**{**base, "min_per_class": 7}), tmp_path,
            "classes with fewer than 7 readable images: disky (6), round (6)")
    # a NaN-only cutout and an unreadable file: skipped and reported, or fatal
    fits.PrimaryHDU(np.full((40, 40), np.nan, np.float32)).writeto(tmp_path / "cutouts" / "obj3.fits",
                                                                   overwrite=True)
    (tmp_path / "cutouts" / "obj7.fits").write_bytes(b"SIMPLE  = T but not really")
    data = read_prepared(CatalogSource(**base, id_column="objid").prepare(tmp_path / "skip", progress=False))
    assert len(data.labels) == 10 and {"obj3", "obj7"}.isdisjoint(data.columns["id"])
    assert data.info.provenance["counts"]["unreadable"] == 2
    refused(CatalogSource(**{**base, "on_error": "error"}), tmp_path, "obj3.fits: a band has no finite pixel")
    # images of different sizes without a crop or resize
    fits.PrimaryHDU(galaxy_flux(2, size=48)[0]).writeto(tmp_path / "cutouts" / "obj2.fits", overwrite=True)
    refused(CatalogSource(**{**base, "crop": None}), tmp_path, "images differ in size", ConfigError)
    # vote fractions that do not add up
    table = Table.read(gz / "gz_decals_volunteers_5.csv")
    table["smooth-or-featured_smooth_fraction"][2] = 0.9
    table.write(tmp_path / "votes.csv")
    refused(CatalogSource(str(tmp_path / "votes.csv"), ["png_loc"], image_root=str(gz), match="name",
                          votes=VOTES), tmp_path, "vote fractions of row 2 sum to")
    assert (tmp_path / "votes.csv").stat().st_size > 0 and before  # the refused inputs stay as they were
    with pytest.raises(ConfigError, match="give exactly one of label_column and votes"):
        CatalogSource(str(catalog), ["x"])
    with pytest.raises(ConfigError, match="dedupe=position needs ra_column and dec_column"):
        CatalogSource(str(catalog), ["x"], label_column="label", dedupe="position")


def test_unresolved_paths_can_be_skipped_and_are_reported(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    catalog = write_fits_set(tmp_path / "cutouts", "single")
    (tmp_path / "cutouts" / "obj4.fits").unlink()
    data = read_prepared(CatalogSource(str(catalog), ["{objid}.fits"], label_column="label",
                                       crop=32, min_per_class=1).prepare(tmp_path, progress=True))
    assert len(data.labels) == 11 and data.info.provenance["counts"]["missing_files"] == 1
    assert "skipped 1 missing image(s), e.g. obj4.fits" in caplog.text
    with pytest.raises(DataError, match="1 of 12 image paths do not resolve"):
        CatalogSource(str(catalog), ["{objid}.fits"], label_column="label", crop=32,
                      on_error="error").prepare(tmp_path / "strict", progress=False)


def test_fits_defaults_are_complete() -> None:
    assert set(check_stretch({})) == set(DEFAULT_STRETCH)


# -- Parquet nulls, fixed limits from a sample, 16-bit PNGs ----------------------------------------
def test_parquet_nulls_are_blank_cells_as_in_a_csv(tmp_path: Path) -> None:
    """A null in a Parquet catalog is what a blank CSV cell is: a missing label, id or number,
    never the text "None"."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    catalog = write_fits_set(tmp_path / "cutouts", "single")
    rows = list(csv.DictReader(open(catalog)))
    blank = {"label": (1, 4), "objid": (6,), "ra": (7,), "klass": (2,)}
    for i, row in enumerate(rows):
        row["klass"] = str(i % 2)
        for column, where in blank.items():
            if i in where:
                row[column] = ""
    with open(tmp_path / "cutouts" / "blanks.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.table({
        "objid": pa.array([r["objid"] or None for r in rows], pa.string()),
        "label": pa.array([r["label"] or None for r in rows], pa.string()),
        "ra": pa.array([float(r["ra"]) if r["ra"] else None for r in rows], pa.float64()),
        "dec": pa.array([float(r["dec"]) for r in rows], pa.float64()),
        "klass": pa.array([int(r["klass"]) if r["klass"] else None for r in rows], pa.int64()),
    }), tmp_path / "cutouts" / "blanks.parquet")
    tables = {s: read_table(tmp_path / "cutouts" / f"blanks.{s}") for s in ("csv", "parquet")}
    for name in ("objid", "label", "ra", "klass"):
        from_csv, from_parquet = (table_column(t, name, name, catalog) for t in tables.values())
        np.testing.assert_array_equal(from_parquet, from_csv, err_msg=name)
    assert "None" not in list(table_column(tables["parquet"], "label", "label", catalog))
    prepared = {}
    for suffix in ("csv", "parquet"):
        source = CatalogSource(str(tmp_path / "cutouts" / f"blanks.{suffix}"), ["{objid}.fits"],
                               label_column="label", id_column="objid", crop=32, min_per_class=1,
                               on_error="skip", prepared_name=f"{suffix}.h5")
        prepared[suffix] = read_prepared(source.prepare(tmp_path / "prepared", progress=False))
    a, b = prepared["csv"], prepared["parquet"]
    assert a.info.class_names == b.info.class_names == ["disky", "round"]
    assert a.labels.tolist() == b.labels.tolist() and len(a.labels) == 9  # 2 without a label, 1 without an id (no file)
    assert list(a.columns["id"]) == list(b.columns["id"])
    assert a.info.provenance["counts"] == b.info.provenance["counts"]
    assert a.info.provenance["counts"]["dropped"]["empty_label"] == 2
    numbers = CatalogSource(str(tmp_path / "cutouts" / "blanks.parquet"), ["{objid}.fits"],
                            label_column="klass", crop=32, min_per_class=1, prepared_name="k.h5")
    counts = read_prepared(numbers.prepare(tmp_path / "prepared", progress=False)).info.provenance
    assert counts["counts"]["dropped"]["empty_label"] == 1


def test_fixed_stretch_limits_come_from_a_seeded_sample_of_rows(tmp_path: Path) -> None:
    """A catalog sorted by class: the first 64 rows are faint galaxies, the last 6 bright ones.
    Limits from the first rows would saturate every bright galaxy; a random sample sees both."""
    folder = tmp_path / "cutouts"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(70):
        level = 1.0 if i < 64 else 100.0
        fits.PrimaryHDU((level + rng.normal(0, 0.1, (16, 16))).astype(np.float32)).writeto(
            folder / f"obj{i}.fits")
        rows.append({"objid": f"obj{i}", "label": "faint" if i < 64 else "bright"})
    Table(rows=rows).write(folder / "catalog.csv")
    stretch = {"kind": "linear", "per_image": False}

    def prepared(name: str, seed: int = 0) -> object:
        return read_prepared(CatalogSource(str(folder / "catalog.csv"), ["{objid}.fits"],
                                           label_column="label", id_column="objid",
                                           stretch=stretch, seed=seed, prepared_name=name)
                             .prepare(tmp_path, progress=False))

    first = prepared("a.h5")
    vmax = first.info.spec.stretch["vmax"][0]
    assert vmax > 50  # the bright class is inside the limits
    bright = first.images[np.asarray(first.columns["id"]) == "obj66"]
    assert 0 < bright.mean() < 255  # not saturated to white
    assert prepared("b.h5").info.spec.stretch == first.info.spec.stretch  # same catalog and seed


def test_16_bit_pngs_are_scaled_not_clipped(tmp_path: Path) -> None:
    from PIL import Image

    values = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(values).save(tmp_path / "deep.png")
    expected = np.rint(values / 257).astype(np.uint8)
    gray = read_image([tmp_path / "deep.png"])
    assert gray.shape == (32, 32, 1) and np.array_equal(gray[..., 0], expected)
    rgb = read_image([tmp_path / "deep.png"], channels=3)
    assert rgb.shape == (32, 32, 3) and all(np.array_equal(rgb[..., c], expected) for c in range(3))
