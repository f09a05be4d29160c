"""The database's files as files: what SQLite says too late or not at all about `documents.db`
and the WAL and shared-memory files beside it (another format, truncation, another application's
mark, a damaged WAL header, a process that has it open, a backup put in its place), checked
before SQLite opens it; the file made whole; the lock one starting process holds."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import re
import sqlite3
import stat
import struct
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from storage import StoreCorrupt, StoreUnavailable

log = logging.getLogger("documents.store")

DATABASE_FILE = "documents.db"
OWN_NAMES = "documents."  # how every file the store keeps in DATA_DIR is named
HEADER = b"SQLite format 3\x00"
# The header's application id: a database this store made, and a copy `backup` wrote, which
# keeps its own until its first start (see adopt_backup).
APPLICATION_ID = 1146048340
BACKUP_ID = APPLICATION_ID + 1
# How many generations of the WAL the -shm file may be behind (it is never synced, and the
# kernel writes it back within seconds): a generation ends once every frame is copied.
GENERATIONS_BEHIND = 1 << 16
WAL_MAGIC, WAL_VERSION = 0x377F0682, (3007000).to_bytes(4)  # of a WAL's header (wal.c)


def check_target(target: Path, data_dir: Path) -> None:
    """Refuse a task's output file (a backup, an export) named as one of the store's own in the
    data directory, however the path spells it (`..`, a link to it): written over, the database
    or its WAL had been destroyed, acknowledged writes with it, and a copy named as another of
    them taken for it (a journal to play back, a damage report, the previous version's file);
    or reached through a link to such a name, which export had created (an empty
    `documents.json` then stopped every start)."""
    for path in (target, Path(os.path.realpath(target))):
        try:
            beside = os.path.samefile(path.parent, data_dir)
        except OSError:  # no such directory: writing there fails, with the reason
            continue
        if beside and path.name.startswith(OWN_NAMES):
            raise StoreUnavailable(
                f"{target}: {OWN_NAMES}* names in the data directory are the store's own "
                "files; write to another name"
            )


def is_own(opened: os.stat_result, data_dir: Path) -> bool:
    """Whether an open file is one the store keeps in the data directory, by whatever name or
    link it was reached: export had followed a link to the database and emptied it."""
    try:
        own = [entry for entry in os.scandir(data_dir) if entry.name.startswith(OWN_NAMES)]
    except OSError:  # no data directory: no file of the store's
        return False
    for entry in own:
        with contextlib.suppress(OSError):  # removed meanwhile
            if os.path.samestat(opened, entry.stat(follow_symlinks=False)):
                return True
    return False


def check_file(path: Path) -> bytes | None:
    """The first 100 bytes of `path` (None if it does not exist); raises StoreCorrupt for
    anything but a whole SQLite file of this store's (a directory, a link, a FIFO, a file of
    several names, another format, a truncated database, another application's by its header,
    a rollback journal) before SQLite opens it; SQLiteStore._check_as_found reads the rest
    through SQLite."""
    if (fd := open_own(path)) is None:
        return None
    try:
        status = os.fstat(fd)
        if status.st_nlink > 1:  # SQLite would write through every name (another of its files)
            raise StoreCorrupt(
                path,
                f"{status.st_nlink} names link to it; the store only uses files of one name: "
                "copy it instead of linking it",
            )
        size = status.st_size
        head = os.read(fd, 100)
        # SQLite reads a WAL whose header fails its checks as empty, and drops every write it
        # holds: anything but zeros past the header may be one.
        wal = path.name.endswith("-wal") and not _wal_header_whole(head) and _past_header(fd)
    finally:
        os.close(fd)
    if path.name.endswith("-journal") and size:
        # SQLite would play it back into the database as a transaction cut short: in WAL mode it
        # writes none, so another program's, or a file put here under that name.
        raise StoreCorrupt(
            path,
            "a rollback journal, which this store never writes: if another program was writing "
            "to the database, open it once with the sqlite3 shell to finish, else move it aside",
        )
    # Not while the database is open: its processes may be rewriting that header.
    if wal and not in_use(path.with_name(DATABASE_FILE + "-shm")):
        raise StoreCorrupt(
            path,
            "not a WAL, or its header is damaged: SQLite would drop every write it holds; "
            f"restore a backup, or move it and {DATABASE_FILE}-shm aside to start without them",
        )
    if path.name != DATABASE_FILE:  # SQLite checks the rest of the WAL and shared memory
        return head
    if not head.startswith(HEADER) or len(head) < 100:
        raise StoreCorrupt(path, "not an SQLite database, or truncated")
    page_size = _page_size(int.from_bytes(head[16:18]))
    if page_size < 512 or page_size & (page_size - 1):
        raise StoreCorrupt(path, f"not an SQLite database (a page size of {page_size})")
    pages = int.from_bytes(head[28:32])
    app_id, user_version = owner(head), int.from_bytes(head[60:64])
    # Unmarked (0) with tables but no schema version: another application's, which a migration
    # would make a store of (this store's databases of its first days are unmarked, migrated).
    if app_id not in (0, APPLICATION_ID, BACKUP_ID) or (app_id == 0 == user_version and pages > 1):
        raise StoreCorrupt(path, "an SQLite database of another application")
    # SQLite takes the header's page count on trust only while these two fields agree, which
    # every write of the header since 3.7.0 makes them: else it counts the file's pages, and a
    # truncated database would pass for whole (its header then rewritten to match).
    if head[24:28] != head[92:96]:
        raise StoreCorrupt(path, "its header is damaged (its page count is not valid)")
    # Shorter than its header says is truncation, unless the WAL beside it (its own: not beside
    # a backup) holds every page a checkpoint cut short was writing.
    lost = range(size // page_size + 1, pages + 1)
    if lost and (app_id == BACKUP_ID or not _wal_holds(path, page_size, lost)):
        raise StoreCorrupt(path, f"truncated: {size} of {page_size * pages} bytes")
    return head


def open_own(path: Path) -> int | None:
    """A read-only descriptor of a file the store keeps in DATA_DIR (None if there is none):
    anything but a regular file is refused (a directory, a link, a FIFO, which had held a
    start, or readiness, for ever)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(mode):
        kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
        raise StoreCorrupt(path, f"{kind}; the store only uses regular files it wrote")
    try:
        # Neither blocks on a FIFO nor follows a link put there since the check above.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise StoreUnavailable(f"cannot open {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced since the check above
        os.close(fd)
        raise StoreCorrupt(path, "not a regular file; the store only uses regular files it wrote")
    return fd


