"""Distillers: one module per method family, each a :class:`~stepdistill.training.TrainingMethod`.

- :mod:`.distribution_matching`: DMD and DMD2 (``stepdistill distill configs/digits_dmd2.yaml``).
- :mod:`.student`: few-step students sampled with their exported scheduler (backward simulation), export.
- :mod:`.common`: LoRA on any network, the NaN guard.
"""
