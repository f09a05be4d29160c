"""Store faults: a full disk, and data directories the store did not write. After any failure
the store serves exactly what a restart would load."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from conftest import KEY, ServiceFactory, app_client, assert_problem, run_main
from legacy import LEGACY_FILE, LEGACY_JOURNAL, LEGACY_LOCK
from models import DocumentCreate
from sqlite_files import DATABASE_FILE
from sqlite_store import DAMAGE_FILE, SQLiteStore
from storage import StoreCorrupt, StoreUnavailable


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
NAMES = [DATABASE_FILE, DATABASE_FILE + "-wal", LEGACY_FILE, LEGACY_JOURNAL, LEGACY_LOCK]


def _in_thread(work: Callable[[], object], what: str) -> BaseException | None:
    """What `work` raised (None if nothing), run where a hang would show as a thread still
    running, not a stuck test."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            work()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), f"{what} hung"
    return outcome[0]


def _open_in_thread(data_dir: Path) -> BaseException | None:
    return _in_thread(lambda: SQLiteStore.open(data_dir).close_sync(), "opening the store")


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


@pytest.mark.parametrize("shape", SHAPES)
def test_a_damage_report_of_the_wrong_shape_fails_readiness_without_a_hang(
    tmp_path: Path, shape: str
) -> None:
    """A FIFO named as the report one process leaves the others had held every probe (and a
    thread each) for ever."""
    store = SQLiteStore.open(tmp_path)
    SHAPES[shape](tmp_path / DAMAGE_FILE)
    error = _in_thread(lambda: asyncio.run(store.check()), "readiness")
    store.close_sync()
    assert isinstance(error, StoreUnavailable)
    assert DAMAGE_FILE in str(error)


def _filled(data_dir: Path, count: int) -> None:
    async def fill() -> None:
        store = SQLiteStore.open(data_dir)
        try:
            for n in range(count):
                await store.create(DocumentCreate(title=f"d{n}", content="x" * 2000))
        finally:
            await store.close()

    anyio.run(fill)


def _linked_as_shm(data_dir: Path) -> None:
    os.link(data_dir / DATABASE_FILE, data_dir / f"{DATABASE_FILE}-shm")


def _linked_elsewhere(data_dir: Path) -> None:
    os.link(data_dir / DATABASE_FILE, data_dir / "documents-copy.db")


def _truncated_and_untrusted(data_dir: Path) -> None:
    """Pages cut off the end, and the header's page count made one SQLite does not trust, so
    that it counts the file's pages instead (and rewrites the header to match)."""
    database = data_dir / DATABASE_FILE
    data = bytearray(database.read_bytes())
    del data[-20 * 4096 :]
    data[92:96] = (int.from_bytes(data[92:96]) - 1).to_bytes(4)
    database.write_bytes(data)


DAMAGED_FILES = {
    "its -shm a second name of it": _linked_as_shm,
    "a second name elsewhere": _linked_elsewhere,
    "truncated, with a page count not to be trusted": _truncated_and_untrusted,
}


