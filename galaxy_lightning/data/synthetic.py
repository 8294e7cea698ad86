"""An offline galaxy simulator for the tutorial's 7 Galaxy10 DECaLS classes.

Each image is a small physical model of a galaxy as the Legacy Surveys viewer renders it: Sersic
bulges and ellipticals, exponential disks seen at a random inclination (thick-disk axis ratio
``q^2 = cos^2 i (1 - q0^2) + q0^2``), logarithmic spiral arms whose pitch angle separates tight
from loose spirals, bars with arms starting at their ends, thin edge-on disks with bulges and dust
lanes, and pairs of galaxies with tidal tails for mergers. Bulges are red and disks blue; the image
is blurred by a Gaussian PSF (FWHM 4-6 px, i.e. 1-1.5 arcsec at 0.262 arcsec/px), gets sky and
photon noise, field stars and small background galaxies, a small centring jitter, and an asinh
(Lupton) colour stretch to uint8 RGB (channels z, r, g as R, G, B).

Class boundaries overlap on purpose (axis ratios of round and in-between ellipticals, arm
contrast, noise), so the tutorial CNN learns it quickly but does not saturate.

Every image is drawn from its own generator seeded by ``(seed, index)``: the data set is
deterministic and independent of chunking or the order of generation.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from galaxy_lightning import console
from galaxy_lightning.data.galaxy10 import TUTORIAL_CLASS_NAMES
from galaxy_lightning.data.images import ordered_map
from galaxy_lightning.data.prepared import PreparedWriter, prepare_once
from galaxy_lightning.data.volunteers import TREE as VOLUNTEER_TREE
from galaxy_lightning.data.volunteers import simulate_votes
from galaxy_lightning.errors import ConfigError
from galaxy_lightning.input_spec import InputSpec

#: The tutorial's 7 Galaxy10 DECaLS classes, which the simulator draws.
CLASS_NAMES = list(TUTORIAL_CLASS_NAMES)
SIMULATOR_VERSION = 1

# Display colours (R, G, B = z, r, g bands) of old, red stellar populations and of young, blue disks.
_RED = np.array([1.0, 0.80, 0.58], dtype=np.float32)
_BLUE = np.array([0.62, 0.78, 1.0], dtype=np.float32)


def _sersic_b(n: float) -> float:
    return 2.0 * n - 1.0 / 3.0 + 0.009876 / n


class _Canvas:
    """Pixel grid of one image, in units scaled so that parameters are given for a 96 px crop."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size = size
        self.scale = size / 96.0
        self.rng = rng
        c = (size - 1) / 2.0
        coords = (np.arange(size, dtype=np.float32) - c) / self.scale
        self.y, self.x = np.meshgrid(coords, coords, indexing="ij")
        self.flux = np.zeros((3, size, size), dtype=np.float32)
        #: what was drawn, in the words of a Galaxy Zoo volunteer (:mod:`.volunteers`)
        self.truth: dict[str, Any] = {}

    def frame(self, x0: float, y0: float, pa: float, q: float) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates (u along the major axis, v along the minor axis de-projected by q)."""
        dx, dy = self.x - x0, self.y - y0
        cos, sin = math.cos(pa), math.sin(pa)
        u = dx * cos + dy * sin
        v = (-dx * sin + dy * cos) / q
        return u, v

    def add(self, profile: np.ndarray, flux: float, color: np.ndarray) -> None:
        """Add a component normalised to ``flux`` counts, split over bands by ``color``."""
        total = float(profile.sum())
        if total > 0:
            self.flux += (flux / total) * profile[None] * color[:, None, None]

    def color(self, base: np.ndarray, jitter: float = 0.07) -> np.ndarray:
        return np.clip(base + self.rng.normal(0.0, jitter, 3).astype(np.float32), 0.2, 1.2)


def _sersic(u: np.ndarray, v: np.ndarray, r_e: float, n: float) -> np.ndarray:
    r = np.sqrt(u * u + v * v)
    return np.exp(-_sersic_b(n) * ((r / r_e) ** (1.0 / n) - 1.0))


def _disk_axis_ratio(rng: np.random.Generator, cos_i_range: tuple[float, float]) -> float:
    cos_i = rng.uniform(*cos_i_range)
    q0 = rng.uniform(0.1, 0.2)
    return math.sqrt(cos_i**2 * (1 - q0**2) + q0**2)


def _clumps(cv: _Canvas, strength: float) -> np.ndarray:
    """Lumpy star-forming texture: smoothed log-normal noise with mean ~1."""
    noise = cv.rng.normal(0.0, 1.0, (cv.size, cv.size)).astype(np.float32)
    smooth = _gaussian_blur(noise[None], 1.2 * cv.scale)[0]
    smooth /= smooth.std() + 1e-6
    return np.exp(strength * smooth - 0.5 * strength**2)


def _spiral(cv: _Canvas, x0: float, y0: float, pa: float, q: float, h: float, flux: float,
            pitch_deg: float, arms: int, arm_frac: float, r_start: float, phase: float,
            sharpness: float) -> None:
    """Exponential disk of scale length h with an m-armed logarithmic spiral pattern."""
    rng = cv.rng
    u, v = cv.frame(x0, y0, pa, q)
    r = np.sqrt(u * u + v * v) + 1e-3
    theta = np.arctan2(v, u)
    disk = np.exp(-r / h)
    winding = np.log(r / max(r_start, 0.5)) / math.tan(math.radians(pitch_deg))
    pattern = ((1.0 + np.cos(arms * (theta - winding - phase))) / 2.0) ** sharpness
    onset = 1.0 - np.exp(-((r / max(r_start, 0.5)) ** 2))
    arms_map = disk * pattern * onset * _clumps(cv, rng.uniform(0.3, 0.7))
    cv.add(disk, flux * (1.0 - arm_frac), cv.color(_BLUE * 0.9 + _RED * 0.1))
    cv.add(arms_map, flux * arm_frac, cv.color(_BLUE))


def _elliptical(cv: _Canvas, x0: float, y0: float, flux: float, n: float, r_e: float,
                q: float) -> None:
    u, v = cv.frame(x0, y0, cv.rng.uniform(0, math.pi), q)
    cv.add(_sersic(u, v, r_e, n), flux, cv.color(_RED))


def _disk_galaxy(cv: _Canvas, x0: float, y0: float, flux: float, h: float) -> None:
    """A generic bulge + disk galaxy (merger components, background galaxies)."""
    rng = cv.rng
    pa, q = rng.uniform(0, math.pi), _disk_axis_ratio(rng, (0.2, 1.0))
    bt = rng.uniform(0.1, 0.6)
    u, v = cv.frame(x0, y0, pa, q)
    cv.add(_sersic(u, v, h, 1.0), flux * (1 - bt), cv.color(_BLUE))
    u, v = cv.frame(x0, y0, pa, rng.uniform(0.7, 1.0))
    cv.add(_sersic(u, v, rng.uniform(0.15, 0.35) * h * 1.68, rng.uniform(2, 4)), flux * bt,
           cv.color(_RED))


def _tidal_tail(cv: _Canvas, x0: float, y0: float, flux: float, length: float) -> None:
    """A curved stream of stars pulled out of a galaxy: Gaussian knots along a widening arc."""
    rng = cv.rng
    k = 24
    t = np.linspace(0.0, 1.0, k, dtype=np.float32)
    heading = rng.uniform(0, 2 * math.pi) + rng.choice([-1, 1]) * rng.uniform(1.0, 3.0) * t
    step = length / k
    xs = x0 + np.cumsum(step * np.cos(heading))
    ys = y0 + np.cumsum(step * np.sin(heading))
    width = (1.5 + 3.0 * t) * rng.uniform(0.8, 1.4)
    weight = np.exp(-2.0 * t) * rng.uniform(0.5, 1.5, k)
    d2 = (cv.x[None] - xs[:, None, None]) ** 2 + (cv.y[None] - ys[:, None, None]) ** 2
    profile = (weight[:, None, None] / width[:, None, None] ** 2
               * np.exp(-0.5 * d2 / width[:, None, None] ** 2)).sum(0)
    cv.add(profile, flux, cv.color(_BLUE * 0.6 + _RED * 0.4))


def _draw_class(cv: _Canvas, label: int) -> None:
    """Draw a galaxy of class ``label`` and record in ``cv.truth`` what was drawn. (Parameters
    are drawn in a fixed order: keep it, or every simulated image changes.)"""
    rng = cv.rng
    jitter = 1.5  # centring jitter (px at 96 px)
    x0, y0 = rng.normal(0.0, jitter, 2)
    flux = 10 ** rng.uniform(4.3, 5.3)
    truth = cv.truth
    truth.update(label=label, flux=flux)
    if label == 0:  # Merging: two galaxies, tidal tails, distorted light
        sep = rng.uniform(5.0, 26.0)
        ang = rng.uniform(0, 2 * math.pi)
        ratio = rng.uniform(0.25, 1.0)
        centres = [(x0 - 0.5 * sep * math.cos(ang), y0 - 0.5 * sep * math.sin(ang)),
                   (x0 + 0.5 * sep * math.cos(ang), y0 + 0.5 * sep * math.sin(ang))]
        disks = 0
        for (cx, cy), f in zip(centres, (flux / (1 + ratio), flux * ratio / (1 + ratio))):
            if rng.random() < 0.5:
                _elliptical(cv, cx, cy, f, rng.uniform(1.5, 4.0), rng.uniform(3, 9),
                            rng.uniform(0.5, 1.0))
            else:
                _disk_galaxy(cv, cx, cy, f, rng.uniform(3, 8))
                disks += 1
        truth.update(separation=sep, mass_ratio=ratio, disks=disks)
        for _ in range(rng.integers(1, 3)):
            cx, cy = centres[rng.integers(0, 2)]
            _tidal_tail(cv, cx, cy, flux * rng.uniform(0.1, 0.35), rng.uniform(12, 38))
    elif label in (1, 2):  # Round Smooth, In-between Round Smooth
        n, r_e = (rng.uniform(2.5, 5.5), rng.uniform(4, 14)) if label == 1 else \
            (rng.uniform(1.5, 4.5), rng.uniform(4, 14))
        q = rng.uniform(0.72, 1.0) if label == 1 else rng.uniform(0.38, 0.82)
        truth.update(axis_ratio=q)
        _elliptical(cv, x0, y0, flux, n, r_e, q)
    elif label in (3, 4, 5):  # spirals
        pa, q = rng.uniform(0, math.pi), _disk_axis_ratio(rng, (0.45, 1.0))
        h = rng.uniform(5, 12)
        bt = {3: rng.uniform(0.1, 0.35), 4: rng.uniform(0.15, 0.45), 5: rng.uniform(0.03, 0.3)}[label]
        arm_frac = rng.uniform(0.25, 0.6)
        arms = 2 if (label != 5 or rng.random() < 0.7) else 3
        sharp = rng.uniform(1.5, 5.0)
        truth.update(axis_ratio=q, bulge_to_total=bt, arm_fraction=arm_frac, arms=arms)
        if label == 3:  # bar, with the arms starting at its ends
            bar_len = rng.uniform(0.7, 1.6) * h
            bar_angle = rng.uniform(0, math.pi)
            u, v = cv.frame(x0, y0, pa, q)
            ub = u * math.cos(bar_angle) + v * math.sin(bar_angle)
            vb = -u * math.sin(bar_angle) + v * math.cos(bar_angle)
            bar = _sersic(ub, vb / rng.uniform(0.18, 0.35), bar_len * 0.6, 0.5)
            bar_flux = rng.uniform(0.1, 0.25)
            cv.add(bar, flux * bar_flux, cv.color(_RED * 0.7 + _BLUE * 0.3))
            pitch = rng.uniform(10, 35)
            truth.update(bar=bar_flux, arms=2)
            _spiral(cv, x0, y0, pa, q, h, flux * (1 - bt), pitch, 2, arm_frac,
                    bar_len, bar_angle, sharp)
        else:
            pitch = rng.uniform(7, 17) if label == 4 else rng.uniform(19, 38)
            truth.update(bar=0.0)
            _spiral(cv, x0, y0, pa, q, h, flux * (1 - bt), pitch, arms, arm_frac,
                    rng.uniform(0.3, 0.8) * h, rng.uniform(0, 2 * math.pi), sharp)
        truth.update(pitch=pitch)
        u, v = cv.frame(x0, y0, pa, rng.uniform(0.75, 1.0))
        cv.add(_sersic(u, v, rng.uniform(1.5, 4.0), rng.uniform(1.5, 4.0)), flux * bt,
               cv.color(_RED))
    else:  # Edge-on with Bulge: thin disk (i ~ 90 deg), bulge, optional dust lane
        pa = rng.uniform(0, math.pi)
        q = rng.uniform(0.08, 0.22)
        h = rng.uniform(7, 16)
        bt = rng.uniform(0.15, 0.55)
        u, v = cv.frame(x0, y0, pa, q)
        disk = np.exp(-np.abs(u) / h) * np.exp(-np.abs(v * q) / (q * h * 0.6))
        lane = 1.0 - rng.uniform(0.0, 0.7) * np.exp(-0.5 * (v * q / rng.uniform(0.6, 1.2)) ** 2)
        cv.add(disk * lane, flux * (1 - bt), cv.color(_BLUE * 0.7 + _RED * 0.3))
        bulge_q = rng.uniform(0.55, 1.0)
        truth.update(axis_ratio=q, bulge_to_total=bt, bulge_axis_ratio=bulge_q)
        u, v = cv.frame(x0, y0, pa, bulge_q)
        cv.add(_sersic(u, v, rng.uniform(2.0, 6.0), rng.uniform(1.5, 4.0)) * lane, flux * bt,
               cv.color(_RED))


def _gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Convolve (C, H, W) images with a Gaussian by FFT (periodic edges, negligible here)."""
    h, w = images.shape[-2:]
    fy = np.fft.fftfreq(h).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(w).astype(np.float32)[None, :]
    transfer = np.exp(-2.0 * (math.pi * sigma) ** 2 * (fx**2 + fy**2))
    return np.fft.irfft2(np.fft.rfft2(images) * transfer, s=(h, w)).astype(np.float32)


