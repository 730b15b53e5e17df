"""The shard format's names, in one place: every producer and reader of pack outputs imports them.

`shard_tools` writes the format, `pipeline` reads it; both take these constants from here.
"""
from __future__ import annotations

MANIFEST = "manifest.json"
"""File name of the manifest, written last: a pack output folder without it is incomplete."""

CLASS_NAMES = ("real", "fake")
"""Class names by label: ``cls`` 0 = real, 1 = fake."""

IMAGE_EXTS = ("jpg", "png", "webp")
"""Image member extensions a sample may have (exactly one of them)."""


def is_remote(path: str) -> bool:
    """True for a URL (``s3://``, ``https://``, ``gs://``, ...) or a webdataset ``pipe:`` command;
    False for a local path (``file://`` URLs count as local only once stripped by the caller)."""
    text = str(path)
    return text.startswith("pipe:") or "://" in text
