"""The store the settings name: the one place that knows every store implementation, so that the
stores themselves import nothing of each other."""

from __future__ import annotations

from app.registry.guard import GuardedStore
from app.registry.store import LocalFolderStore, MemoryStore
from app.settings import Settings


def open_store(settings: Settings) -> MemoryStore:
    """The store the settings name, the local folder (default) or an S3-compatible bucket, with every
    call bounded by `store_timeout_s` (app/registry/guard.py)."""
    store: MemoryStore
    if settings.store == "s3":
        from app.registry.s3store import S3Store  # boto3 is imported only where it is used

        store = S3Store.from_settings(settings)
    else:
        store = LocalFolderStore(settings.memory_dir)
    return GuardedStore(store, settings.store_call_timeout_s)