def read_own(path: Path, limit: int = -1) -> bytes | None:
    """Up to `limit` bytes (all by default) of a file `open_own` opens; None if there is none."""
    if (fd := open_own(path)) is None:
        return None
    with open(fd, "rb") as file:
        return file.read(limit)


def _page_size(stored: int) -> int:
    return 65536 if stored == 1 else stored  # a 16-bit field holds 65536 as 1


def _wal_header_whole(head: bytes) -> bool:
    """Whether a WAL's first bytes pass the checks SQLite makes of its header: the magic number
    (which gives the checksum's byte order), the format version, a page size, the checksum."""
    magic = int.from_bytes(head[:4])
    page_size = int.from_bytes(head[8:12])
    if len(head) < 32 or magic not in (WAL_MAGIC, WAL_MAGIC + 1) or head[4:8] != WAL_VERSION:
        return False
    if page_size < 512 or page_size > 65536 or page_size & (page_size - 1):
        return False
    return head[24:32] == _checksum(head[:24], magic, b"\0" * 8)


def _checksum(data: bytes, magic: int, before: bytes) -> bytes:
    """SQLite's WAL checksum (wal.c) of `data`, continuing `before`: two running sums over its
    32-bit words, read in the byte order the WAL's magic number names."""
    first, second = int.from_bytes(before[:4]), int.from_bytes(before[4:])
    words = iter(struct.unpack(f"{'>' if magic & 1 else '<'}{len(data) // 4}I", data))
    for even, odd in zip(words, words, strict=True):
        first = (first + even + second) & 0xFFFFFFFF
        second = (second + odd + first) & 0xFFFFFFFF
    return first.to_bytes(4) + second.to_bytes(4)


def _past_header(fd: int) -> bool:
    """Whether a WAL holds anything but zeros past its header, read a megabyte at a time."""
    offset = 32
    while chunk := os.pread(fd, 1 << 20, offset):
        if chunk.strip(b"\0"):
            return True
        offset += len(chunk)
    return False


def _wal_holds(path: Path, page_size: int, lost: range) -> bool:
    """Whether the committed frames of the database's WAL hold every page in `lost`: those
    SQLite replays at recovery. A page count no WAL frame could back is never walked."""
    wal = path.with_name(DATABASE_FILE + "-wal")
    pages = {number for number, _, _ in _committed(wal, page_size)}
    return all(page in pages for page in lost)  # stops at the first page missing


