"""Measuring DyMU: token counts, feature fidelity, probe accuracy and image complexity.

- :mod:`~dymu_lightning.eval.metrics`: the metrics, on plain tensors (torchmetrics underneath).
- :mod:`~dymu_lightning.eval.run`: the ``eval_encoder`` recipe over webdataset shards.
- :mod:`~dymu_lightning.eval.results`: ``python -m dymu_lightning results``, which writes docs/results.md.
"""
