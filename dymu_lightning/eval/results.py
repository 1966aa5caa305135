"""``python -m dymu_lightning results``: the entry points, kept here for the command table and old imports.

Running the studies is :mod:`~dymu_lightning.eval.studies`; rendering docs/results.md from their
record is :mod:`~dymu_lightning.eval.page`; the files they share are :mod:`~dymu_lightning.eval.schema`.
"""

from __future__ import annotations

from dymu_lightning.eval.page import SECTIONS, Collected, render
from dymu_lightning.eval.schema import RECORD
from dymu_lightning.eval.studies import STUDIES, Setting, generate, ieee_float32, main

__all__ = ["RECORD", "SECTIONS", "STUDIES", "Collected", "Setting", "generate", "ieee_float32", "main", "render"]