def _committed(wal: Path, page_size: int = 0) -> Iterator[tuple[int, int, int]]:
    """The frames of the WAL's commits, which SQLite replays at recovery (it drops those after
    the last commit): each one's page number, the database's size in pages after the commit
    it ends (else 0), its offset."""
    since_commit: list[tuple[int, int, int]] = []
    for number, size, offset, _ in _frames(wal, page_size):
        since_commit.append((number, size, offset))
        if size:  # a commit
            yield from since_commit
            since_commit.clear()


def _frames(
    wal: Path, page_size: int = 0, salts: bytes | None = None
) -> Iterator[tuple[int, int, int, bytes]]:
    """The frames SQLite would read of a WAL (wal.c), from its start: each frame's page number,
    the database's size in pages after it if it ends a commit (else 0), its offset and its page;
    while each carries `salts` (None: the header's) and its checksum chains on (an older copy
    holds the previous generation's after its first ones; SQLite replays none after one that
    fails). None for a missing WAL or a header that fails its checks, or of another `page_size`
    (0: any)."""
    try:
        fd, _ = _open_regular(wal)
    except OSError:  # missing, or refused by its own check
        return
    try:
        header = os.pread(fd, 32, 0)
        salts = header[16:24] if salts is None else salts
        size = int.from_bytes(header[8:12])
        if not _wal_header_whole(header) or header[16:24] != salts or page_size not in (0, size):
            return
        magic, summed, offset = int.from_bytes(header[:4]), header[24:], 32
        while len(frame := os.pread(fd, 24 + size, offset)) == 24 + size:
            summed = _checksum(frame[:8] + frame[24:], magic, summed)
            if frame[8:16] != salts or frame[16:24] != summed:
                return
            yield int.from_bytes(frame[:4]), int.from_bytes(frame[4:8]), offset, frame[24:]
            offset += 24 + size
    finally:
        os.close(fd)


# The unix VFS's locks (os_unix.c): every connection holds a read lock on byte 128 of the
# shared-memory file (its "dead man switch"), and in WAL mode one on the database file's shared
# range, for as long as it is open.
SHM_DMS_BYTE = 128
SHARED_FIRST, SHARED_SIZE = 0x40000000 + 2, 510
SHARERS_CHECKS, SHARERS_CHECK_EVERY_S = 50, 0.02  # a mismatch lasting a second is refused


def _locked(path: Path, start: int, length: int) -> bool:
    """Whether another process holds a lock on `length` bytes of `path` from `start`: asked with
    F_GETLK, which takes none. Asked before this process opens the database: closing the
    descriptor drops the process's own locks on the file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return False
    try:
        asked = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, start, length, 0)
        kind: int = struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, asked))[0]
    finally:
        os.close(fd)
    return kind != fcntl.F_UNLCK


def in_use(shm: Path) -> bool:
    """Whether a process has the database of this shared-memory file open."""
    return _locked(shm, SHM_DMS_BYTE, 1)


def check_sharers(path: Path) -> None:
    """Refuse a database whose files are not all those of the processes that have it open: its
    WAL or shared-memory file removed or replaced under them, or the database file itself.
    SQLite here would make its own, and two processes would each write one WAL believing
    itself alone, or mix two databases, corrupting them."""
    wal, shm = (path.with_name(DATABASE_FILE + name) for name in ("-wal", "-shm"))
    # A process closing the database as its last user lets its files go one at a time, over
    # milliseconds: only what lasts is a mismatch.
    for _ in range(SHARERS_CHECKS):
        database_open, shm_open = _locked(path, SHARED_FIRST, SHARED_SIZE), in_use(shm)
        if database_open == shm_open and (not shm_open or _wal_of(wal, shm)):
            return
        time.sleep(SHARERS_CHECK_EVERY_S)
    raise StoreUnavailable(
        f"{path} is open in another process through files since removed or replaced (the "
        "database, its -wal or -shm): stop every process using it, then start"
    )


def _open_regular(path: Path) -> tuple[int, int]:
    """A read-only descriptor of a regular file, and its size; OSError for anything else."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG((status := os.fstat(fd)).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    return fd, status.st_size


