"""Checkpoints: read one safely, load its classifier for inference, and read older formats.

A checkpoint is Lightning's dict (``state_dict``, ``hyper_parameters``, optimizer and loop
states) plus ``galaxy_lightning``: ``{"format": 2, "inference": {...}}``, the format version and
the inference options the run used (the defaults of evaluation and prediction).

Format 1 (written before the input spec existed) still loads for evaluation, prediction, export
and ``train=false``: its loose hyperparameters (``in_channels``, ``image_size``, ``crop``,
``resize``, ``scale``, ``class_names``, ``tta``, the old augmentation keys) are translated on
load. Resuming *training* from a format-1 checkpoint is refused: start a new run.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from galaxy_lightning.errors import CheckpointError
from galaxy_lightning.files import atomic_file
from galaxy_lightning.input_spec import InputSpec
from galaxy_lightning.module import CHECKPOINT_FORMAT, GalaxyClassifier


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict (on the CPU, ``weights_only``), or a one-line error for a file that is
    missing, unreadable, or not a galaxy_lightning checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; pass a .ckpt file from a run's "
                              "checkpoints/ folder")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, pickle.UnpicklingError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt: "
                              f"{first[:200]}); use another checkpoint of the run") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint \
            or "model" not in checkpoint.get("hyper_parameters", {}):
        raise CheckpointError(f"{path}: not a galaxy_lightning checkpoint (no model "
                              "hyperparameters); pass a .ckpt file written by galaxy-train")
    return checkpoint


def checkpoint_format(checkpoint: dict[str, Any]) -> int:
    return int(checkpoint.get("galaxy_lightning", {}).get("format", 1))


def _augment_of_version_1(data: dict[str, Any]) -> dict[str, Any]:
    """Format 1's ``augment``/``rotate``/``max_shift``/``scale`` data keys -> ``augment`` list."""
    data = dict(data)
    names = ["dihedral"] if data.pop("augment", "none") == "dihedral" else []
    if data.pop("rotate", False):
        names.append("rotate")
    shift = float(data.pop("max_shift", 0.0) or 0.0)
    if shift > 0:
        names.append("shift")
        data["max_shift"] = shift
    data.pop("scale", None)
    data["augment"] = names
    return data


