"""Continuing an interrupted Optuna search: the trials that are left, not ``n_trials`` more.

Hydra's Optuna sweeper (hydra-optuna-sweeper 1.2 with optuna 2.10) loads a stored study but then
asks it for ``n_trials`` new trials, and a trial whose process was killed stays RUNNING in the
storage for ever (the sweeper tells a trial's result only when its job returns). A sweeper
subclass cannot change that from this package: Hydra instantiates sweepers only from modules of
the ``hydra_plugins`` namespace package. :class:`ResumeStudy` is a Hydra callback instead, which
``conf/hparams_search/optuna.yaml`` registers: Hydra calls ``on_multirun_start`` before it builds
the sweeper from the same config object, so the callback can mark the stale trials FAIL and lower
``hydra.sweeper.n_trials`` to the trials still to run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, read_write

from galaxy_lightning.errors import ConfigError, cli_boundary

log = logging.getLogger(__name__)

SQLITE = "sqlite:///"


class ResumeStudy(Callback):
    """Hydra callback: before an Optuna search starts, fail the trials an interrupted launch left
    RUNNING and run only ``n_trials`` minus the COMPLETE trials of the stored study.

    ``n_trials`` is thus the size of the whole search: the same command continues it, a larger
    ``hydra.sweeper.n_trials`` extends it, and a finished search runs nothing. FAIL trials do not
    count, so they are replaced. Any RUNNING trial counts as interrupted: run one launch at a time
    per study. A seeded sampler's seed is offset by the number of trials so far, so that a
    continuation does not repeat the first launch's random startup trials.
    """

    @cli_boundary  # Hydra calls this outside galaxy-train's boundary: a config error is one line
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweeper = config.hydra.sweeper
        storage, name = sweeper.get("storage"), sweeper.get("study_name")
        if storage is None or "n_trials" not in sweeper:
            return  # in memory, or not an Optuna sweeper: nothing survives a launch
        if name is None:
            raise ConfigError(f"hydra.sweeper.storage={storage} needs a hydra.sweeper.study_name "
                              "to continue a search (null makes a new study each launch)")
        study = _stored_study(str(storage), str(name))
        if study is None:
            return
        import optuna

        running = optuna.trial.TrialState.RUNNING
        stale = [t.number for t in study.get_trials(deepcopy=False, states=(running,))]
        for number in stale:
            study.tell(number, state=optuna.trial.TrialState.FAIL)
        done = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
        left = max(0, int(sweeper.n_trials) - done)
        log.info(f"Optuna study {name}: {done} of {sweeper.n_trials} trials complete, "
                 f"{len(stale)} interrupted (marked FAIL: {stale}); running {left} more"
                 + ("" if left else " (raise hydra.sweeper.n_trials to extend the search)"))
        with read_write(sweeper):
            sweeper.n_trials = left
            if sweeper.get("sampler") is not None and sweeper.sampler.get("seed") is not None:
                # a sampler restarted from its seed would replay the first launch's random
                # startup trials; offset by the trials so far, still reproducible
                sweeper.sampler.seed = int(sweeper.sampler.seed) + len(study.trials)


def _stored_study(storage: str, name: str) -> Any:
    """The study ``name`` in ``storage``, or None when there is none yet (a sqlite file that does
    not exist is not created here: the sweeper creates it)."""
    import optuna

    if storage.startswith(SQLITE) and not Path(storage[len(SQLITE):]).is_file():
        return None
    try:
        return optuna.load_study(study_name=name, storage=storage,
                                 sampler=optuna.samplers.RandomSampler())
    except KeyError:  # the storage holds other studies only
        return None