def _head(path: Path, size: int) -> tuple[bytes, int]:
    fd, file_size = _open_regular(path)  # OSError for anything but a regular file
    try:
        return os.pread(fd, size, 0), file_size
    finally:
        os.close(fd)


def _index(shm: Path) -> tuple[int, int, bytes, int] | None:
    """The WAL index's header in the -shm (wal.c): frames committed (mxFrame), frames copied
    since (nBackfill), the WAL generation's salts, the page size. None while it is being written
    (its two copies differ); OSError if the file is missing or not a regular one."""
    index, _ = _head(shm, 100)
    if len(index) < 100 or index[:48] != index[48:96]:
        return None
    frames, copied = (int.from_bytes(index[at : at + 4], sys.byteorder) for at in (16, 96))
    return frames, copied, index[32:40], _page_size(int.from_bytes(index[14:16], sys.byteorder))


def _wal_of(wal: Path, shm: Path) -> bool:
    """Whether `wal` is the WAL the shared memory indexes: a header of the same salts and the
    frames it counts. Its header is read while its processes may write it."""
    try:
        index, (wal_head, wal_size) = _index(shm), _head(wal, 32)
    except OSError:  # missing, or not a regular file
        return False
    if index is None:
        return True
    frames, _, salts, page_size = index
    return frames == 0 or (wal_head[16:24] == salts and wal_size >= 32 + frames * (24 + page_size))


def check_wal_kept(path: Path) -> None:
    """Refuse a WAL that no longer holds the committed frames the shared-memory file left beside
    it counts (a process killed with writes in it, then the WAL emptied, cut, removed, replaced
    by an older copy or another database's): SQLite reads what is left as all there is, and
    writes over it. A WAL whose frames were all copied into the database may be gone, not
    another; a later generation of it (begun once all were copied) may have taken its place
    since the index was last written back, which a power loss leaves behind. Refuse a WAL
    beside no shared-memory file whose commits hold pages the database does not: SQLite leaves
    a WAL alone only when killed between removing the -shm and the WAL, each page copied; and
    another database's would be replayed over this one. Not while a process has the database
    open (check_sharers judges that)."""
    wal, shm = (path.with_name(DATABASE_FILE + name) for name in ("-wal", "-shm"))
    if not os.path.lexists(shm):
        if not _copied(path, wal):
            raise StoreCorrupt(
                wal,
                f"beside no {DATABASE_FILE}-shm, holding pages the database does not: if "
                "another database's, SQLite would replay it over this one, so move it aside; "
                f"if this database's own (its -shm was removed), create an empty "
                f"{DATABASE_FILE}-shm beside it, then start",
            )
        return
    if in_use(shm) or (index := _index(shm)) is None:
        return
    frames, copied, salts, page_size = index
    if not frames or (copied >= frames and not os.path.lexists(wal)):
        return
    if _later_generation(wal, salts):
        return
    if _frames_of(wal, salts, page_size, frames) < frames:
        raise StoreCorrupt(
            wal,
            "missing, or not holding the writes its index (the -shm file) counts: put the whole "
            "WAL back; or, to start with what the WAL holds, move the -shm file aside and put "
            "an empty one in its place; or restore a backup",
        )


def _later_generation(wal: Path, salts: bytes) -> bool:
    """Whether the WAL's header is of a later generation than `salts`: SQLite begins one, once
    every frame is copied into the database, with the first salt one more than the last (a
    random one, another database's, is this close once in tens of thousands)."""
    try:
        header, _ = _head(wal, 32)
    except OSError:  # missing
        return False
    ahead = (int.from_bytes(header[16:20]) - int.from_bytes(salts[:4])) % (1 << 32)
    return _wal_header_whole(header) and 0 < ahead <= GENERATIONS_BEHIND


def _frames_of(wal: Path, salts: bytes, page_size: int, most: int) -> int:
    """How many frames from the WAL's start (up to `most`) SQLite reads as of its generation
    of `salts`."""
    return sum(1 for _ in itertools.islice(_frames(wal, page_size, salts), most))


