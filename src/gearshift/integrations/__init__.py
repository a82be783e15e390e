"""gearshift's schedules, phase controller and gradient-stability signal inside other trainers.

* :mod:`gearshift.integrations.lightning` — ``configure_lr_scheduler`` for
  ``LightningModule.configure_optimizers``, and the ``PhaseSchedulerCallback`` /
  ``GradientSignCallback`` Lightning callbacks (needs ``pip install 'gearshift[lightning]'``).
* :mod:`gearshift.integrations.transformers` — ``PhaseSchedulerTrainerCallback`` (and the
  optional ``PhaseLossMixin``) for the Hugging Face ``Trainer``.

Nothing is imported here: each submodule imports its framework only when it is imported itself,
so ``import gearshift`` never needs Lightning.
"""

__all__: list[str] = []