def upgrade_hyperparameters(hparams: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Format-1 hyperparameters -> (the current constructor's arguments, inference options)."""
    spec = InputSpec(class_names=tuple(hparams["class_names"]), channels=int(hparams["in_channels"]),
                     image_size=int(hparams["image_size"]), crop=hparams.get("crop"),
                     resize=hparams.get("resize"), scale=float(hparams.get("scale", 1 / 256)))
    scheduler = hparams.get("scheduler")
    if scheduler:
        scheduler = {k: v for k, v in scheduler.items() if k != "_partial_"}
    data = hparams.get("data")
    upgraded = {"model": hparams["model"], "input_spec": spec.to_dict(),
                "optimizer": hparams["optimizer"], "scheduler": scheduler or None,
                "label_smoothing": float(hparams.get("label_smoothing", 0.0)),
                "data": _augment_of_version_1(data) if data else None}
    return upgraded, {"tta": bool(hparams.get("tta", False))}


def load_classifier(path: str | Path) -> GalaxyClassifier:
    """The classifier of a checkpoint, on the CPU, in eval mode, with the inference options the
    run used (change them with :meth:`GalaxyClassifier.set_inference`)."""
    checkpoint = read_checkpoint(path)
    version = checkpoint_format(checkpoint)
    if version > CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {version} is newer than this "
                              f"galaxy_lightning reads ({CHECKPOINT_FORMAT}); upgrade galaxy_lightning")
    hparams = dict(checkpoint["hyper_parameters"])
    if version == 1:
        hparams, inference = upgrade_hyperparameters(hparams)
    else:
        inference = checkpoint["galaxy_lightning"].get("inference", {})
    module = GalaxyClassifier(**hparams)
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    module.weights_from = str(path)
    return module.set_inference(**inference).eval()


def read_resumable(path: str | Path, resuming: bool = True) -> dict[str, Any]:
    """:func:`read_checkpoint` for the checkpoint a run resumes (or, ``resuming=False``, tests):
    an unreadable one is refused with the newest readable checkpoint beside it named, so the
    user knows what to pass; resuming also needs the current format (format 1 laid out the
    optimizer and loop states differently)."""
    path = Path(path)
    try:
        checkpoint = read_checkpoint(path)
    except CheckpointError as err:
        good = newest_readable(path.parent, exclude=path) if path.parent.is_dir() else None
        hint = f"; the newest readable checkpoint there is {good}: ckpt_path={good}" if good else ""
        raise CheckpointError(f"{err}{hint}") from None
    if resuming and checkpoint_format(checkpoint) < CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: written by an older galaxy_lightning (checkpoint format "
                              f"{checkpoint_format(checkpoint)}); it can be evaluated, exported, "
                              "predicted with and tested (train=false), but not resumed: start a "
                              "new run")
    return checkpoint


def _check_same(path: str | Path, checkpoint: dict[str, Any], key: str, what: str, now: Any) -> None:
    saved = checkpoint["hyper_parameters"].get(key)
    if checkpoint_format(checkpoint) >= CHECKPOINT_FORMAT and saved != now:
        raise CheckpointError(f"{path} was trained with another {what}: {saved} vs now {now}; use "
                              "the run's own config (its .hydra/overrides.yaml), or start a new run")


def check_model_of_checkpoint(path: str | Path, checkpoint: dict[str, Any], model: Any,
                              task: dict[str, Any] | None = None) -> None:
    """The checkpoint holds the network the run's model and task configs describe (checked
    before any data is prepared: a mismatch needs no data to be found). Only the task's name
    decides the network's outputs (its other keys may change between runs)."""
    _check_same(path, checkpoint, "model", "model", model)
    saved = (checkpoint["hyper_parameters"].get("task") or {}).get("name", "classification")
    now = (task or {}).get("name", "classification")
    if saved != now:
        raise CheckpointError(f"{path} was trained with task={saved}, not task={now}; use the "
                              "run's own config (its .hydra/overrides.yaml), or start a new run")


def check_data_of_checkpoint(path: str | Path, checkpoint: dict[str, Any],
                             input_spec: dict[str, Any]) -> None:
    """The checkpoint was trained for the run's data: the same classes, channels, image size and
    pixel making (the input spec)."""
    _check_same(path, checkpoint, "input_spec", "data (classes, channels, image size)", input_spec)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file beside the target, flushed to disk, then renamed
    over it: a kill during a save leaves the previous checkpoint intact, never a truncated one.
    (Lightning's own writer assembles the file in the system's temporary folder and moves it, a
    copy when that folder is on another file system.) A full or read-only disk is reported in
    one line naming the folder."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any = None) -> None:
        save_atomically(checkpoint, Path(path))


def _disk_error(err: BaseException) -> OSError | None:
    """The operating system's error behind a failed write: torch's zip writer reports a failed
    ``write`` (a full disk) as a ``RuntimeError`` whose context is the ``OSError``."""
    if isinstance(err, OSError):
        return err
    context = err.__context__
    return context if isinstance(context, OSError) else None


def save_atomically(checkpoint: dict[str, Any], path: Path) -> None:
    """``torch.save`` to ``.<name>.<pid>.tmp`` beside ``path``, flushed to disk, then renamed over
    it (:func:`galaxy_lightning.files.atomic_file`: the temporary file is removed whatever
    happens); leftovers of writers that were killed are removed after a successful save."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as f:
            torch.save(checkpoint, f)
    except BaseException as err:
        disk = _disk_error(err)
        if disk is None:
            raise
        raise CheckpointError(f"cannot write checkpoint {path} ({disk.strerror or disk}); free "
                              "space there or choose another paths.log_dir") from None
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def newest_readable(folder: Path, exclude: Path | None = None) -> Path | None:
    """The most recently written checkpoint in ``folder`` that loads."""
    for candidate in sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True):
        if exclude is not None and candidate.resolve() == exclude.resolve():
            continue
        try:
            read_checkpoint(candidate)
        except CheckpointError:
            continue
        return candidate
    return None


def find_last(log_dir: str | Path, task_name: str) -> Path:
    """``ckpt_path=last``: the newest ``last.ckpt`` of this task's runs (and sweep jobs)."""
    root = Path(log_dir) / task_name
    found = sorted(list(root.glob("runs/*/checkpoints/last.ckpt"))
                   + list(root.glob("multiruns/*/*/checkpoints/last.ckpt")),
                   key=lambda p: p.stat().st_mtime)
    if not found:
        raise CheckpointError(f"ckpt_path=last: no last.ckpt under {root}; give the checkpoint's "
                              "path, or start a new run")
    return found[-1]