def _copied(path: Path, wal: Path) -> bool:
    """Whether the database holds every page of the WAL's commits as the last of them left it:
    a checkpoint copied them all, so SQLite replaying the WAL changes nothing."""
    latest: dict[int, int] = {}  # page number: the offset of its last committed frame
    pages = 0  # the database's size after the last commit
    for number, size, offset in _committed(wal):
        latest[number] = offset
        pages = size or pages
    try:
        wal_fd, _ = _open_regular(wal)
        db_fd, _ = _open_regular(path)
    except OSError:
        return not latest
    try:
        page_size = int.from_bytes(os.pread(wal_fd, 4, 8))
        return all(
            os.pread(wal_fd, page_size, offset + 24)
            == os.pread(db_fd, page_size, (number - 1) * page_size)
            for number, offset in latest.items()
            if number <= pages
        )
    finally:
        os.close(wal_fd)
        os.close(db_fd)


def remove_made(path: Path, made: list[str]) -> None:
    """Remove what a refused start made of the database's files (`made`: those of "", "-wal"
    and "-shm" it found missing), once its connections are closed: it leaves the directory as
    it found it. A WAL it made beside a database that stays is kept, with its shared memory,
    unless empty: it may hold a commit its close could not copy into the database."""
    wal = path.with_name(DATABASE_FILE + "-wal")
    kept = "" not in made and os.path.lexists(wal) and os.lstat(wal).st_size > 0
    for name in made:
        if not (kept and name in ("-wal", "-shm")):
            path.with_name(DATABASE_FILE + name).unlink(missing_ok=True)


def identity(path: Path) -> tuple[int, ...] | None:
    """The database file's, its WAL's and its shared-memory file's: they stay the same files
    while a process has the database open (SQLite reuses its WAL in place), unless removed or
    replaced."""
    try:
        files = [os.stat(path.with_name(DATABASE_FILE + name)) for name in ("", "-wal", "-shm")]
    except FileNotFoundError:
        return None
    return files[0].st_dev, *(f.st_ino for f in files)


def sync_directory(path: Path) -> None:
    """A name created, linked or replaced in `path` is durable once the directory is synced."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def owner(head: bytes | None) -> int | None:
    """The application id in a database file's header."""
    return None if head is None else int.from_bytes(head[68:72])


def create(path: Path) -> None:
    """An empty database in WAL mode, put in place whole: a process starting at the same moment
    finds either no file or this one, never a half-made one."""
    new = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.new")
    try:
        with contextlib.closing(sqlite3.connect(new)) as conn:
            os.chmod(new, 0o600)  # documents are the owner's: SQLite gives its WAL the same mode
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")  # the header: a real file
        with contextlib.suppress(FileExistsError):  # another process made it first
            os.link(new, path)
    finally:  # made or not (a full disk), nothing of it stays
        for name in ("", "-wal", "-shm"):
            new.with_name(new.name + name).unlink(missing_ok=True)


def remove_leftovers(data_dir: Path) -> None:
    """What `create` was making when its process was killed; called under the start lock,
    which `create` runs under too, so no process is making one now."""
    made = re.compile(rf"{re.escape(DATABASE_FILE)}\.\d+-\d+\.new(-journal|-wal|-shm)?")
    for path in data_dir.glob(f"{DATABASE_FILE}.*.new*"):
        if made.fullmatch(path.name):
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def start_lock(data_dir: Path) -> Iterator[None]:
    """Held while a process checks the files and adopts a restored backup: one process at a
    time, so that none takes the WAL another has just begun for the replaced database's. The
    lock is the data directory's own: a refused start leaves no file behind."""
    fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released as the file closes
        yield
    finally:
        os.close(fd)


def adopt_backup(path: Path) -> None:
    """A backup put in place of the database: a WAL and shared-memory file beside it are the
    replaced database's (a backup keeps its mark until its first start), and SQLite would
    replay that WAL over it. They are set aside, and the file marked as the database; not while
    a process still has the database open, whose acknowledged writes go to that WAL."""
    if in_use(path.with_name(DATABASE_FILE + "-shm")):
        raise StoreUnavailable(
            f"{path} is open in another process: stop it (which writes its WAL into the "
            "file), put the backup in place again, then start"
        )
    aside = []
    for name in ("-wal", "-shm"):
        stale = path.with_name(DATABASE_FILE + name)
        if os.path.lexists(stale):
            aside.append(f"{stale.name}.replaced-{time.time_ns()}")
            os.replace(stale, stale.with_name(aside[-1]))
    # Closed as the last connection: the WAL is checkpointed into the file.
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    if owner(check_file(path)) == BACKUP_ID:  # the next start would set its WAL aside
        raise StoreUnavailable(f"{path} is open in another process: stop it, then start")
    log.info("store.backup_adopted", extra={"set_aside": aside})
