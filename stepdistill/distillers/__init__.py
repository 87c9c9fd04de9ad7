"""Distillers: one module per method family, each a :class:`~stepdistill.training.TrainingMethod`.

- :mod:`.distribution_matching`: DMD and DMD2 (``stepdistill distill configs/digits_dmd2.yaml``).
- :mod:`.consistency`: LCM, LCM-LoRA and PCM.
- :mod:`.progressive`: progressive distillation, one stage per halving; :mod:`.reflow`: reflow /
  InstaFlow (both :class:`~.base.StagedDistillation`: several students, one recipe).
- :mod:`.ode_pairs`: teacher ODE couplings (DMD's regression data, reflow's) and straightness.
- :mod:`.student`: few-step students sampled with their exported scheduler (backward simulation), export.
- :mod:`.common`: LoRA on any network, per-sample non-finite filtering.
"""
