"""Post-hoc temperature scaling (Guo et al. 2017): one scalar T that divides the logits.

A network trained to low training loss is over-confident on new images: its top probability
is larger than its accuracy. Dividing the logits by one T > 1, fitted on held-out data by
minimising the negative log-likelihood, fixes most of that without changing any prediction
(the argmax is the same for every T > 0). T is fitted on the validation split with the same
test-time augmentation the model will be used with, stored in the model's ``temperature``
buffer (saved with the weights), and applied by test, evaluation and prediction.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from galaxy_lightning.checkpoints import read_checkpoint, save_atomically
from galaxy_lightning.module import GalaxyClassifier

#: The search range of T: beyond it the model is effectively broken, not miscalibrated.
T_MIN, T_MAX = 0.05, 20.0


def fit_temperature(view_logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 minimising the NLL of ``labels`` under mean_v softmax(logits_v / T), for logits
    of shape (V, N, K) (V views of each image; V = 1 without test-time augmentation).

    The NLL is convex in 1/T for one view; a bounded 1-D search on log T is exact enough and has
    no step size to tune.
    """
    logits = view_logits.double()

    def nll(log_t: torch.Tensor) -> torch.Tensor:
        return F.nll_loss(GalaxyClassifier.combine_views(logits, log_t.exp()), labels)

    lo, hi = torch.tensor(T_MIN).log().double(), torch.tensor(T_MAX).log().double()
    golden = (5 ** 0.5 - 1) / 2
    a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(80):  # golden-section search: the bracket shrinks by 0.618 per step
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - golden * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + golden * (hi - lo)
            fb = nll(b)
    return float(((lo + hi) / 2).exp())


@torch.no_grad()
def calibrate(module: GalaxyClassifier, images: torch.Tensor, labels: torch.Tensor,
              preprocess: torch.nn.Module, batch_size: int = 500) -> float:
    """Fit the module's temperature on uint8 ``images`` with ``labels`` (the validation split),
    with its test-time augmentation setting, and switch calibration on; returns T."""
    was_training = module.training
    module.eval()
    logits = torch.cat([module.view_logits(preprocess(images[i:i + batch_size].to(module.device)),
                                           module.tta).cpu()
                        for i in range(0, len(images), batch_size)], dim=1)
    module.train(was_training)
    temperature = fit_temperature(logits, labels.cpu())
    module.temperature.fill_(temperature)
    module.set_inference(calibrated=True)
    return temperature


def store_in_checkpoint(source: str | Path, module: GalaxyClassifier,
                        target: str | Path | None = None) -> None:
    """Write the module's temperature and inference options into the checkpoint ``source``
    (or into a copy of it at ``target``), atomically."""
    checkpoint = read_checkpoint(source)
    checkpoint["state_dict"]["temperature"] = module.temperature.detach().cpu().clone()
    checkpoint.setdefault("galaxy_lightning", {})["inference"] = module.inference
    save_atomically(checkpoint, Path(target if target is not None else source))