def render(label: int, seed: int, index: int, size: int = 96,
           truth: dict[str, Any] | None = None) -> np.ndarray:
    """Simulate one galaxy of class ``label`` as a uint8 (size, size, 3) RGB image; ``truth``
    (a dict, if given) receives what was drawn (:mod:`.volunteers` answers from it)."""
    flux, sky_sigma, rng = render_flux(label, seed, index, size, truth)
    # Lupton asinh stretch preserving colour, scaled to the sky noise.
    softening = sky_sigma * rng.uniform(2.0, 4.0)
    intensity = flux.mean(0)
    stretch = np.arcsinh(np.clip(intensity, 1e-3, None) / softening) / np.clip(intensity, 1e-3, None)
    top = math.asinh(rng.uniform(30.0, 60.0))
    rgb = flux * stretch[None] / top
    rgb = np.clip(rgb, 0.0, 1.0)
    return (rgb.transpose(1, 2, 0) * 255.0 + 0.5).astype(np.uint8)


def render_flux(label: int, seed: int, index: int, size: int = 96,
                truth: dict[str, Any] | None = None
                ) -> tuple[np.ndarray, float, np.random.Generator]:
    """The fluxes :func:`render` stretches: (3, size, size) float32 in bands z, r, g, sky
    subtracted, with sky and photon noise; the sky noise sigma; the image's generator (its next
    draws are the stretch's)."""
    rng = np.random.default_rng([seed, index])
    cv = _Canvas(size, rng)
    _draw_class(cv, label)
    if truth is not None:
        truth.update(cv.truth)
    # Field stars (point sources) and small, faint background galaxies.
    for _ in range(rng.poisson(0.8)):
        star = np.zeros((size, size), dtype=np.float32)
        star[tuple(rng.integers(0, size, 2))] = 1.0  # a point source; the PSF gives it its shape
        cv.add(star, 10 ** rng.uniform(3.0, 4.6),
               cv.color(_RED * rng.random() + _BLUE * rng.random(), 0.1))
    for _ in range(rng.poisson(0.6)):
        gx, gy = rng.uniform(-46, 46, 2)
        _disk_galaxy(cv, gx, gy, 10 ** rng.uniform(3.0, 4.0), rng.uniform(1.0, 2.5))
    # PSF: FWHM 4-6 px at 0.262"/px.
    flux = _gaussian_blur(cv.flux, rng.uniform(4.0, 6.0) / 2.3548 * cv.scale)
    # Sky + photon noise (gain 1): variance = sky + signal, per band.
    sky_sigma = rng.uniform(4.0, 9.0)
    noise = rng.normal(0.0, 1.0, flux.shape).astype(np.float32)
    flux = flux + noise * np.sqrt(sky_sigma**2 + np.clip(flux, 0, None))
    return flux, float(sky_sigma), rng


