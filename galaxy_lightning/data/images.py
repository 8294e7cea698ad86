"""Image files as astronomers have them -> uint8 pixels: PNG/JPEG cutouts and FITS.

- PNG/JPEG (e.g. from the Legacy Surveys viewer) are already 8-bit displays: read as RGB or
  grayscale with Pillow (16-bit grayscale PNGs scaled to 8 bits, not clipped).
- FITS images are floating-point fluxes: one file per band, or a 3-D cube whose planes are bands,
  read with astropy from a chosen HDU. NaN pixels (masked or off the survey footprint) are filled
  by a policy; an image with no finite pixel is unreadable. The fluxes become uint8 the way
  astronomers display them (:func:`stretch_to_uint8`): a linear, square-root, log or asinh
  stretch between limits from the sky and the source (:class:`SkyInterval`, the default), a
  percentile interval, zscale, the min/max, or fixed values, using ``astropy.visualization``
  and ``astropy.stats``. The parameters are a plain dict, recorded in the input spec with the
  HDU and the NaN policy, so that prediction reads and stretches new images exactly as the
  training images were (:meth:`ImageReader.for_spec`).
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from galaxy_lightning.errors import ConfigError, DataError, GalaxyError

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fz")
STRETCHES = ("linear", "sqrt", "log", "asinh", "lupton")
INTERVALS = ("sky", "percentile", "zscale", "minmax", "manual")
NAN_POLICIES = ("median", "zero", "error")
#: Pillow modes of 16-bit grayscale PNGs (older Pillow opens them as 32-bit "I").
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
#: The default stretch of FITS fluxes: asinh from the sky level to the source's bright end
#: (:class:`SkyInterval`), per image and band. Survey cutouts are mostly sky: a percentile of all
#: pixels puts the upper limit inside the sky noise whenever the source covers few pixels, so the
#: noise fills the grey range and the source saturates. Limits from the sky's own statistics keep
#: the sky black and the source unsaturated however much of the cutout it covers.
#: ``a`` is astropy's parameter of the stretch (null: astropy's default, 0.1 for asinh, 1000 for
#: log); ``percentile`` is the source pixels' percentile at the top (``sky``) or the central
#: percentage of all pixels (``percentile``); ``vmin``/``vmax`` are fixed limits (one value, or
#: one per band). ``kind: lupton`` is the colour composite of Lupton et al. (2004) for three
#: bands (:func:`lupton_to_uint8`), ``Q`` its softening.
DEFAULT_STRETCH: dict[str, Any] = {"kind": "asinh", "a": None, "interval": "sky",
                                   "percentile": 99.5, "per_image": True, "vmin": None, "vmax": None}
#: Keys of one kind only, with their defaults: a stretch of another kind neither needs nor records
#: them (so adding one changes no existing stretch, prepared file or input spec).
KIND_KEYS: dict[str, dict[str, Any]] = {"lupton": {"Q": 3.0}}
#: The default before the sky interval: a stretch recorded in an input spec lacks only keys that
#: did not exist when it was written, so it is completed with the defaults of that time (the
#: interval was a percentile of all pixels), and an old model stretches new images as it was
#: trained (:meth:`ImageReader.for_spec`).
RECORDED_STRETCH_DEFAULTS: dict[str, Any] = {**DEFAULT_STRETCH, "interval": "percentile"}
#: The sky interval's rules (:class:`SkyInterval`), in units of the sky noise (sigma):
#: sigma clipping of the sky statistics; source pixels lie above sky + SOURCE_SIGMA; the upper
#: limit is never below sky + FLOOR_SIGMA, so a cutout of pure noise shows the noise as dim
#: speckle rather than stretched over the whole grey range.
SKY_CLIP_SIGMA = 3.0
SOURCE_SIGMA = 3.0
FLOOR_SIGMA = 10.0
#: Fewer source pixels than this: the upper limit is their maximum (a percentile of a handful of
#: pixels is the maximum anyway, up to interpolation).
MIN_SOURCE_PIXELS = 10


def is_fits(path: str | Path) -> bool:
    return str(path).lower().endswith(FITS_SUFFIXES)


def check_stretch(stretch: Mapping[str, Any]) -> dict[str, Any]:
    """The stretch parameters completed with defaults and checked."""
    known = set(DEFAULT_STRETCH).union(*KIND_KEYS.values())
    unknown = sorted(set(stretch) - known)
    if unknown:
        raise ConfigError(f"stretch has unknown keys {unknown}; known: {sorted(known)}")
    kind = stretch.get("kind", DEFAULT_STRETCH["kind"])
    own = KIND_KEYS.get(kind, {})
    out = {**DEFAULT_STRETCH, **own,
           **{k: v for k, v in stretch.items() if k in DEFAULT_STRETCH or k in own}}
    if out["kind"] not in STRETCHES:
        raise ConfigError(f"stretch.kind={out['kind']!r} must be one of {list(STRETCHES)}")
    if out["interval"] not in INTERVALS:
        raise ConfigError(f"stretch.interval={out['interval']!r} must be one of {list(INTERVALS)}")
    if out["a"] is not None and not float(out["a"]) > 0:
        raise ConfigError(f"stretch.a={out['a']} must be positive (or null for astropy's default)")
    if not 50 < float(out["percentile"]) <= 100:
        raise ConfigError(f"stretch.percentile={out['percentile']} must be in (50, 100]")
    if "Q" in out and not float(out["Q"]) > 0:
        raise ConfigError(f"stretch.Q={out['Q']} must be positive (how strongly Lupton's "
                          "stretch lifts the faint end; 3 by default)")
    if out["interval"] == "manual" and (out["vmin"] is None or out["vmax"] is None):
        raise ConfigError("stretch.interval=manual needs stretch.vmin and stretch.vmax (one number, "
                          "or one per band)")
    return out


class SkyInterval:
    """Limits from the sky and the source, as astronomers set a display by hand: the lower limit
    at the sky level, the upper one at the ``percentile``-th percentile of the source's pixels.

    The sky level and noise are the sigma-clipped median and standard deviation of the pixels
    (``astropy.stats.sigma_clipped_stats``), which the source hardly moves even when it covers
    most of the cutout. The lower limit is the sky itself, not below it (Lupton et al. 2004 set
    the sky to black too): the sky maps to black whatever the source, and the half of the noise
    above it stays visible as faint speckle, so the network still sees how noisy an image is. The
    source's pixels are those above sky + ``SOURCE_SIGMA`` sigma; their percentile (their maximum
    when there are fewer than ``MIN_SOURCE_PIXELS``) is the upper limit, never below sky +
    ``FLOOR_SIGMA`` sigma. Same interface as astropy's intervals (``get_limits``).
    """

    def __init__(self, percentile: float = 99.5) -> None:
        self.percentile = float(percentile)

    def get_limits(self, values: np.ndarray) -> tuple[float, float]:
        # deferred: astropy.stats is slow to import (FITS only)
        from astropy.stats import sigma_clipped_stats

        values = np.asarray(values, dtype=np.float64).ravel()
        values = values[np.isfinite(values)]
        _, sky, noise = sigma_clipped_stats(values, sigma=SKY_CLIP_SIGMA)
        sky, noise = float(sky), float(noise)
        source = values[values > sky + SOURCE_SIGMA * noise]
        top = float(np.percentile(source, self.percentile)) if len(source) >= MIN_SOURCE_PIXELS \
            else float(values.max())
        return sky, max(top, sky + FLOOR_SIGMA * noise)


def _stretch_object(params: Mapping[str, Any]) -> Any:
    # deferred: astropy.visualization takes about a third of a second to import (FITS only)
    from astropy.visualization import AsinhStretch, LinearStretch, LogStretch, SqrtStretch

    kind, a = params["kind"], params.get("a")
    if kind == "asinh":
        return AsinhStretch() if a is None else AsinhStretch(a=float(a))
    if kind == "log":
        return LogStretch() if a is None else LogStretch(a=float(a))
    if kind == "sqrt":
        return SqrtStretch()
    return LinearStretch()


def _interval(params: Mapping[str, Any]) -> Any:
    # deferred: astropy.visualization takes about a third of a second to import (FITS only)
    from astropy.visualization import MinMaxInterval, PercentileInterval, ZScaleInterval

    name = params["interval"]
    if name == "sky":
        return SkyInterval(float(params["percentile"]))
    if name == "zscale":
        return ZScaleInterval()
    if name == "minmax":
        return MinMaxInterval()
    return PercentileInterval(float(params["percentile"]))


def band_limits(flux: np.ndarray, params: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Per-band (vmin, vmax) of (H, W, C) fluxes from the interval of ``params``."""
    interval = _interval(params)
    limits = [interval.get_limits(flux[..., c]) for c in range(flux.shape[-1])]
    return np.array([lo for lo, _ in limits]), np.array([hi for _, hi in limits])


