"""dymu_lightning: DyMU (dynamic token merging and virtual token unmerging) for vision-language models."""

__version__ = "0.1.0"
