"""Store faults: failed and short writes, a full disk, and data directories the store did not
write. After any failure the store serves exactly what a restart would load."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from conftest import ServiceFactory
from models import DocumentCreate, DocumentQuery, DocumentUpdate
from storage import (
    DATA_FILE,
    JOURNAL_FILE,
    LOCK_FILE,
    StoreCorrupt,
    StoreError,
    StoreUnavailable,
    TinyDBStore,
)

REAL_WRITE = os.write
REAL_FDATASYNC = os.fdatasync
REAL_FTRUNCATE = os.ftruncate


def _is_journal(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").endswith(JOURNAL_FILE)
    except OSError:
        return False


class DiskFault:
    """Makes the kernel fail the journal's writes the way a full or broken disk does: the
    store's code runs for real, only the system calls on its journal answer differently."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch

    def write(self, code: int, *, short: bool = False) -> None:
        """Fail journal writes with `code`; with `short`, first write half of the first one."""
        state = {"short": short}

        def write(fd: int, data: Any) -> int:
            if not _is_journal(fd):
                return REAL_WRITE(fd, data)
            if state["short"] and len(data) > 1:
                state["short"] = False
                return REAL_WRITE(fd, bytes(data)[: len(data) // 2])
            raise OSError(code, os.strerror(code))

        self.monkeypatch.setattr(os, "write", write)

    def fdatasync(self, code: int) -> None:
        def fdatasync(fd: int) -> None:
            if _is_journal(fd):
                raise OSError(code, os.strerror(code))
            REAL_FDATASYNC(fd)

        self.monkeypatch.setattr(os, "fdatasync", fdatasync)

    def ftruncate(self, code: int) -> None:
        def ftruncate(fd: int, length: int) -> None:
            if _is_journal(fd):
                raise OSError(code, os.strerror(code))
            REAL_FTRUNCATE(fd, length)

        self.monkeypatch.setattr(os, "ftruncate", ftruncate)

    def heal(self) -> None:
        self.monkeypatch.undo()


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> DiskFault:
    return DiskFault(monkeypatch)


def doc(title: str, size: int = 10) -> DocumentCreate:
    return DocumentCreate(title=title, content="c" * size)


def reopened(tmp_path: Path) -> dict[str, Any]:
    """What a restart loads: every document by id."""

    async def load() -> dict[str, Any]:
        store = TinyDBStore.open(tmp_path)
        try:
            return {d.id: d async for d in store.export_documents()}
        finally:
            await store.close()

    return anyio.run(load)


FAULTS: list[tuple[str, Callable[[DiskFault], None]]] = [
    ("ENOSPC on write", lambda d: d.write(errno.ENOSPC)),
    ("short write, then ENOSPC", lambda d: d.write(errno.ENOSPC, short=True)),
    ("EIO on write", lambda d: d.write(errno.EIO)),
    ("EROFS on write", lambda d: d.write(errno.EROFS)),
    ("EIO on fdatasync", lambda d: d.fdatasync(errno.EIO)),
    ("ENOSPC on fdatasync", lambda d: d.fdatasync(errno.ENOSPC)),
]


@pytest.mark.parametrize("fault", [f[1] for f in FAULTS], ids=[f[0] for f in FAULTS])
def test_a_failed_write_changes_nothing_and_the_store_writes_again_once_the_disk_does(
    tmp_path: Path, disk: DiskFault, fault: Callable[[DiskFault], None]
) -> None:
    async def scenario() -> tuple[str, str]:
        store = TinyDBStore.open(tmp_path)
        kept, _ = await store.create(doc("kept"))
        fault(disk)
        with pytest.raises(StoreUnavailable):
            await store.create(doc("lost"))
        with pytest.raises(StoreUnavailable):
            await store.update(kept.id, DocumentUpdate(title="lost"))
        with pytest.raises(StoreUnavailable):
            await store.delete(kept.id)
        # Memory is what the disk holds: the old version, and no trace of the lost create.
        assert await store.get(kept.id) == kept
        assert [d.id async for d in store.export_documents()] == [kept.id]
        disk.heal()
        later, _ = await store.create(doc("later"))
        await store.close()
        return kept.id, later.id

    kept_id, later_id = anyio.run(scenario)
    loaded = reopened(tmp_path)
    assert sorted(loaded) == sorted([kept_id, later_id])
    assert loaded[kept_id].title == "kept"
    assert not (tmp_path / (DATA_FILE + ".tmp")).exists()


def test_every_writer_in_a_failed_group_commit_hears_of_it_and_nothing_of_theirs_stays(
    tmp_path: Path, disk: DiskFault
) -> None:
    async def scenario() -> list[BaseException | None]:
        store = TinyDBStore.open(tmp_path)
        outcomes: list[BaseException | None] = []

        async def write(n: int) -> None:
            try:
                await store.create(doc(f"w{n}"))
                outcomes.append(None)
            except StoreError as exc:
                outcomes.append(exc)

        disk.write(errno.ENOSPC)
        async with anyio.create_task_group() as tg:
            for n in range(8):
                tg.start_soon(write, n)
        assert await store.count() == 0
        disk.heal()
        await store.close()
        return outcomes

    outcomes = anyio.run(scenario)
    assert len(outcomes) == 8
    assert all(isinstance(o, StoreUnavailable) for o in outcomes)
    assert reopened(tmp_path) == {}


def test_readers_never_see_a_queued_change_and_no_write_succeeds_on_one_that_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a group commit is on its way to a failing disk, reads show only what is durable,
    and a PATCH that changes nothing on top of the queued change waits for it and fails too."""
    flushing, looked = threading.Event(), threading.Event()

    def write(fd: int, data: Any) -> int:
        if not _is_journal(fd):
            return REAL_WRITE(fd, data)
        flushing.set()
        looked.wait(10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    async def scenario() -> None:
        store = TinyDBStore.open(tmp_path)
        kept, _ = await store.create(doc("kept"))
        monkeypatch.setattr(os, "write", write)
        outcomes: dict[str, Any] = {}

        async def writer(name: str, call: Any) -> None:
            try:
                outcomes[name] = await call
            except StoreError as exc:
                outcomes[name] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(writer, "create", store.create(doc("queued")))
            tg.start_soon(writer, "rename", store.update(kept.id, DocumentUpdate(title="renamed")))
            await anyio.to_thread.run_sync(flushing.wait, 10)
            # The create and the rename are queued and being written: none of it shows.
            outcomes["listed"] = [d.id for d in (await store.page(DocumentQuery(), limit=100))[0]]
            outcomes["read"] = await store.get(kept.id)
            outcomes["count"] = await store.count()
            tg.start_soon(
                writer, "same patch", store.update(kept.id, DocumentUpdate(title="renamed"))
            )
            await anyio.lowlevel.checkpoint()  # the patch runs until it waits on the rename
            looked.set()
        monkeypatch.undo()
        assert outcomes["listed"] == [kept.id]
        assert outcomes["read"] == kept
        assert outcomes["count"] == 1
        for name in ("create", "rename", "same patch"):
            assert isinstance(outcomes[name], StoreUnavailable), name
        assert await store.get(kept.id) == kept
        await store.close()

    anyio.run(scenario)


def test_when_the_journal_cannot_even_be_cut_back_the_store_refuses_all_until_restart(
    tmp_path: Path, disk: DiskFault
) -> None:
    async def scenario() -> str:
        store = TinyDBStore.open(tmp_path)
        kept, _ = await store.create(doc("kept"))
        disk.write(errno.EIO, short=True)
        disk.ftruncate(errno.EIO)
        with pytest.raises(StoreUnavailable):
            await store.create(doc("torn"))
        disk.heal()
        for call in (store.get(kept.id), store.create(doc("after")), store.check()):
            with pytest.raises(StoreUnavailable):
                await call
        await store.close()
        return kept.id

    kept_id = anyio.run(scenario)
    # The next start cuts the torn half-line and loads every acknowledged write.
    assert list(reopened(tmp_path)) == [kept_id]
    assert list(reopened(tmp_path)) == [kept_id]


def test_a_compaction_that_fails_loses_nothing_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    async def scenario() -> list[str]:
        store = TinyDBStore.open(tmp_path, compact_min_bytes=1)
        monkeypatch.setattr(os, "fsync", fsync)
        ids = [(await store.create(doc(f"d{n}", 2000)))[0].id for n in range(20)]
        monkeypatch.undo()
        await store.close()
        return ids

    ids = anyio.run(scenario)
    assert not (tmp_path / (DATA_FILE + ".tmp")).exists()
    assert sorted(reopened(tmp_path)) == sorted(ids)


# --- a data directory the store did not write ------------------------------------------------


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _directory(path: Path) -> None:
    path.mkdir()


def _link_to_file(path: Path) -> None:
    (path.parent / "elsewhere").write_bytes(b"{}")
    path.symlink_to(path.parent / "elsewhere")


def _dangling_link(path: Path) -> None:
    path.symlink_to(path.parent / "missing")


SHAPES = {"FIFO": _fifo, "directory": _directory, "link": _link_to_file, "dangling": _dangling_link}
NAMES = [DATA_FILE, JOURNAL_FILE, LOCK_FILE, DATA_FILE + ".tmp"]


def _open_in_thread(data_dir: Path) -> BaseException | None:
    """Open the store where a hang would show as a thread still running, not a stuck test."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            store = TinyDBStore.open(data_dir)
            store.close_sync()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "opening the store hung"
    return outcome[0]


def _snapshot(data_dir: Path) -> dict[str, tuple[int, str | None]]:
    return {
        p.name: (p.lstat().st_mode, os.readlink(p) if p.is_symlink() else None)
        for p in data_dir.iterdir()
    }


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", SHAPES)
def test_a_path_of_the_wrong_shape_is_refused_untouched_without_a_hang(
    tmp_path: Path, name: str, shape: str
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    SHAPES[shape](data_dir / name)
    before = _snapshot(data_dir)
    error = _open_in_thread(data_dir)
    assert isinstance(error, StoreCorrupt)
    assert name in str(error)
    assert _snapshot(data_dir) == before


def test_two_records_with_one_id_are_refused_untouched(tmp_path: Path) -> None:
    data = json.dumps({"documents": {"1": _record(), "2": _record()}}).encode()
    (tmp_path / DATA_FILE).write_bytes(data)
    with pytest.raises(StoreCorrupt, match="two records"):
        TinyDBStore.open(tmp_path)
    assert (tmp_path / DATA_FILE).read_bytes() == data


def _record(doc_id: str = "01JDQ7Z8X4M2N6P9R3T5V7W9YB", **fields: Any) -> dict[str, Any]:
    return {
        "id": doc_id,
        "title": "t",
        "content": "c",
        "tags": [],
        "metadata": {},
        "created_at": "2026-11-27T09:30:00Z",
        "updated_at": "2026-11-27T09:30:00Z",
        "version": 1,
        **fields,
    }


def _journal(*entries: dict[str, Any]) -> bytes:
    """Lines exactly as the store writes them: CRC-32 of the body, then the body."""
    lines = []
    for entry in entries:
        body = json.dumps(entry).encode()
        lines.append(b"%08x %s\n" % (zlib.crc32(body), body))
    return b"".join(lines)


ODD_BUT_CHECKSUMMED = {
    "a document filed under another id": _journal(
        {"table": "documents", "id": "01JDQ7Z8X4M2N6P9R3T5V7W9YA", "value": _record()}
    ),
    "an unknown table": _journal({"table": "other", "id": "x", "value": {}}),
    "an id the service never makes": _journal(
        {"table": "documents", "id": "", "value": _record(doc_id="")}
    ),
    "nested metadata": _journal(
        {
            "table": "documents",
            "id": "01JDQ7Z8X4M2N6P9R3T5V7W9YB",
            "value": _record(metadata={"k": {"nested": 1}}),
        }
    ),
}


def _twice_under_one_key() -> bytes:
    first, second = json.dumps(_record()), json.dumps(_record(doc_id="01JDQ7Z8X4M2N6P9R3T5V7W9YC"))
    return b'{"documents": {"1": %s, "1": %s}}' % (first.encode(), second.encode())


NEVER_WRITTEN = {
    **{f"journal: {case}": (JOURNAL_FILE, raw) for case, raw in ODD_BUT_CHECKSUMMED.items()},
    "database: an unknown table": (
        DATA_FILE,
        json.dumps({"documents": {}, "extra": {"1": {}}}).encode(),
    ),
    "database: an id the service never makes": (
        DATA_FILE,
        json.dumps({"documents": {"1": _record(doc_id="nope")}}).encode(),
    ),
    "database: two records under one key": (DATA_FILE, _twice_under_one_key()),
}


@pytest.mark.parametrize(("name", "raw"), NEVER_WRITTEN.values(), ids=NEVER_WRITTEN)
def test_a_file_the_store_would_never_write_is_refused_untouched(
    tmp_path: Path, name: str, raw: bytes
) -> None:
    (tmp_path / name).write_bytes(raw)
    with pytest.raises(StoreCorrupt):
        TinyDBStore.open(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, LOCK_FILE])
    assert (tmp_path / name).read_bytes() == raw


def test_a_torn_last_journal_line_is_cut_at_open_so_later_writes_stay_readable(
    service_factory: ServiceFactory,
) -> None:
    service = service_factory()
    acknowledged = []
    for title in ("before", "after"):
        service.start()
        with service.client() as client:
            acknowledged.append(
                client.post("/v1/documents", json={"title": title, "content": "c"}).json()
            )
        service.kill()
        with open(service.data_dir / JOURNAL_FILE, "ab") as fh:
            fh.write(b'0badf00d {"table": "docu')  # the crash came mid-append
    service.start()
    with service.client() as client:
        for expected in acknowledged:
            assert client.get(f"/v1/documents/{expected['id']}").json() == expected


# --- real processes on a real small filesystem ------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, mounted for this test (root only)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_answers_503_loses_no_acknowledged_write_and_recovers(
    small_disk: Path, service_factory: ServiceFactory
) -> None:
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * 200 * 1024)
    service = service_factory(small_disk / "data").start()
    acknowledged: dict[str, Any] = {}
    refused = 0
    with service.client() as client:
        for n in range(200):
            response = client.post(
                "/v1/documents", json={"title": f"d{n}", "content": "x" * 20_000}
            )
            if response.status_code == 201:
                acknowledged[response.json()["id"]] = response.json()
            else:
                assert response.status_code == 503
                assert response.headers["content-type"] == "application/problem+json"
                refused += 1
                if refused >= 3:
                    break
        assert refused >= 3, "the disk never filled up"
        listed = client.get("/v1/documents", params={"limit": 100}).json()["items"]
        assert {d["id"] for d in listed} == set(acknowledged)
        filler.unlink()
        response = client.post("/v1/documents", json={"title": "after", "content": "x"})
        assert response.status_code == 201
        acknowledged[response.json()["id"]] = response.json()
    service.terminate()
    lines = service.rest_of_output().splitlines()
    assert all(json.loads(line)["level"] for line in lines)
    assert any("store.write_failed" in line for line in lines)
    service.start()
    with service.client() as client:
        for doc_id, expected in acknowledged.items():
            assert client.get(f"/v1/documents/{doc_id}").json() == expected
        listed = client.get("/v1/documents", params={"limit": 100}).json()["items"]
        assert len(listed) == len(acknowledged)


