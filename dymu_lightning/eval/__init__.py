"""Measuring DyMU: token counts, feature fidelity, probe accuracy and image complexity.

- :mod:`~dymu_lightning.eval.metrics`: the metrics, on plain tensors (torchmetrics underneath).
- :mod:`~dymu_lightning.eval.run`: the ``eval_encoder`` recipe over webdataset shards.
- :mod:`~dymu_lightning.eval.next_token`: the small LLaVA's next-token fidelity.
- :mod:`~dymu_lightning.eval.studies`: ``python -m dymu_lightning results``, which runs the studies behind
  docs/results.md and records them; :mod:`~dymu_lightning.eval.page` renders the page from that record.
- :mod:`~dymu_lightning.eval.schema`: the JSON files above, as dataclasses their writers and readers share.
"""
