"""FITS from the catalog to the prediction, the way a user goes: cutouts written with astropy
(an image extension, NaN pixels), prepared by the catalog source, a few training steps, then
galaxy-predict on the same files. Prediction must read them exactly as training did (the HDU, the
NaN fill, the stretch), refuse other bands in one line, and the figures must show any band count."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from astropy.io import fits
from astropy.table import Table
from omegaconf import DictConfig

from galaxy_lightning.checkpoints import load_classifier
from galaxy_lightning.data.images import ImageReader
from galaxy_lightning.data.prepared import read_prepared
from galaxy_lightning.errors import DataError
from galaxy_lightning.input_spec import InputSpec
from galaxy_lightning.plots import display_bands, figure_to_array, image_grid_figure, mistakes_figure
from galaxy_lightning.predict import CatalogInput, predict, prediction_spec
from galaxy_lightning.train import train

SIZE, CROP = 36, 32


def flux(seed: int, bands: int) -> np.ndarray:
    """(bands, SIZE, SIZE) float32: a round or a flat galaxy on a noisy sky, with a block of NaN
    pixels in its core, where the median fill and the zero fill differ most."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    r = np.hypot(x, y / (1.0 if seed % 2 else 0.35))
    out = np.stack([(500 + 200 * b) * np.exp(-r / 4) + rng.normal(0, 3, (SIZE, SIZE))
                    for b in range(bands)]).astype(np.float32)
    out[:, 16:20, 16:20] = np.nan
    return out


def write_hdus(path: Path, data: np.ndarray, hdu: int) -> None:
    """``data`` in HDU ``hdu``; with hdu=1 the primary HDU holds another image (as a survey's
    primary may hold a preview or a weight map), which a reader of HDU 0 would take instead."""
    if hdu == 0:
        fits.PrimaryHDU(data).writeto(path)
        return
    decoy = np.random.default_rng(99).normal(0, 1, data.shape).astype(np.float32)
    fits.HDUList([fits.PrimaryHDU(decoy), fits.ImageHDU(data, name="SCI")]).writeto(path)


def write_survey(folder: Path, bands: int, per_band: bool, hdu: int, n: int = 12) -> Path:
    """n objects as FITS (a cube per object, or one file per band) and their catalog."""
    folder.mkdir(parents=True)
    rows = []
    for i in range(n):
        data = flux(i, bands)
        if per_band:
            for b in range(bands):
                write_hdus(folder / f"obj{i}_{b}.fits", data[b], hdu)
        else:
            write_hdus(folder / f"obj{i}.fits", data, hdu)
        rows.append({"objid": f"obj{i}", "label": "round" if i % 2 else "flat"})
    Table(rows=rows).write(folder / "catalog.csv")
    return folder / "catalog.csv"