@pytest.mark.parametrize("damage", DAMAGED_FILES)
def test_a_database_of_several_names_or_an_untrusted_header_is_refused_untouched(
    tmp_path: Path, damage: str
) -> None:
    """A `-shm` linked to the database had been written over it, every document gone, with a
    refusal that said the file was left untouched; a truncated file whose header SQLite would
    not trust had been served, its header rewritten to hide the loss."""
    _filled(tmp_path, 300)
    DAMAGED_FILES[damage](tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    error = _open_in_thread(tmp_path)
    assert isinstance(error, StoreCorrupt)
    assert DATABASE_FILE in str(error)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def _journal_at_the_first_start(data_dir: Path) -> tuple[Path, bool]:
    return data_dir / LEGACY_JOURNAL, True


def _journal_beside_a_database(data_dir: Path) -> tuple[Path, bool]:
    SQLiteStore.open(data_dir).close_sync()
    return data_dir / LEGACY_JOURNAL, True


def _previous_file_for_a_task(data_dir: Path) -> tuple[Path, bool]:
    return data_dir / LEGACY_FILE, False


LARGE_PREVIOUS_FILES = {
    "a journal at the first start": _journal_at_the_first_start,
    "a journal beside the database": _journal_beside_a_database,
    "the previous file, for a task": _previous_file_for_a_task,
}


@pytest.mark.parametrize("case", LARGE_PREVIOUS_FILES)
def test_a_large_previous_file_is_refused_without_being_read_whole(
    tmp_path: Path, case: str
) -> None:
    """A byte says whether a journal holds changes, and a task never reads the previous file:
    each had been read whole first (a sparse file of 4 GB took 4 GB of memory, then failed)."""
    path, migrate = LARGE_PREVIOUS_FILES[case](tmp_path)
    with path.open("wb") as file:
        file.truncate(1 << 30)  # sparse: no disk taken
    tracemalloc.start()
    try:
        with pytest.raises((StoreCorrupt, StoreUnavailable), match=re.escape(str(path))):
            SQLiteStore.open(tmp_path, migrate=migrate).close_sync()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20


def test_a_refusal_quotes_at_most_a_line_of_the_file(tmp_path: Path) -> None:
    """Text of the file in a refusal (an unknown table's name, an idempotency key) had been
    copied whole into its one line: 10 MB for two names of 5 MB."""
    names: dict[str, dict[str, Any]] = {"x" * 5_000_000: {}, "y" * 5_000_000: {}}
    (tmp_path / LEGACY_FILE).write_text(json.dumps(names))
    with pytest.raises(StoreCorrupt) as refused:
        SQLiteStore.open(tmp_path)
    assert "unknown tables" in str(refused.value)
    assert len(str(refused.value)) < 2_000


def test_two_records_with_one_id_in_the_previous_file_are_refused_untouched(
    tmp_path: Path,
) -> None:
    data = json.dumps({"documents": {"1": _record(), "2": _record()}}).encode()
    (tmp_path / LEGACY_FILE).write_bytes(data)
    with pytest.raises(StoreCorrupt, match="two records"):
        SQLiteStore.open(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [LEGACY_FILE]
    assert (tmp_path / LEGACY_FILE).read_bytes() == data


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


NEVER_WRITTEN = {
    "an unknown table": (
        LEGACY_FILE,
        json.dumps({"documents": {}, "extra": {"1": {}}}).encode(),
    ),
    "an id the service never makes": (
        LEGACY_FILE,
        json.dumps({"documents": {"1": _record(doc_id="nope")}}).encode(),
    ),
    "nesting deeper than a parser goes": (
        LEGACY_FILE,
        b'{"documents": {"1": ' + b"[" * 200_000 + b"]" * 200_000 + b"}}",
    ),
    "nested metadata": (
        LEGACY_FILE,
        json.dumps({"documents": {"1": _record(metadata={"k": {"nested": 1}})}}).encode(),
    ),
}


@pytest.mark.parametrize(("name", "raw"), NEVER_WRITTEN.values(), ids=NEVER_WRITTEN)
def test_a_file_the_store_would_never_write_is_refused_untouched(
    tmp_path: Path, name: str, raw: bytes
) -> None:
    (tmp_path / name).write_bytes(raw)
    with pytest.raises(StoreCorrupt):
        SQLiteStore.open(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert (tmp_path / name).read_bytes() == raw


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


def damage_the_update_index(database: Path) -> None:
    """Write garbage over the root page of the index of update times."""
    with contextlib.closing(sqlite3.connect(database)) as conn:
        sql = "SELECT rootpage FROM sqlite_master WHERE name = 'documents_updated'"
        page, size = conn.execute(sql).fetchone()[0], conn.execute("PRAGMA page_size").fetchone()[0]
    with database.open("r+b") as file:
        file.seek((page - 1) * size)
        file.write(b"\xff" * size)


def test_a_damaged_page_a_write_meets_keeps_the_store_unready_until_a_restart(
    tmp_path: Path,
) -> None:
    """Every create failed on a damaged index page ("database disk image is malformed"), while
    readiness said 200: its probe rewrote a row of an undamaged page, which ended the failure."""
    with app_client(tmp_path, headers={"X-API-Key": KEY}) as client:
        for n in range(20):
            assert client.post("/v1/documents", json={"title": f"d{n}", "content": "c"}).is_success
    damage_the_update_index(tmp_path / DATABASE_FILE)
    with app_client(tmp_path, headers={"X-API-Key": KEY}) as client:
        created = client.post("/v1/documents", json={"title": "t", "content": "c"})
        assert "malformed" in assert_problem(created, 503)["detail"]
        for _ in range(3):
            assert "damaged" in assert_problem(client.get("/health/ready"), 503)["detail"]


def test_damage_one_worker_meets_makes_every_worker_unready_until_a_restart(
    tmp_path: Path, service_factory: ServiceFactory
) -> None:
    """With several workers, readiness answered 200 from each worker whose own requests had met
    no damage: a probe had one chance in two of saying all was well."""
    service = service_factory(tmp_path / "data", env={"WORKERS": "2"}).start()
    with service.client() as client:
        for n in range(20):
            assert client.post("/v1/documents", json={"title": f"d{n}", "content": "c"}).is_success
    service.stop_quietly()
    damage_the_update_index(tmp_path / "data" / DATABASE_FILE)
    service.start()
    with service.client() as client:
        assert_problem(client.post("/v1/documents", json={"title": "t", "content": "c"}), 503)
    for _ in range(10):  # a connection each, spread over the workers by the kernel
        with service.client() as client:
            assert "damaged" in assert_problem(client.get("/health/ready"), 503)["detail"]
    service.stop_quietly()
    service.start()  # a first process again: ready until a request meets the damage
    with service.client() as client:
        assert client.get("/health/ready").status_code == 200


def test_a_backup_the_disk_cannot_hold_is_one_line_and_leaves_nothing(
    small_disk: Path, tmp_path: Path
) -> None:
    """It was a traceback, and the partial copy and its journal stayed under the name asked."""

    async def fill() -> None:
        store = SQLiteStore.open(tmp_path / "data")
        for n in range(40):
            await store.create(DocumentCreate(title=f"d{n}", content=f"{n} " * 20_000))
        await store.close()

    anyio.run(fill)
    for target in (small_disk / "copy.db", tmp_path / "no such directory" / "copy.db"):
        result = run_main(
            {"DATA_DIR": str(tmp_path / "data"), "API_KEYS": KEY}, "backup", str(target)
        )
        assert result.returncode == 1
        assert b"Traceback" not in result.stderr
        last = result.stderr.decode().splitlines()[-1]
        assert last.startswith(f"error: cannot write the backup {target}: "), last
    assert list(small_disk.iterdir()) == []


@pytest.mark.parametrize("free", [0, 48 << 10], ids=["full", "room for an empty database only"])
def test_a_first_start_on_a_full_disk_leaves_nothing_behind(small_disk: Path, free: int) -> None:
    """The database is made aside and put in place whole: a start the disk refuses leaves the
    directory as it was, and the next one, once there is room, starts. With room for the empty
    database but not its tables, the start had left the empty database behind."""
    data_dir = small_disk / "data"
    data_dir.mkdir()
    filler = small_disk / "filler"
    with pytest.raises(OSError, match="No space"):
        filler.write_bytes(b"\0" * (2 << 20))  # twice the disk: it fills up
    os.truncate(filler, filler.stat().st_size - free)
    for _ in range(2):
        with pytest.raises(StoreUnavailable, match="full"):
            SQLiteStore.open(data_dir)
        assert list(data_dir.iterdir()) == []
    filler.unlink()
    store = SQLiteStore.open(data_dir)
    store.close_sync()
    assert {p.name for p in data_dir.iterdir()} >= {DATABASE_FILE}
    assert not [p for p in data_dir.iterdir() if p.name.endswith(".new")]


# Root that obeys file permissions: without these capabilities it is refused like anyone else.
NO_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


@pytest.mark.parametrize("damage", ["fifo", "readonly", "owner"])
def test_an_unusable_data_directory_stops_the_service_with_one_clean_line(
    tmp_path: Path, service_factory: ServiceFactory, damage: str
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / LEGACY_FILE).write_bytes(b'{"documents": {}}')
    wrapper = None
    if damage == "fifo":
        os.mkfifo(data_dir / LEGACY_JOURNAL)
    elif damage == "owner":
        if os.geteuid() != 0 or shutil.which("setpriv") is None:
            pytest.skip("needs root and setpriv (util-linux) to drop the permission override")
        os.chown(data_dir / LEGACY_FILE, 65534, 65534)  # another user's file, mode 0600
        os.chmod(data_dir / LEGACY_FILE, 0o600)
        wrapper = NO_OVERRIDE
    # Made first: without a process to start (--fast), the factory skips the test right away.
    service = service_factory(data_dir, wrapper=wrapper)
    try:
        if damage == "readonly":
            if subprocess.run(["mount", "--bind", str(data_dir), str(data_dir)]).returncode != 0:
                pytest.skip("cannot bind-mount here")
            subprocess.run(["mount", "-o", "remount,bind,ro", str(data_dir)], check=True)
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
        assert (data_dir / LEGACY_JOURNAL).is_fifo()
    if damage == "owner":
        assert (data_dir / LEGACY_FILE).read_bytes() == b'{"documents": {}}'
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.mark.parametrize("mode", [0o000, 0o444], ids=["unreadable", "read-only"])
def test_a_database_the_process_cannot_use_is_refused_leaving_the_directory_as_it_was(
    tmp_path: Path, service_factory: ServiceFactory, mode: int
) -> None:
    """The read-only one had left a new, empty WAL and shared-memory file beside it."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (util-linux) to drop the permission override")
    data_dir = tmp_path / "data"
    SQLiteStore.open(data_dir).close_sync()
    database = data_dir / DATABASE_FILE
    before = database.read_bytes()
    database.chmod(mode)
    service = service_factory(data_dir, wrapper=NO_OVERRIDE)
    service.start(wait=False)
    assert service.proc is not None
    assert service.proc.wait(20) == 3
    output = service.rest_of_output()
    assert output.count("store.open_failed") == 1
    assert str(database) in output
    assert "Traceback" not in output
    database.chmod(0o600)
    assert [p.name for p in data_dir.iterdir()] == [DATABASE_FILE]
    assert database.read_bytes() == before


def test_a_scrape_warns_once_the_data_volume_is_nearly_full(
    small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """WARNING is for what an operator should act on: a volume under 10% free, before writes
    fail, says so at each scrape (one line, not one per request)."""
    with app_client(small_disk / "data") as client:
        assert client.get("/metrics").status_code == 200
        assert "store.disk_nearly_full" not in caplog.messages
        free = shutil.disk_usage(small_disk).free
        (small_disk / "filler").write_bytes(b"\0" * (free - 50 * 1024))
        assert client.get("/metrics").status_code == 200
    warned = [r for r in caplog.records if r.getMessage() == "store.disk_nearly_full"]
    assert len(warned) == 1
    assert warned[0].levelname == "WARNING"
