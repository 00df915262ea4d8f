"""Storage on URIs (``file://``, bare paths, ``s3://``) through ``pyarrow.fs``: atomic objects, versioned
Parquet datasets with a manifest committed last, and checkpoint directories.

Example::

    from jf_ray.storage import DatasetWriter, VersionedSchema, read_dataset
    writer = DatasetWriter("s3://bucket/run1/trajectories", TRAJECTORY_SCHEMA)
    writer.write_shard("shard-00000", table)
    writer.commit({"model_id": "m"})
    table = read_dataset("s3://bucket/run1/trajectories", required_columns=["states"])
"""

from jf_ray.storage.dataset import (
    DatasetError,
    DatasetWriter,
    VersionedSchema,
    check_columns,
    iter_dataset,
    read_dataset,
    read_dataset_rows,
    read_manifest,
)
from jf_ray.storage.dirs import download_dir, upload_dir
from jf_ray.storage.io import (
    StorageWriteError,
    delete_file,
    delete_tree,
    list_files,
    read_bytes,
    read_json,
    read_table,
    write_bytes_atomic,
    write_json_atomic,
    write_table_atomic,
)
from jf_ray.storage.preflight import check_writable, check_writable_file
from jf_ray.storage.retry import StorageUnavailable, retry_count, retry_counts
from jf_ray.storage.uri import exists, fs_and_path, is_local, join_uri, local_path

__all__ = [
    "DatasetError",
    "DatasetWriter",
    "StorageUnavailable",
    "StorageWriteError",
    "VersionedSchema",
    "check_columns",
    "check_writable",
    "check_writable_file",
    "delete_file",
    "delete_tree",
    "download_dir",
    "exists",
    "fs_and_path",
    "is_local",
    "iter_dataset",
    "join_uri",
    "list_files",
    "local_path",
    "read_bytes",
    "read_dataset",
    "read_dataset_rows",
    "read_json",
    "read_manifest",
    "read_table",
    "retry_count",
    "retry_counts",
    "upload_dir",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_table_atomic",
]