# Root that obeys file permissions: without these capabilities it is refused like anyone else.
NO_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


@pytest.mark.parametrize("damage", ["fifo", "readonly", "owner"])
def test_an_unusable_data_directory_stops_the_service_with_one_clean_line(
    tmp_path: Path, service_factory: ServiceFactory, damage: str
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / DATA_FILE).write_bytes(b'{"documents": {}}')
    wrapper = None
    if damage == "fifo":
        os.mkfifo(data_dir / JOURNAL_FILE)
    elif damage == "readonly":
        if subprocess.run(["mount", "--bind", str(data_dir), str(data_dir)]).returncode != 0:
            pytest.skip("cannot bind-mount here")
        subprocess.run(["mount", "-o", "remount,bind,ro", str(data_dir)], check=True)
    else:
        if os.geteuid() != 0 or shutil.which("setpriv") is None:
            pytest.skip("needs root and setpriv (util-linux) to drop the permission override")
        os.chown(data_dir / DATA_FILE, 65534, 65534)  # another user's file, mode 0600
        os.chmod(data_dir / DATA_FILE, 0o600)
        wrapper = NO_OVERRIDE
    service = service_factory(data_dir, wrapper=wrapper)
    try:
        service.start(wait=False)
        assert service.proc is not None
        assert service.proc.wait(20) != 0
        output = service.rest_of_output()
    finally:
        if damage == "readonly":
            subprocess.run(["umount", "-l", str(data_dir)], check=False)
    assert output.count("store.open_failed") == 1
    assert "Traceback" not in output
    assert str(data_dir) in output
    if damage == "fifo":
        assert (data_dir / JOURNAL_FILE).is_fifo()
    if damage == "owner":
        assert (data_dir / DATA_FILE).read_bytes() == b'{"documents": {}}'
    shutil.rmtree(data_dir, ignore_errors=True)
