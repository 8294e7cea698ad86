"""Lightning callbacks, by what they are for (configs in ``conf/callbacks/`` name them as
``galaxy_lightning.callbacks.<Name>``):

- :mod:`.artifacts`: every figure and ``metrics.json`` (:class:`RunArtifacts`), to files and
  every logger that takes images (through :mod:`galaxy_lightning.loggers`); TensorBoard's chart
  layout (:class:`TensorBoardDashboard`);
- :mod:`.weights`: the weights that are judged: BatchNorm statistics recomputed for them
  (:class:`BatchNormStatistics`), Lightning's moving average of them (:class:`WeightAverage`);
- :mod:`.resume`: exact resumption (:class:`RandomStates`) and graceful stops with SLURM requeue
  (:class:`GracefulStop`);
- :mod:`.progress`: progress bars and lines (:func:`progress_bar`), the benchmark's
  :class:`StepTimer`.
"""

from galaxy_lightning.callbacks.artifacts import RunArtifacts, TensorBoardDashboard, largest_drop
from galaxy_lightning.callbacks.progress import LineProgressBar, StepTimer, progress_bar
from galaxy_lightning.callbacks.resume import BestCheckpoint, GracefulStop, RandomStates, requeue_slurm_job, slurm_job_id
from galaxy_lightning.callbacks.weights import BatchNormStatistics, WeightAverage

__all__ = ["BatchNormStatistics", "BestCheckpoint", "GracefulStop", "LineProgressBar", "RandomStates", "RunArtifacts",
           "StepTimer", "TensorBoardDashboard", "WeightAverage", "largest_drop", "progress_bar",
           "requeue_slurm_job", "slurm_job_id"]