SPLITS = ("train", "val", "test")


def write_survey_files(folder: str | Path, n_per_class: int, image_size: int = 96, seed: int = 0,
                       splits: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> Path:
    """The simulated galaxies as a survey would deliver them, for comparing FITS stretches with
    the 8-bit images on the same sources: per galaxy a FITS cube of its fluxes (bands z, r, g,
    float32, on a sky level of 100-1000 counts that the stretch has to find) and the 8-bit PNG
    that :func:`render` makes of the same fluxes, plus ``catalog.csv`` (objid, label, split).
    Returns the catalog's path."""
    # deferred: astropy.io.fits is slow to import and only needed here
    from astropy.io import fits
    from PIL import Image

    folder = Path(folder)
    (folder / "fits").mkdir(parents=True, exist_ok=True)
    (folder / "png").mkdir(parents=True, exist_ok=True)
    total = n_per_class * len(CLASS_NAMES)
    order = np.random.default_rng([seed, total]).permutation(total)
    bounds = np.cumsum(np.asarray(splits) / sum(splits)) * total
    lines = ["objid,label,split"]
    for rank, i in enumerate(order):
        label = int(i % len(CLASS_NAMES))
        flux, _, _ = render_flux(label, seed, int(i), image_size)
        sky = np.random.default_rng([seed, int(i), 1]).uniform(100.0, 1000.0, (3, 1, 1))
        name = f"obj{int(i):06d}"
        fits.PrimaryHDU((flux + sky).astype(np.float32)).writeto(folder / "fits" / f"{name}.fits",
                                                                 overwrite=True)
        Image.fromarray(render(label, seed, int(i), image_size)).save(folder / "png" / f"{name}.png")
        split = SPLITS[int(np.searchsorted(bounds, rank, side="right"))]
        lines.append(f"{name},{CLASS_NAMES[label]},{split}")
    (folder / "catalog.csv").write_text("\n".join(lines) + "\n")
    return folder / "catalog.csv"


def simulate(n_per_class: int, image_size: int = 96, seed: int = 0,
             start: int = 0, stop: int | None = None, votes: bool = False
             ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images ``start:stop`` of the balanced set (row i has label i mod 7): uint8 NHWC and labels;
    with ``votes``, also simulated volunteers' vote counts for the GZ DECaLS DR5 tree
    (:func:`~.volunteers.simulate_votes`; the images are the same either way)."""
    total = n_per_class * len(CLASS_NAMES)
    stop = total if stop is None else min(stop, total)
    index = np.arange(start, stop)
    labels = (index % len(CLASS_NAMES)).astype(np.int64)
    images = np.empty((len(index), image_size, image_size, 3), dtype=np.uint8)
    counts = np.empty((len(index), VOLUNTEER_TREE.num_answers), dtype=np.float32)
    for row, (i, label) in enumerate(zip(index, labels)):
        truth: dict[str, Any] = {}
        images[row] = render(int(label), seed, int(i), image_size, truth)
        if votes:  # their own generator: the votes never change the pixels
            counts[row] = simulate_votes(truth, np.random.default_rng([seed, int(i), 1]))
    return (images, labels, counts) if votes else (images, labels)


class SyntheticGalaxies:
    """Data source: simulate the 7-class set once per parameter set and cache it as a prepared file.

    ``tree="gz_decals_dr5"`` adds simulated volunteers' vote counts for every question of that
    Galaxy Zoo tree (the ``votes`` column; :mod:`.volunteers`), the same images either way."""

    def __init__(self, n_per_class: int = 1800, image_size: int = 96, seed: int = 0,
                 filename: str | None = None, tree: str | None = None) -> None:
        if tree not in (None, VOLUNTEER_TREE.name):
            raise ConfigError(f"tree={tree!r}: the simulated volunteers answer the "
                              f"{VOLUNTEER_TREE.name} tree; set tree={VOLUNTEER_TREE.name} or null")
        self.n_per_class = n_per_class
        self.image_size = image_size
        self.seed = seed
        self.tree = tree
        votes = "_votes" if tree else ""
        self.filename = filename or \
            f"synthetic_galaxies_n{n_per_class}_s{image_size}_seed{seed}{votes}.h5"

    @property
    def provenance(self) -> dict[str, Any]:
        return {"source": "synthetic", "simulator_version": SIMULATOR_VERSION,
                "n_per_class": self.n_per_class, "image_size": self.image_size, "seed": self.seed,
                **({"tree": self.tree} if self.tree else {})}

    def prepare(self, data_dir: str | Path, progress: bool = True) -> Path:
        """Return the prepared file under ``data_dir``, simulating it first if needed."""
        return prepare_once(Path(data_dir) / self.filename, self.provenance,
                            lambda path: self._simulate(path, progress))

    def _simulate(self, path: Path, progress: bool) -> None:
        total = self.n_per_class * len(CLASS_NAMES)
        chunk = 700
        votes = self.tree is not None
        spec = InputSpec(class_names=tuple(CLASS_NAMES), channels=3, image_size=self.image_size,
                         tree=VOLUNTEER_TREE.to_dict() if votes else None)
        # every image has its own generator ([seed, index]): chunks simulated in parallel
        # processes are the same pixels as in one, written in order
        chunks = [(self.n_per_class, self.image_size, self.seed, start, start + chunk, votes)
                  for start in range(0, total, chunk)]
        workers = min(os.cpu_count() or 1, len(chunks))
        with PreparedWriter(path, total, spec, self.provenance,
                            ("votes",) if votes else ()) as writer, \
                console.progress(total=total, desc=f"simulating {path.name}", unit="img",
                                 enabled=progress) as bar:
            results = (ordered_map(simulate, chunks, workers) if workers > 1
                       else (simulate(*c) for c in chunks))
            for images, labels, *counts in results:
                writer.write(images, labels, **({"votes": counts[0]} if votes else {}))
                bar.update(len(labels))


def main(argv: list[str] | None = None) -> None:
    """``python -m galaxy_lightning.data.synthetic --out grid.png``: look at the simulator."""
    # deferred: plots imports matplotlib, which the data source itself never needs
    from galaxy_lightning.plots import image_grid_figure

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", default="synthetic_examples.png", help="PNG to write")
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--survey-files", metavar="FOLDER",
                        help="instead of a picture: write --per-class galaxies per class as FITS "
                             "cubes (fits/), as 8-bit PNGs (png/) and catalog.csv into FOLDER")
    args = parser.parse_args(argv)
    if args.survey_files:
        catalog = write_survey_files(args.survey_files, args.per_class, args.size, args.seed)
        print(f"wrote {catalog} and {args.per_class * len(CLASS_NAMES)} galaxies as FITS and PNG")
        return
    t0 = time.perf_counter()
    images, labels = simulate(args.per_class, args.size, args.seed)
    elapsed = time.perf_counter() - t0
    fig = image_grid_figure(images, labels, CLASS_NAMES, per_class=args.per_class)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}: {len(labels)} images in {elapsed:.2f} s "
          f"({1e3 * elapsed / len(labels):.2f} ms/image)")


if __name__ == "__main__":
    main()