def stretch_to_uint8(flux: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
    """(H, W, C) float fluxes -> (H, W, C) uint8, each band stretched between its limits.

    Limits come from the image itself (``per_image``) or are fixed (``vmin``/``vmax``, one value
    or one per band; :func:`fixed_limits` estimates them from a sample of the training images).
    """
    # deferred: astropy.visualization takes about a third of a second to import (FITS only)
    from astropy.visualization import ImageNormalize

    vmin, vmax = _limits(flux, params)
    if params["kind"] == "lupton":
        return lupton_to_uint8(flux, vmin, vmax, float(params.get("Q", 3.0)))
    stretch = _stretch_object(params)
    out = np.empty(flux.shape, dtype=np.uint8)
    for c in range(flux.shape[-1]):
        lo, hi = float(vmin[c]), float(vmax[c])
        if not hi > lo:  # a flat band: all at the bottom of the range
            out[..., c] = 0
            continue
        norm = ImageNormalize(vmin=lo, vmax=hi, stretch=stretch, clip=True)
        scaled = np.ma.getdata(norm(flux[..., c].astype(np.float64)))
        out[..., c] = np.rint(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)
    return out


def _limits(flux: np.ndarray, params: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Per-band (vmin, vmax): from the image itself (``per_image``) or the fixed ones."""
    if params.get("per_image", True) and params["interval"] != "manual":
        return band_limits(flux, params)
    bands = flux.shape[-1]
    given = fixed_bands(params)
    if given not in (None, bands):
        raise ConfigError(f"stretch.vmin/vmax have {given} values for {bands} band(s); give "
                          "one value, or one per band")
    return (np.broadcast_to(np.asarray(params["vmin"], dtype=np.float64), (bands,)),
            np.broadcast_to(np.asarray(params["vmax"], dtype=np.float64), (bands,)))


def lupton_to_uint8(flux: np.ndarray, vmin: np.ndarray, vmax: np.ndarray,
                    Q: float) -> np.ndarray:  # noqa: N803 (Lupton's name)
    """(H, W, 3) fluxes -> (H, W, 3) uint8 by the colour composite of Lupton et al. (2004)
    (astropy's ``make_lupton_rgb``): one asinh stretch of the bands' mean intensity, applied to
    the three bands together, so that a pixel keeps its colour (its band ratios) however bright it
    is and the saturated core of a galaxy stays coloured rather than white. Each band's black point
    is its lower limit (the sky, by default); astropy's linear ``stretch`` is chosen so that the
    intensity ``mean(vmax - vmin)`` maps to white, as the per-band stretches map vmax to 255, and
    ``Q`` sets how strongly the faint end is lifted (3 is close to asinh with a=0.1; larger shows
    fainter structure and saturates more of the core). The channels keep the order of the bands;
    list the reddest first (z, r, g) for a picture in natural colours."""
    from astropy.visualization import LuptonAsinhStretch, ManualInterval, make_lupton_rgb

    if flux.shape[-1] != 3:
        raise ConfigError(f"stretch.kind=lupton makes a colour image from 3 bands; the images have "
                          f"{flux.shape[-1]} (give three image columns, or another stretch.kind)")
    span = float(np.mean(np.asarray(vmax, dtype=np.float64) - np.asarray(vmin, dtype=np.float64)))
    if not span > 0:
        return np.zeros(flux.shape, dtype=np.uint8)
    # astropy: y = asinh(Q x / stretch) * 0.1 / asinh(0.1 Q); y(span) = 1 fixes stretch
    linear = Q * span / math.sinh(math.asinh(0.1 * Q) / 0.1)
    intervals = [ManualInterval(vmin=float(v), vmax=None) for v in vmin]
    bands = [flux[..., c].astype(np.float64) for c in range(3)]
    with np.errstate(invalid="ignore", divide="ignore"):  # astropy's 0/0 where the sky is 0
        return make_lupton_rgb(*bands, interval=intervals,
                               stretch_object=LuptonAsinhStretch(stretch=linear, Q=Q))


def stretch_tag(params: Mapping[str, Any]) -> str:
    """A short name for a stretch in file names: '' for the default, else its kind and interval
    and a hash of every parameter (``asinh-zscale-1a2b3c4d``)."""
    params = check_stretch(params)
    if params == check_stretch({}):
        return ""
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    return f"{params['kind']}-{params['interval']}-{digest}"


def describe_stretch(params: Mapping[str, Any]) -> str:
    """A short line saying how FITS fluxes became pixels, e.g. for a figure's title."""
    interval = params.get("interval", "percentile")
    what = f"{interval} interval"
    if interval in ("sky", "percentile"):
        what += f" ({params.get('percentile', 99.5):g})"
    a = f" a={params['a']:g}" if params.get("a") is not None else ""
    if params.get("kind") == "lupton":
        a = f" Q={params.get('Q', 3.0):g}"
    fixed = not params.get("per_image", True) or interval == "manual"
    return f"FITS stretch: {params.get('kind', 'asinh')}{a}, {what}, " \
           f"{'fixed limits' if fixed else 'per image'}"


#: When stretched FITS images look wrong (:func:`stretch_warning`): an image is saturated when more
#: than SATURATED_PIXELS of its pixels are 255, sky-grey when its median pixel is above GREY_MEDIAN
#: (a cutout is mostly sky, which should be near black); the preparation warns when more than
#: BAD_IMAGES of the images are either.
SATURATED_PIXELS = 0.05
GREY_MEDIAN = 80
BAD_IMAGES = 0.5


def stretch_looks(images: np.ndarray) -> tuple[int, int]:
    """How many of (n, H, W, C) uint8 stretched images are saturated, and how many sky-grey."""
    flat = images.reshape(len(images), -1)
    saturated = int(((flat == 255).mean(axis=1) > SATURATED_PIXELS).sum())
    grey = int((np.median(flat, axis=1) > GREY_MEDIAN).sum())
    return saturated, grey


def stretch_warning(total: int, saturated: int, grey: int) -> str | None:
    """One line when most stretched images are saturated or sky-grey (the stretch destroys the
    source or shows the noise as the image), naming the fraction and what to try; else None."""
    if total == 0:
        return None
    found = [f"{n / total:.0%} of the images {what}" for n, what in (
        (saturated, f"have more than {SATURATED_PIXELS:.0%} of their pixels saturated (255)"),
        (grey, f"have a median pixel above {GREY_MEDIAN} (grey sky)")) if n > BAD_IMAGES * total]
    if not found:
        return None
    return (f"the FITS stretch looks wrong: {' and '.join(found)}; compare stretches on your "
            "cutouts with `galaxy-stretch <FITS files or folders>` and set "
            "data.source.stretch.interval / .kind / .a / .percentile (default: interval=sky, "
            "kind=asinh)")


def fixed_bands(params: Mapping[str, Any]) -> int | None:
    """The number of bands fixed stretch limits are for (None: one value for every band, or
    limits per image)."""
    if params.get("per_image", True) and params["interval"] != "manual":
        return None
    sizes = {np.size(params[k]) for k in ("vmin", "vmax") if params.get(k) is not None}
    sizes.discard(1)
    return max(sizes) if sizes else None


def fixed_limits(samples: Sequence[np.ndarray], params: Mapping[str, Any]) -> dict[str, Any]:
    """Fixed stretch limits per band from a sample of images (the interval applied to all of
    their pixels together): what ``per_image: false`` records in the input spec."""
    bands = samples[0].shape[-1]
    pixels = np.concatenate([s.reshape(-1, bands) for s in samples])[None]  # (1, P, C)
    vmin, vmax = band_limits(pixels, params)
    return {**params, "vmin": [float(v) for v in vmin], "vmax": [float(v) for v in vmax]}


def fill_nan(flux: np.ndarray, policy: str, name: str) -> np.ndarray:
    """Replace non-finite pixels of (H, W, C) fluxes: by the band's median, by zero, or refuse."""
    finite = np.isfinite(flux)
    if finite.all():
        return flux
    if not finite.any(axis=(0, 1)).all():
        raise DataError(f"{name}: a band has no finite pixel (all NaN); drop the image or fix the "
                        "cutout")
    if policy == "error":
        raise DataError(f"{name}: {int((~finite).sum())} NaN or infinite pixels; set nan=median or "
                        "nan=zero to fill them")
    flux = flux.copy()
    for c in range(flux.shape[-1]):
        bad = ~finite[..., c]
        if bad.any():
            flux[..., c][bad] = np.median(flux[..., c][~bad]) if policy == "median" else 0.0
    return flux


def read_fits(path: Path, hdu: int | str = 0) -> np.ndarray:
    """(H, W, C) float32 fluxes of a FITS image: 2-D (one band) or a 3-D cube of bands."""
    # deferred: astropy.io.fits takes about a quarter of a second to import (FITS only)
    from astropy.io import fits

    try:
        with fits.open(path, memmap=False) as hdul:
            try:
                data = hdul[hdu].data
            except (KeyError, IndexError):
                names = [h.name or str(i) for i, h in enumerate(hdul)]
                raise DataError(f"{path}: no HDU {hdu!r} (HDUs: {', '.join(names)}); set "
                                "fits_hdu") from None
    except OSError as err:
        raise DataError(f"{path}: not a readable FITS file ({err})") from None
    if data is None or data.ndim not in (2, 3):
        shape = None if data is None else data.shape
        raise DataError(f"{path}: HDU {hdu!r} holds {shape}, not a 2-D image or a 3-D cube of "
                        "bands; set fits_hdu")
    data = np.asarray(data, dtype=np.float32)
    # A cube is (bands, H, W) in FITS order; the model takes (H, W, C).
    return data[..., None] if data.ndim == 2 else np.moveaxis(data, 0, -1)


def read_raster(path: Path, channels: int | None) -> np.ndarray:
    """(H, W, C) uint8 of a PNG/JPEG: RGB (alpha dropped) or grayscale.

    A 16-bit grayscale PNG is scaled to 8 bits (value / 257, so 65535 -> 255): Pillow's own
    conversion to 8 bits clips every value above 255 to white."""
    try:
        with Image.open(path) as img:
            img.load()
            if channels is None:
                channels = 1 if img.mode in ("L", "F", "1", *SIXTEEN_BIT_MODES) else 3
            if img.mode in SIXTEEN_BIT_MODES:
                gray = np.rint(np.clip(np.asarray(img, dtype=np.float64), 0, 65535) / 257.0)
                gray = gray.astype(np.uint8)[..., None]
                pixels = gray if channels == 1 else np.repeat(gray, 3, axis=-1)
            else:
                pixels = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: not a readable image ({err})") from None
    return pixels[..., None] if pixels.ndim == 2 else pixels


def read_flux(paths: Sequence[Path], hdu: int | str = 0, nan: str = "median") -> np.ndarray:
    """One object's FITS fluxes, (H, W, C) float32 with non-finite pixels filled: one file (2-D,
    or a cube of bands) or one file per band."""
    if not all(is_fits(p) for p in paths):
        raise DataError(f"{paths[0]}: several files per object must all be FITS (one per band)")
    bands = [read_fits(p, hdu) for p in paths]
    if len({b.shape[:2] for b in bands}) > 1:
        raise DataError(f"{paths[0]}: the bands of one object differ in shape "
                        f"({[b.shape[:2] for b in bands]})")
    return fill_nan(np.concatenate(bands, axis=-1), nan, str(paths[0]))


class ImageReader:
    """Reads objects' images (one path, or one per band) as model-ready uint8: the file format's
    own reading, the stretch, then the input spec's geometry (crop, resize). Picklable, so that
    :func:`read_images` can run it in worker processes.

    Anything that reads raw files for a model builds it with :meth:`for_spec`, so the HDU, the
    NaN fill and the stretch are the ones training used."""

    def __init__(self, channels: int | None = None, hdu: int | str = 0, nan: str = "median",
                 stretch: Mapping[str, Any] | None = None, spec: Any = None,
                 allow_resize: bool = False) -> None:
        if nan not in NAN_POLICIES:
            raise ConfigError(f"nan={nan!r} must be one of {list(NAN_POLICIES)}")
        self.channels = channels
        self.hdu = hdu
        self.nan = nan
        self.stretch = check_stretch(stretch or {})
        self.spec = spec  # InputSpec, or None for the raw size
        self.allow_resize = allow_resize

    @classmethod
    def for_spec(cls, spec: Any, allow_resize: bool = False) -> ImageReader:
        """The reader of new images for a model with input spec ``spec``: its channel count, and
        for FITS the HDU, NaN policy and stretch recorded at preparation (HDU 0 and the median
        for specs written before they were recorded; a recorded stretch's missing keys take the
        defaults of when it was written, :data:`RECORDED_STRETCH_DEFAULTS`)."""
        fits = spec.fits or {}
        stretch = None if spec.stretch is None else {**RECORDED_STRETCH_DEFAULTS, **spec.stretch}
        return cls(channels=spec.channels, hdu=fits.get("hdu", 0), nan=fits.get("nan", "median"),
                   stretch=stretch, spec=spec, allow_resize=allow_resize)

    def __call__(self, paths: Sequence[Path]) -> np.ndarray:
        """The model-ready image; :class:`DataError` (unreadable, or FITS bands other than the
        model's) or, when the size does not fit the input spec, its ``SizeMismatch``, each naming
        the file."""
        raster = len(paths) == 1 and not is_fits(paths[0])
        if raster:
            image = read_raster(paths[0], self.channels)
        else:
            flux = read_flux(paths, self.hdu, self.nan)
            self._check_bands(paths, flux.shape[-1])
            image = stretch_to_uint8(flux, self.stretch)
        if self.spec is None:
            return image
        try:
            return self.spec.conform(image[None], self.allow_resize, adapt_channels=raster)[0]
        except ConfigError as err:
            raise type(err)(f"{paths[0]}: {err}") from None

    def _check_bands(self, paths: Sequence[Path], bands: int) -> None:
        """Refuse FITS bands other than the model's (or than the fixed stretch limits are for):
        bands are measurements, and repeating one band or dropping one would make up an image."""
        files = f" in {len(paths)} files" if len(paths) > 1 else ""
        if self.spec is not None and bands != self.spec.channels:
            raise DataError(f"{paths[0]}: {bands} FITS band(s){files}; the model takes "
                            f"{self.spec.channels}: give each object the bands it was trained on")
        limits = fixed_bands(self.stretch)
        if limits not in (None, bands):
            raise DataError(f"{paths[0]}: {bands} FITS band(s){files}; the fixed stretch limits "
                            f"are for {limits}: give every object the same bands")


def _read_chunk(reader: ImageReader, chunk: list[tuple[int, Sequence[Path]]]
                ) -> list[tuple[int, np.ndarray | GalaxyError]]:
    out: list[tuple[int, np.ndarray | GalaxyError]] = []
    for index, paths in chunk:
        try:
            out.append((index, reader(paths)))
        except GalaxyError as err:
            out.append((index, err))
    return out


def _init_worker() -> None:
    torch.set_num_threads(1)  # each worker process reads and resizes on its own core
    # A parent killed outright (SIGKILL, the OOM killer) cannot shut its pool down; its workers
    # would wait for work forever, holding the files it had open. They leave within a second.
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def read_images(reader: ImageReader, jobs: Sequence[tuple[int, Sequence[Path]]], workers: int = 0,
                chunk: int = 64) -> Any:
    """Yield ``(index, uint8 image or the error that made it unusable)`` for every job, in order.

    With ``workers`` > 1, chunks of jobs are read in that many processes, at most two chunks per
    process in flight, so memory stays bounded however long the list is.
    """
    chunks = [list(jobs[i:i + chunk]) for i in range(0, len(jobs), chunk)]
    if workers <= 1:
        for c in chunks:
            yield from _read_chunk(reader, c)
        return
    for results in ordered_map(_read_chunk, [(reader, c) for c in chunks], workers):
        yield from results


def ordered_map(fn: Any, args: Sequence[tuple[Any, ...]], workers: int) -> Iterator[Any]:
    """``fn(*a)`` for every ``a`` of ``args``, in order, computed in ``workers`` processes with at
    most two tasks per process in flight, so memory stays bounded however many there are."""
    # fork where there is one (as torch's DataLoader workers do: one thread per worker, set by
    # the initializer, so the parent's thread pools are never used in the child); spawning would
    # import torch again in every worker, seconds each
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                             initializer=_init_worker) as pool:
        pending = [pool.submit(fn, *a) for a in args[:2 * workers]]
        following = len(pending)
        while pending:
            result = pending.pop(0).result()
            if following < len(args):
                pending.append(pool.submit(fn, *args[following]))
                following += 1
            yield result
