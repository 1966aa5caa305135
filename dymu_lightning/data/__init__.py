"""Webdataset shards with a size index, and deterministic global batches split across ranks and workers.

- :func:`write_shards` / ``python -m dymu_lightning shards``: pack image files into tar shards.
- :func:`read_index`: the size index (``index.json``, or built by scanning existing ``.tar`` shards).
- :class:`GlobalBatchShards`: local batches of one rank, the same global batches whatever the world size.
"""

from dymu_lightning.data.loader import GlobalBatchShards, local_slice, num_steps
from dymu_lightning.data.shards import ShardIndex, ShardInfo, read_index, scan_tar, write_shards

__all__ = [
    "GlobalBatchShards",
    "ShardIndex",
    "ShardInfo",
    "local_slice",
    "num_steps",
    "read_index",
    "scan_tar",
    "write_shards",
]
