"""Training signals: the loss, gradient-sign stability, and their reduction across ranks.

* :func:`resolve_loss` finds the loss in whatever a model returns (tensor, dict, ``ModelOutput``).
* :class:`GradientSignTracker` measures the fraction of gradient elements whose sign held since
  the previous step, at 1 byte per tracked element and one device sync per step.
* :func:`reduce_signal` averages a float over distributed ranks. The trainer reduces the step's
  loss and the stability with it before they reach the phase controller, so every rank makes the
  same decision on the same step.
"""

from gearshift.signals.distributed import reduce_signal
from gearshift.signals.loss import LOSS_KEYS, LossNotFoundWarning, resolve_loss
from gearshift.signals.sign_tracker import GradientSignTracker

__all__ = [
    "LOSS_KEYS",
    "GradientSignTracker",
    "LossNotFoundWarning",
    "reduce_signal",
    "resolve_loss",
]
