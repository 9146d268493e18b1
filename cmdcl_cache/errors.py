"""The errors a cache command ends with (exit 2), shared by both programs."""

from __future__ import annotations


class CacheError(RuntimeError):
    """A cache file is missing, malformed, or does not match what it is used with."""


class ProvenanceError(CacheError):
    """Two files of one cache (or a cache and a checkpoint) were made with different settings."""


class CacheLockedError(CacheError):
    """Another process is writing this shard."""


class StorageError(CacheError):
    """Writing failed for a reason that is not the video's (disk full, I/O error, read-only file system)."""
