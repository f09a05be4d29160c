"""Upgrading from the previous, TinyDB-based version: the `documents.json` it leaves after a clean
stop, read once into the SQLite store at its first start (see SQLiteStore._migrate). Nothing
else reads these files; this module goes once no such data directory is left."""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
from datetime import datetime
from pathlib import Path

from pydantic import ValidationError

from models import Document, DocumentCreate, as_stored, millis
from sqlite_files import open_own, read_own
from storage import IDEMPOTENCY_TTL, StoreCorrupt, StoreUnavailable

LEGACY_FILE = "documents.json"
LEGACY_JOURNAL = "documents.journal"  # changes a killed process had not folded into the file
LEGACY_LOCK = "documents.lock"  # held by the previous version for as long as it serves

# Marks a fingerprint carried over: the previous version's hashed the metadata in the order sent.
LEGACY_PRINT = "unordered:"

# Its documents, its unexpired idempotency keys, and the digest of the file they were read from.
Legacy = tuple[list[Document], list[tuple[str, str, str, str, int]], bytes]


def previous_version_locked_out(data_dir: Path) -> int | None:
    """A shared hold on the previous version's lock file, kept while this store is open: that
    version takes it exclusively for as long as it serves, so neither serves beside the other.
    Without the file (that version never ran here) nothing is held, and nothing is made."""
    if (fd := open_own(data_dir / LEGACY_LOCK)) is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreUnavailable(
            f"the previous version is serving from {data_dir}: stop it cleanly, then start this one"
        ) from None
    return fd


def left_beside(data_dir: Path) -> Path | None:
    """The previous version's file or unfolded journal found beside this store's database (that
    version run again since the upgrade): data no version here reads."""
    if os.path.lexists(path := data_dir / LEGACY_FILE):
        return path
    return data_dir / LEGACY_JOURNAL if read_own(data_dir / LEGACY_JOURNAL, 1) else None


def read_legacy(data_dir: Path, now: datetime, *, task: bool) -> Legacy | None:
    """The documents and unexpired idempotency keys of `documents.json`, refused as the previous
    version refused them; None without one. Only a service carries them over, never a `task`."""
    journal, path = data_dir / LEGACY_JOURNAL, data_dir / LEGACY_FILE
    if read_own(journal, 1):  # a byte tells: none is read whole before it is needed
        raise StoreCorrupt(
            journal,
            "it holds changes not yet folded into documents.json; start the previous version "
            "once and stop it cleanly, then start this one",
        )
    if task:  # the file is not read: whether there is one is enough
        if read_own(path, 0) is not None:
            raise StoreUnavailable(
                f"{path} is the previous version's: start this version's service"
            )
        return None
    if (raw := read_own(path)) is None:
        return None
    try:
        # Numbers as written (orjson reads one past 64 bits as a float, near enough to pass).
        tables = json.loads(raw)
        if unknown := set(tables) - {"documents", "idempotency"}:
            raise StoreCorrupt(path, f"unknown tables {sorted(unknown)[:5]}")
        docs: dict[str, Document] = {}
        for record in tables.get("documents", {}).values():
            doc = Document.model_validate(record)
            # As `main.py import` takes a document, and kept as it is: what the previous
            # version stored is in those forms, times in UTC (which a time's equality, by the
            # instant, does not see). It took some values this one refuses (any float).
            try:
                stored = as_stored(doc)
            except ValueError as exc:
                raise StoreCorrupt(
                    path,
                    f"document {doc.id!r}: {_reason(exc)}; if the previous version took it, "
                    "change it through that version's API, stop it cleanly, then start this one",
                ) from None
            if stored != doc or doc.created_at.utcoffset() or doc.updated_at.utcoffset():
                raise StoreCorrupt(path, f"document {doc.id!r} is not in the forms the API stores")
            if docs.setdefault(doc.id, doc) is not doc:
                raise StoreCorrupt(path, f"two records have the id {doc.id!r}")
        keys: dict[tuple[str, str], tuple[str, str, str, str, int]] = {}
        for record in tables.get("idempotency", {}).values():
            at = datetime.fromisoformat(record["created_at"])
            if now - at < IDEMPOTENCY_TTL:
                fields = ("scope", "key", "fingerprint", "document_id")
                scope, name, printed, doc_id = (str(record[f]) for f in fields)
                entry = (scope, name, LEGACY_PRINT + printed, doc_id, millis(at))
                if keys.setdefault((scope, name), entry) is not entry:
                    raise StoreCorrupt(path, f"two records have the idempotency key {name!r}")
    except ValidationError as exc:
        raise StoreCorrupt(
            path, f"not a database the previous version wrote: {_reason(exc)}"
        ) from None
    except (ValueError, TypeError, AttributeError, KeyError, RecursionError) as exc:
        raise StoreCorrupt(path, f"not a database the previous version wrote: {exc}") from exc
    return list(docs.values()), list(keys.values()), hashlib.sha256(raw).digest()


def _reason(exc: ValueError) -> str:
    """A validation error named by its field: its message would repeat the value."""
    if not isinstance(exc, ValidationError):
        return str(exc)
    first = exc.errors()[0]
    return f"{'.'.join(map(str, first['loc']))}: {first['msg']}"


def same_body(stored: str, data: DocumentCreate) -> bool:
    """Whether a fingerprint carried over from the previous version is that of `data` sent again
    as it was (its metadata in the same order)."""
    if not stored.startswith(LEGACY_PRINT):
        return False
    return stored == LEGACY_PRINT + hashlib.sha256(data.model_dump_json().encode()).hexdigest()


def imported_already(path: Path, digest: bytes | None) -> bool:
    """Whether `path` is the very file whose import the database records by `digest`: a start
    killed after the import's commit, before it set the file aside."""
    if path.name != LEGACY_FILE or (fd := open_own(path)) is None:
        return False
    with open(fd, "rb") as file:  # a piece at a time: the file may be of any size
        return digest == hashlib.file_digest(file, "sha256").digest()


def mark_imported(data_dir: Path) -> None:
    """Kept byte for byte, under a name no version reads again nor an earlier import took (a
    database made again from another copy): `.imported`, then `.imported.2`, ..."""
    for n in itertools.count(1):
        kept = data_dir / f"{LEGACY_FILE}.imported{f'.{n}' if n > 1 else ''}"
        if not os.path.lexists(kept):  # no other start runs meanwhile: it holds the start lock
            (data_dir / LEGACY_FILE).rename(kept)
            return