CASES = {
    # a 3-band cube in an image extension, NaN pixels set to zero, fixed stretch limits
    "cube-hdu1-zero-fixed": dict(bands=3, per_band=False, hdu=1, nan="zero",
                                 stretch="{kind:linear,per_image:false}"),
    # two bands, one file each, the defaults (HDU 0, median fill, asinh per image)
    "two-files-defaults": dict(bands=2, per_band=True, hdu=0, nan="median", stretch=None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prediction_reads_fits_exactly_as_training_did(
        case: str, tmp_path: Path, make_cfg: Callable[..., DictConfig]) -> None:
    c = CASES[case]
    root = tmp_path / "cutouts"
    catalog = write_survey(root, c["bands"], c["per_band"], c["hdu"])
    columns = [f"{{objid}}_{b}.fits" for b in range(c["bands"])] if c["per_band"] else ["{objid}.fits"]
    overrides = [
        "data=catalog", f"data.source.catalog={catalog}", f"data.source.image_root={root}",
        f"data.source.image_columns=[{','.join(repr(col) for col in columns)}]",
        "data.source.label_column=label",
        "data.source.id_column=objid", f"data.source.crop={CROP}",
        f"data.source.fits_hdu={c['hdu']}", f"data.source.nan={c['nan']}",
        "data.splits=[8,2,2]", "data.batch_size=4", "data.eval_batch_size=4",
        "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.accelerator=cpu",
        "trainer.enable_model_summary=false", "callbacks.progress_bar.every_n_steps=1000",
        "logger=none", "seed=0"]
    if c["stretch"]:
        overrides.append(f"data.source.stretch={c['stretch']}")
    cfg = make_cfg(*overrides, tiny=False)
    train(cfg)  # the example grid and the gallery of mistakes are drawn with these bands
    run = Path(cfg.paths.output_dir)
    assert (run / "examples.png").is_file()
    ckpt = json.loads((run / "metrics.json").read_text())["checkpoint"]
    source = hydra.utils.instantiate(cfg.data.source)
    name = source.prepared_path(Path()).name  # a non-default stretch gets its own prepared file
    assert (name == "catalog.prepared.h5") == (not c["stretch"]), name
    prepared = read_prepared(Path(cfg.paths.data_dir) / name)
    spec = prepared.info.spec
    assert spec.fits == {"hdu": c["hdu"], "nan": c["nan"]} and spec.channels == c["bands"]
    if c["stretch"]:
        assert len(spec.stretch["vmin"]) == c["bands"]  # the fixed limits, one per band

    module = load_classifier(ckpt)
    assert module.spec == spec  # the checkpoint carries the reading of its files
    ids = list(prepared.columns["id"])
    files = {f"obj{i}": tuple(root / col.format(objid=f"obj{i}") for col in columns)
             for i in range(12)}
    # the reader prediction builds gives the prepared pixels exactly: same HDU, fill, stretch
    reader = ImageReader.for_spec(module.spec)
    for row, objid in enumerate(ids):
        assert np.array_equal(reader(files[objid]), prepared.images[row]), objid
    if c["hdu"] or c["nan"] != "median":  # ... which the reading defaults would not
        default = ImageReader(channels=spec.channels, stretch=spec.stretch, spec=spec)
        assert not np.array_equal(default(files[ids[0]]), prepared.images[0])

    with torch.no_grad():
        expected = module.probabilities(torch.from_numpy(prepared.images)).numpy()
    by_id = dict(zip(ids, expected))
    names = [f"p_{n}" for n in spec.class_names]

    def probabilities(rows: list[dict[str, str]], key: Callable[[dict[str, str]], str]
                      ) -> dict[str, np.ndarray]:
        return {key(r): np.array([float(r[n]) for n in names]) for r in rows}

    done, skipped = predict(ckpt, [], tmp_path / "catalog.csv", progress=False,
                            catalog=CatalogInput(str(catalog), [str(root)]))
    assert (done, skipped) == (12, [])
    got = probabilities(list(csv.DictReader(open(tmp_path / "catalog.csv"))), lambda r: r["id"])
    assert sorted(got) == sorted(ids)
    for objid, p in got.items():
        np.testing.assert_allclose(p, by_id[objid], atol=1e-5, err_msg=objid)

    if not c["per_band"]:  # the same files given one by one
        inputs = [str(files[i][0]) for i in ids]
        done, skipped = predict(ckpt, inputs, tmp_path / "files.csv", progress=False)
        assert (done, skipped) == (12, [])
        got = probabilities(list(csv.DictReader(open(tmp_path / "files.csv"))),
                            lambda r: Path(r["file"]).stem)
        for objid, p in got.items():
            np.testing.assert_allclose(p, by_id[objid], atol=1e-5, err_msg=objid)

    # other bands than the model's are refused in one line, never repeated or dropped
    if c["per_band"]:
        wrong = files["obj0"][0]  # one band of a two-band model
    else:
        wrong = root / "single.fits"
        write_hdus(wrong, flux(0, 1)[0], c["hdu"])
    with pytest.raises(DataError) as err:
        reader((wrong,))
    message = str(err.value)
    assert message.startswith(str(wrong)) and "\n" not in message
    assert f"1 FITS band(s); the model takes {c['bands']}" in message
    done, skipped = predict(ckpt, [str(wrong)], tmp_path / "wrong.csv", progress=False)
    assert done == 0 and len(skipped) == 1 and skipped[0][0] == str(wrong)
    assert "the model takes" in skipped[0][1] and "\n" not in skipped[0][1]

    # a checkpoint whose spec predates recording the reading takes it from its training config
    module.spec = module.spec.replace(fits=None)
    assert prediction_spec(module).fits == {"hdu": c["hdu"], "nan": c["nan"]}


def test_input_specs_without_fits_reading_load_as_before() -> None:
    spec = InputSpec(class_names=("a", "b"), channels=3, image_size=32, stretch={"kind": "asinh"})
    old = spec.to_dict()
    assert "fits" not in old  # unchanged dict, so resuming compares equal to older checkpoints
    assert InputSpec.from_dict(old) == spec and InputSpec.from_dict(old).fits is None
    with_fits = spec.replace(fits={"hdu": "SCI", "nan": "zero"})
    again = InputSpec.from_dict(json.loads(json.dumps(with_fits.to_dict())))
    assert again == with_fits and again.fits == {"hdu": "SCI", "nan": "zero"}


@pytest.mark.parametrize("channels", [1, 2, 3, 4, 5])
def test_figures_show_any_number_of_bands(channels: int) -> None:
    rng = np.random.default_rng(channels)
    images = rng.integers(0, 256, (6, 16, 16, channels), dtype=np.uint8)
    labels = np.array([0, 1, 0, 1, 0, 1])
    for display in (None, {"stretch": "asinh"}):
        grid = figure_to_array(image_grid_figure(images, labels, ["a", "b"], per_class=3,
                                                 display=display))
        gallery = figure_to_array(mistakes_figure(images, [0, 1, 0], [1, 0, 1], [0.9, 0.8, 0.7],
                                                  ["x", "y", "z"], ["a", "b"], per_class=2,
                                                  display=display))
        assert grid.ndim == gallery.ndim == 3 and grid.shape[-1] == gallery.shape[-1] == 3
    bands, caption = display_bands(channels)
    assert len(bands) in (1, 3) and max(bands) < channels
    assert (caption is None) == (channels in (1, 3))
    if channels == 2:
        assert bands == (0,) and "grey" in caption
    if channels >= 4:
        assert bands == (0, channels // 2, channels - 1) and "red, green, blue" in caption
