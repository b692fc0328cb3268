"""Which database owns which model store, checked at every start before anything in the store is touched.

The store's root holds `.miaas-store.json` with a random store id; the owning database records the same id
(table `store_owner`). A registry starts only when the two agree. The first start on an empty store with an empty
database claims the store (marker first, then the row). Everything else that does not add up is refused with a
message that says what to do, and changes nothing: a fresh database never takes a populated store for leftovers
(a relative SQLite path and another working folder are enough to get one), and a database that owns a store never
takes an unmounted one for a new, empty store.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime

from sqlalchemy.engine import make_url

from miaas.db import sqlite_file
from model_registry.storage import MARKER, ModelStorage, StoreMarker
from model_registry.store import Store, StoreOwner

log = logging.getLogger(__name__)

ADOPT = "python -m model_registry adopt-store"


class StoreRefused(RuntimeError):
    """The registry must not run on this database and this store; the message says why and what to do."""


def new_store_id() -> str:
    return "s-" + uuid.uuid4().hex


def describe_database(url: str) -> str:
    """The database URL without its password; a SQLite file also as an absolute path (a relative one depends on
    the working folder)."""
    shown = make_url(url).render_as_string(hide_password=True)
    path = sqlite_file(url)
    return f"{shown} (the file {path.absolute()})" if path is not None and not path.is_absolute() else shown


def secure_store(storage: ModelStorage, store: Store, database_url: str, at: datetime) -> str:
    """Check that this database owns this store, claiming a new store on the very first start; returns the store
    id. Raises `StoreRefused` (nothing changed) when they do not belong together."""
    root, db = storage.root, describe_database(database_url)
    try:
        marker = storage.read_marker()
    except ValueError as exc:
        raise StoreRefused(str(exc)) from exc
    owned = store.owner()
    if marker is not None and owned is not None:
        if marker.store_id != owned.store_id:
            raise StoreRefused(
                f"the model store {root} belongs to another database: its {MARKER} names store {marker.store_id}"
                f"{_claimed_by(marker)}, while this database ({db}) owns store {owned.store_id}{_claimed(owned)}. "
                "Nothing was changed. Point MODEL_STORE and MODEL_REGISTRY_DATABASE_URL at a store and the database "
                "that owns it."
            )
        return owned.store_id
    records = store.has_records()
    holdings = storage.holdings()
    if marker is not None:  # a store of another database, met by one that owns none
        if not records:
            raise StoreRefused(
                f"the database {db} is empty and owns no model store, but {root} is the store {marker.store_id} of "
                f"another database{_claimed_by(marker)}. Nothing was changed. If MODEL_REGISTRY_DATABASE_URL is "
                "wrong (a relative SQLite path read from another working folder is enough), correct it; if that "
                f"database is lost, rebuild this one from the store with `{ADOPT}` (same settings), then start again."
            )
        raise StoreRefused(
            f"the database {db} records models but owns no model store, and {root} is the store {marker.store_id} "
            f"of another database{_claimed_by(marker)}. Nothing was changed. Point MODEL_STORE at this database's "
            "store, or MODEL_REGISTRY_DATABASE_URL at that store's database."
        )
    if owned is not None:  # the store this database owns has lost its marker
        if not holdings:
            raise StoreRefused(
                f"the model store {root} seems not mounted: it has no {MARKER} and no versions, but this database "
                f"({db}) owns store {owned.store_id}{_claimed(owned)}. Nothing was created. Mount the store (or "
                "correct MODEL_STORE) and start again; if that store is lost for good, start on a new, empty database."
            )
        raise StoreRefused(
            f"the model store {root} holds versions ({_some(holdings)}) but no {MARKER}, while this database ({db}) "
            f"owns store {owned.store_id}{_claimed(owned)}. Nothing was changed. If this is that store and its marker "
            f"was lost, put it back: {root / MARKER} holding "
            f'{{"store_id": "{owned.store_id}", "created_at": "{owned.claimed_at.isoformat()}"}}; '
            "otherwise point MODEL_STORE at this database's store."
        )
    if not records and holdings:
        raise StoreRefused(
            f"the database {db} is empty, but the model store {root} holds versions ({_some(holdings)}) and no "
            f"{MARKER}. Nothing was changed: nothing was moved or deleted. If MODEL_REGISTRY_DATABASE_URL is wrong "
            "(a relative SQLite path read from another working folder is enough), correct it; to rebuild this "
            f"database from the store, run `{ADOPT}` (same settings), then start again."
        )
    if records and not holdings:
        raise StoreRefused(
            f"the model store {root} seems not mounted: it is empty, but the database {db} records models. Nothing "
            "was created. Mount the store (or correct MODEL_STORE) and start again."
        )
    if records:  # a database and a store from before ownership markers: they must share versions
        recorded = store.all_versions()
        if not any(storage.version_dir(m, v).is_dir() for m, v in recorded):
            raise StoreRefused(
                f"the database {db} and the model store {root} do not belong together: none of the database's "
                f"{len(recorded)} versions is in the store, which holds {_some(holdings)}. Nothing was changed. "
                "Point MODEL_STORE and MODEL_REGISTRY_DATABASE_URL at a store and its database."
            )
        log.warning("the model store %s has no %s yet: claiming it for %s, which records versions found in it",
                    root, MARKER, db)
    return _claim(storage, store, database_url, at)


def _claim(storage: ModelStorage, store: Store, database_url: str, at: datetime) -> str:
    """Marker first, then the row: a marker whose row could not be written is taken back."""
    marker = StoreMarker(store_id=new_store_id(), created_at=at,
                         database=make_url(database_url).render_as_string(hide_password=True))
    try:
        storage.write_marker(marker)
    except FileExistsError as exc:
        raise StoreRefused(f"another process claimed the model store {storage.root} at the same time; "
                           "only one registry may use a store") from exc
    try:
        store.claim(marker.store_id, str(storage.root), at)
    except BaseException:
        storage.remove_marker(marker)
        raise
    log.info("claimed the model store %s as %s for %s", storage.root, marker.store_id,
             describe_database(database_url))
    return marker.store_id


def _claimed(owned: StoreOwner) -> str:
    return f" (claimed at {owned.root} on {owned.claimed_at:%Y-%m-%d %H:%M} UTC)"


def _claimed_by(marker: StoreMarker) -> str:
    return f" (claimed on {marker.created_at:%Y-%m-%d %H:%M} UTC by {marker.database or 'an unnamed database'})"


def _some(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
