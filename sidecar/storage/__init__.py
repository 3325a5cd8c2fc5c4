"""Where bytes live: one small interface (Store) and two homes, the local volume and an object store."""

from sidecar.storage.base import (
    Deleted,
    ObjectExists,
    ObjectInfo,
    ObjectMissing,
    PutResult,
    StorageError,
    Store,
    StoreUnusable,
)
from sidecar.storage.local import LocalStore

__all__ = ["Deleted", "LocalStore", "ObjectExists", "ObjectInfo", "ObjectMissing", "PutResult", "StorageError", "Store", "StoreUnusable"]
