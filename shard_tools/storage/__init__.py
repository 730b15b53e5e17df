"""Remote I/O for pack outputs: the one module that talks to object storage, through fsspec only.

Any fsspec URL works (``s3://`` through s3fs, ``http(s)://`` through fsspec's HTTP filesystem, ``file://``,
``memory://``, ``gs://`` with gcsfs installed, ...), and so does a plain local path. Credentials and the
endpoint come the usual way (for S3: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``,
``AWS_PROFILE``, ``~/.aws``) or from ``--storage-options`` JSON, passed to the fsspec filesystem as keyword
arguments (e.g. ``{"endpoint_url": "http://127.0.0.1:9000", "anon": true}``). Three keys of that JSON are
ours, not fsspec's: ``connect_timeout`` and ``read_timeout`` (seconds) and ``attempts`` (tries per request),
applied to s3fs (botocore ``config_kwargs``) and HTTP (aiohttp ``ClientTimeout``), so nothing hangs.

Every failure is raised as one :class:`StorageError` naming the URL and what to do; no botocore or aiohttp
exception leaves this module. Writes never let a half-written object look whole: on object stores a PUT
is atomic per object; elsewhere a temp name is written and then moved; ``upload_folder`` writes the
manifest last, so a remote folder without one still reads as incomplete.
"""
from shard_tools.storage.core import (ATTEMPTS, CONNECT_TIMEOUT_S, READ_TIMEOUT_S, TRANSIENT, PathLike, StorageError,
                                      attempts_of, backoff_s, filesystem, join, option_names, parse_storage_options,
                                      protocol_of, redacted, retried)
from shard_tools.storage.objects import (create_exclusive, download_verified, exists, list_names, list_tree,
                                         local_copy, open_url, read_bytes, read_json, remove_object, remove_pack, size,
                                         upload_file, upload_folder, write_bytes)

__all__ = ["ATTEMPTS", "CONNECT_TIMEOUT_S", "READ_TIMEOUT_S", "TRANSIENT", "PathLike", "StorageError", "attempts_of",
           "backoff_s", "create_exclusive", "download_verified", "exists", "filesystem", "join", "list_names", "list_tree",
           "local_copy", "open_url", "option_names", "parse_storage_options", "protocol_of", "read_bytes", "read_json", "remove_object",
           "redacted", "remove_pack", "retried", "size", "upload_file", "upload_folder", "write_bytes"]
