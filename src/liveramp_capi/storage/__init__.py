"""Where a run's files live: the layout (:mod:`.layout`, plain names) and the folders on object storage."""

from liveramp_capi.storage.folders import (
    OBJECT_BLOCK_BYTES,
    InputFile,
    OutputFolder,
    PartitionNotFound,
    PartitionStorage,
    RefreshFolder,
    StorageUnreachable,
    check_root_reachable,
)

__all__ = [
    "OBJECT_BLOCK_BYTES",
    "InputFile",
    "OutputFolder",
    "PartitionNotFound",
    "PartitionStorage",
    "RefreshFolder",
    "StorageUnreachable",
    "check_root_reachable",
]
