"""Process-level behaviour, with the real service in real subprocesses."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import fcntl
import json
import math
import os
import re
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from conftest import (
    HERE,
    KEY,
    Service,
    ServiceFactory,
    assert_problem,
    fill_millisecond,
    plain_document,
    run_main,
    run_threads,
    scrape,
    starts_a_process,
    walk,
    write_until_killed,
)
from sqlite_files import DATABASE_FILE, start_lock
from sqlite_store import MIGRATIONS, SLOTS, SQLiteStore
from storage import IdGenerator

CLEAN_EXITS = (0, 143, -signal.SIGTERM)


def run_task(data_dir: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return run_main({"DATA_DIR": str(data_dir), "API_KEYS": KEY}, *args)


def start_task(data_dir: Path, *args: str, **options: Any) -> subprocess.Popen[bytes]:
    """A task as run_task runs it, for a test that watches it or signals it as it runs."""
    starts_a_process()
    return subprocess.Popen(
        [sys.executable, "main.py", *args],
        cwd=HERE,
        env={"PATH": os.environ["PATH"], "DATA_DIR": str(data_dir), "API_KEYS": KEY},
        **options,
    )


def test_documents_survive_a_restart(service_factory: ServiceFactory) -> None:
    service = service_factory().start()
    with service.client() as client:
        doc = client.post("/v1/documents", json={"title": "kept", "content": "c"}).json()
    assert service.terminate() in CLEAN_EXITS
    service.start()
    with service.client() as client:
        assert client.get(f"/v1/documents/{doc['id']}").json() == doc


@pytest.mark.parametrize("sent", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_stop_finishes_cleanly_within_10_seconds(
    service_factory: ServiceFactory, sent: signal.Signals
) -> None:
    """Ctrl-C (SIGINT) had ended `make run` with a KeyboardInterrupt traceback."""
    service = service_factory().start()
    assert service.proc is not None
    with service.client() as client:
        client.post("/v1/documents", json={"title": "t", "content": "c"})
    started = time.monotonic()
    service.proc.send_signal(sent)
    assert service.proc.wait(10) in CLEAN_EXITS
    assert time.monotonic() - started < 10
    output = service.rest_of_output()
    assert "service.stopped" in output
    assert "Traceback" not in output


def test_a_reload_of_one_worker_is_refused_in_a_line_and_it_serves_on(
    service_factory: ServiceFactory,
) -> None:
    """SIGHUP (`systemctl reload`) replaces several workers one at a time; its default action
    had ended a single worker at once (exit 129, no clean stop, requests cut)."""
    service = service_factory().start()
    assert service.proc is not None
    with service.client() as client:
        doc = client.post("/v1/documents", json={"title": "t", "content": "c"}).json()
        service.proc.send_signal(signal.SIGHUP)
        line = json.loads(service.wait_for_line("service.reload_refused", timeout=10))
        assert line["level"] == "WARNING"
        assert "WORKERS=2" in line["reason"]
        assert client.get(f"/v1/documents/{doc['id']}").json() == doc
    assert service.terminate() in CLEAN_EXITS
    assert "service.stopped" in service.rest_of_output()


def test_a_reload_while_the_service_starts_changes_nothing(
    service_factory: ServiceFactory,
) -> None:
    """SIGHUP before the server had taken it (the imports, the settings, the store's opening
    and migrations) had ended the start with no line (exit 129)."""
    service = service_factory()
    service.data_dir.mkdir()
    with start_lock(service.data_dir):  # the store's opening waits for it
        service.start(wait=False)
        assert service.proc is not None
        service.wait_for_line("Uvicorn running on", timeout=20)  # bound, and opening the store
        service.proc.send_signal(signal.SIGHUP)
    service.wait_for_line("Application startup complete", timeout=20)
    with service.client() as client:
        assert client.get("/health/ready").status_code == 200
    assert service.proc.poll() is None


def _read_answer(sock: socket.socket) -> bytes:
    """One answer with a Content-Length, read whole: its head and body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)\r\ncontent-length: (\d+)", head)[1])  # type: ignore[index]
    while len(body) < length:
        body += sock.recv(65536)
    return head


@pytest.mark.parametrize("begun", [False, True], ids=["opened", "second head begun"])
def test_a_request_on_a_connection_opened_before_a_stop_is_answered(
    service_factory: ServiceFactory, begun: bool
) -> None:
    """A client opens a connection to send a request at once, or has begun a second one's head
    on a kept-alive connection: a graceful stop (SIGTERM, and each worker's in a rolling
    restart) coming in between answers it, as the connection's last."""
    service = service_factory().start()
    assert service.proc is not None
    request = f"GET /v1/documents HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        if begun:
            sock.sendall(request)
            assert _read_answer(sock).startswith(b"HTTP/1.1 200 ")
            sock.sendall(request[:10])
        # Connections are accepted, and what came on them read, in the order sent: once a later
        # one is answered, the server has this one and its bytes.
        with service.client() as client:
            assert client.get("/health").status_code == 200
        service.proc.send_signal(signal.SIGTERM)
        service.wait_for_line("Waiting for connections to close", timeout=10)
        sock.sendall(request[10:] if begun else request)
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
    head = answer.split(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 200 ")
    assert b"\r\nconnection: close" in head
    assert service.proc.wait(10) in CLEAN_EXITS


@pytest.mark.parametrize("begun", [True, False], ids=["begun before the stop", "begun after it"])
def test_a_body_still_arriving_when_a_stop_ends_gets_a_503_problem_and_changes_nothing(
    service_factory: ServiceFactory, begun: bool
) -> None:
    """Its handler had been cancelled when the stop stopped waiting: a text/plain 500 and a
    traceback in the log, for a request that was never acted on."""
    service = service_factory().start()
    assert service.proc is not None
    request = (
        f"POST /v1/documents HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n"
        'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"title": "t"'
    ).encode()
    with socket.create_connection(("127.0.0.1", service.port), timeout=20) as sock:
        if begun:
            sock.sendall(request)
        with service.client() as client:  # answered once the server has read the above
            assert client.get("/health").status_code == 200
        service.proc.send_signal(signal.SIGTERM)
        if not begun:  # on a connection opened before the stop, as its first request
            service.wait_for_line("Waiting for connections to close", timeout=10)
            sock.sendall(request)
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 "), answer
    assert b"\r\ncontent-type: application/problem+json" in head.lower()
    assert json.loads(body)["status"] == 503
    assert service.proc.wait(10) in CLEAN_EXITS
    output = service.rest_of_output()
    assert "Traceback" not in output
    # As the client got it: not a client that left, the status the service had chosen.
    (line,) = [json.loads(x) for x in output.splitlines() if '"logger":"documents.access"' in x]
    assert (line["status_code"], line.get("client_disconnected")) == (503, None)
    service.start()
    with service.client() as client:
        assert client.get("/v1/documents").json()["items"] == []


def test_a_request_still_running_when_a_stop_ends_gets_a_503_problem_saying_so(
    service_factory: ServiceFactory,
) -> None:
    """A handler the stop cancels (here a write held up by another process's transaction) had
    answered a text/plain 500 and logged a traceback. The write may still commit once the
    transaction ends, and the answer says it may have been carried out."""
    service = service_factory().start()
    assert service.proc is not None
    body = b'{"title": "t", "content": "c"}'
    request = (
        f"POST /v1/documents HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    holder = sqlite3.connect(service.data_dir / DATABASE_FILE, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with socket.create_connection(("127.0.0.1", service.port), timeout=30) as sock:
            sock.sendall(request)
            with service.client() as client:  # answered once the server has read the above
                assert client.get("/health").status_code == 200
            service.proc.send_signal(signal.SIGTERM)
            answer = b"".join(iter(lambda: sock.recv(65536), b""))
    finally:
        holder.rollback()
        holder.close()
    head, _, problem = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 "), answer
    assert b"\r\ncontent-type: application/problem+json" in head.lower()
    assert "may have been carried out" in json.loads(problem)["detail"]
    assert service.proc.wait(15) in CLEAN_EXITS
    assert "Traceback" not in service.rest_of_output()


def test_kill_9_during_concurrent_writes_loses_no_acknowledged_document(
    service_factory: ServiceFactory,
) -> None:
    service = service_factory().start()
    acknowledged = write_until_killed(service, 300)
    service.start()
    with service.client() as client:
        for doc_id, doc in acknowledged.items():
            assert client.get(f"/v1/documents/{doc_id}").json() == doc


def test_a_second_process_on_the_same_data_dir_shares_its_documents(
    service_factory: ServiceFactory,
) -> None:
    first = service_factory().start()
    second = service_factory(first.data_dir).start()
    with first.client() as one, second.client() as other:
        made_here = one.post("/v1/documents", json={"title": "first", "content": "c"}).json()
        made_there = other.post("/v1/documents", json={"title": "second", "content": "c"}).json()
        assert other.get(f"/v1/documents/{made_here['id']}").json() == made_here
        assert one.get(f"/v1/documents/{made_there['id']}").json() == made_there


DAMAGE = {
    "documents.db": [b"{not json", b"", b"SQLite format 3\x00" + b"\x00" * 200],
    "documents.json": [b"{not json", b'{"documents": {"1": {"id": 1}}}'],
}


@pytest.mark.parametrize(
    ("name", "damage"), [(name, damage) for name, cases in DAMAGE.items() for damage in cases]
)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_damaged_data_file_is_refused_in_one_line_and_left_byte_for_byte_intact(
    service_factory: ServiceFactory, tmp_path: Path, name: str, damage: bytes, workers: str
) -> None:
    """With several workers too, which each logged the refusal."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data_file = data_dir / name
    data_file.write_bytes(damage)
    service = service_factory(data_dir, {"WORKERS": workers}).start(wait=False)
    assert service.proc is not None
    assert service.proc.wait(10) == 3  # uvicorn's status for a start that failed
    output = service.rest_of_output()
    assert "refused (not a" in output  # what it is not
    assert str(data_file) in output
    assert "Traceback" not in output
    failures = [line for line in output.splitlines() if '"level":"CRITICAL"' in line]
    assert len(failures) == 1, output
    assert '"level":"ERROR"' not in output  # nothing after the one line
    assert data_file.read_bytes() == damage
    assert [p.name for p in data_dir.iterdir()] == [name]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("RATE_LIMIT", "lots"),
        ("PORT", "eighty"),
        ("LOG_LEVEL", "chatty"),
        ("API_KEYS", "short"),
        ("MAX_CONTENT_CHARS", "0"),  # not a second line for MAX_BODY_BYTES, derived from it
    ],
)
def test_bad_setting_stops_startup_with_one_line_naming_it(
    tmp_path: Path, variable: str, value: str
) -> None:
    result = run_main({"DATA_DIR": str(tmp_path), variable: value}, timeout=30)
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"configuration error: {variable}:")


@pytest.mark.parametrize("linked", [False, True], ids=["named", "linked"])
@pytest.mark.parametrize(
    "name", [DATABASE_FILE, f"{DATABASE_FILE}-wal", "documents.damaged", "documents.json"]
)
def test_an_export_named_as_one_of_the_stores_files_is_refused_unwritten(
    tmp_path: Path, name: str, linked: bool
) -> None:
    """`export data/documents.db` had emptied the database, and one over the WAL of a running
    service lost writes it had acknowledged; however the path spells the data directory. A
    link elsewhere to a name not yet there (documents.json) had made an empty one, which then
    stopped every start."""
    data_dir = tmp_path / "data"
    assert run_task(data_dir, "seed").returncode == 0
    before = {p.name: p.read_bytes() for p in data_dir.iterdir()}
    target = data_dir / ".." / "data" / name
    if linked:
        (tmp_path / "out.jsonl").symlink_to(target)
        target = tmp_path / "out.jsonl"
    refused = run_task(data_dir, "export", str(target))
    assert refused.returncode == 1
    assert refused.stderr.decode().count("\n") == 1
    assert "the store's own files" in refused.stderr.decode()
    assert {p.name: p.read_bytes() for p in data_dir.iterdir()} == before


def test_seed_is_idempotent_and_validated(tmp_path: Path) -> None:
    for _ in range(2):
        assert run_task(tmp_path, "seed").returncode == 0
    exported = run_task(tmp_path, "export").stdout.decode().splitlines()
    assert len(exported) == 10


def test_export_then_import_round_trips_documents(tmp_path: Path) -> None:
    source, target = tmp_path / "a", tmp_path / "b"
    assert run_task(source, "seed").returncode == 0
    backup = run_task(source, "export").stdout
    backup_file = tmp_path / "backup.jsonl"
    backup_file.write_bytes(codecs.BOM_UTF8 + backup)  # as some editors save UTF-8
    for _ in range(2):  # importing twice adds nothing the second time
        assert run_task(target, "import", str(backup_file)).returncode == 0
    assert run_task(target, "export").stdout == backup


def test_import_reads_its_file_through_one_opening_so_a_pipe_works(tmp_path: Path) -> None:
    """The file was opened and closed once as a check, then opened again to be read: a pipe's
    writer was gone by then, and the import waited for ever."""
    assert run_task(tmp_path / "a", "seed").returncode == 0
    exported = run_task(tmp_path / "a", "export").stdout
    pipe = tmp_path / "documents.pipe"
    os.mkfifo(pipe)

    def write() -> None:
        with contextlib.suppress(BrokenPipeError), pipe.open("wb") as out:
            out.write(exported)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        result = run_main({"DATA_DIR": str(tmp_path / "b")}, "import", str(pipe), timeout=60)
    finally:
        os.close(os.open(pipe, os.O_RDONLY | os.O_NONBLOCK))  # a writer still waiting goes on
        writer.join()
    assert result.returncode == 0, result.stderr
    assert run_task(tmp_path / "b", "export").stdout == exported


def test_import_refuses_a_line_longer_than_any_document_without_reading_it_whole(
    tmp_path: Path,
) -> None:
    """A line was read whole before it was parsed: a 500 MB line took 1.5 GB, and a pipe that
    never sends a line break all the memory there is."""
    pipe = tmp_path / "endless.pipe"
    os.mkfifo(pipe)
    sent = 0

    def write() -> None:  # 64 MB of one line, unless the import stops reading first
        nonlocal sent
        with contextlib.suppress(BrokenPipeError), pipe.open("wb") as out:
            while sent < 64 << 20:
                out.write(b"x" * (1 << 16))
                sent += 1 << 16

    writer = threading.Thread(target=write)
    writer.start()
    try:
        result = run_task(tmp_path / "data", "import", str(pipe))
    finally:
        os.close(os.open(pipe, os.O_RDONLY | os.O_NONBLOCK))  # a writer still waiting goes on
        writer.join()
    line = result.stderr.splitlines()[-1]
    assert result.returncode == 1
    assert re.fullmatch(rb"error: .*endless\.pipe:1: document: longer than \d+ bytes, .*", line)
    assert sent < 8 << 20  # the default bound is about 1.2 MB


# Words of 2 bytes a letter in UTF-8; and words of letters of 3 bytes that fold to 5 letters each
# (㌀ is アパート), with one letter past the BMP: Python then holds every letter in 4 bytes.
LARGE_TEXTS = {
    "accented": " ".join(f"été{n}" for n in range(15_000))[:100_000],
    "folding": " ".join(
        "".join(chr(0x3300 + (n // 88 ** (k % 2) + k) % 88) for k in range(12))  # 1 000 words
        for n in range(1_000)
    )
    + "\U00020000",
}


@pytest.mark.parametrize("text", LARGE_TEXTS.values(), ids=LARGE_TEXTS.keys())
def test_an_import_of_large_documents_holds_a_bounded_batch_in_memory(
    tmp_path: Path, text: str
) -> None:
    """A batch of 512 documents of 100 000 characters each had been held at once: 280 MB (and
    220 MB for a batch bound of 8 MiB of folding text)."""
    at = datetime(2025, 1, 1, tzinfo=UTC)
    ids = IdGenerator()
    lines = tmp_path / "large.jsonl"
    with lines.open("wb") as out:
        for _ in range(600):
            doc = plain_document(ids(at), at).model_copy(update={"content": text})
            out.write(doc.model_dump_json().encode() + b"\n")
    # The import's own peak, VmHWM: ru_maxrss also counts the test process it was forked from.
    peak = (
        "import runpy, sys\n"
        "try: runpy.run_path('main.py', run_name='__main__')\n"
        "finally: sys.stderr.write(open('/proc/self/status').read())"
    )
    result = run_main(
        {"DATA_DIR": str(tmp_path / "data"), "API_KEYS": KEY}, "import", str(lines), python=peak
    )
    assert result.returncode == 0
    found = re.search(rb"VmHWM:\s+(\d+) kB", result.stderr)
    assert found is not None
    assert int(found[1]) < 180 * 1024  # kB: about 135 MB, 65 MB of it for an import of a line


def test_an_import_stopped_with_ctrl_c_says_so_in_one_line_and_keeps_what_it_wrote(
    tmp_path: Path,
) -> None:
    """It had ended in a traceback of 41 lines; and stopped while it waits for a pipe that sends
    nothing more, it had waited for it, then for its exit, after a third Ctrl-C."""
    at = datetime(2025, 1, 1, tzinfo=UTC)
    ids = IdGenerator()
    pipe = tmp_path / "documents.pipe"
    os.mkfifo(pipe)
    proc = start_task(tmp_path / "data", "import", str(pipe), stderr=subprocess.PIPE)
    assert proc.stderr is not None
    # Read a megabyte at a time: 10 000 lines are taken once the megabyte after them has come.
    docs = (plain_document(ids(at), at) for _ in range(15_000))
    with pipe.open("wb") as out:  # held open: the import waits for more after the last line
        out.writelines(doc.model_dump_json().encode() + b"\n" for doc in docs)
        out.flush()
        for line in proc.stderr:
            if b'"import.progress"' in line and b'"read":10000' in line:
                break
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 128 + signal.SIGINT
    rest = proc.stderr.read()
    assert b"Traceback" not in rest
    assert rest.splitlines()[-1] == b"error: interrupted"
    exported = run_task(tmp_path / "data", "export").stdout
    written = len(exported.splitlines())  # every whole batch; not the one it was making
    assert written % 512 == 0
    assert 10_000 - 512 < written < 15_000


def test_a_task_stopped_with_ctrl_c_while_its_store_opens_exits(tmp_path: Path) -> None:
    """It had waited for another process's start to end; and the store, opened after the stop,
    was never closed: its writer thread then held the exit for ever."""
    data = tmp_path / "data"
    assert run_task(data, "seed").returncode == 0
    lock = os.open(data, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(lock, fcntl.LOCK_EX)  # the start lock: the task's store waits for it
    proc = start_task(data, "export", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        waiting = f" -> FLOCK  ADVISORY  WRITE {proc.pid} "
        while proc.poll() is None and waiting not in Path("/proc/locks").read_text():
            pass  # until the task waits for the lock
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 128 + signal.SIGINT  # the lock still held
    finally:
        os.close(lock)
        proc.kill()
        proc.wait()
    assert proc.stderr is not None
    assert proc.stderr.read().splitlines()[-1] == b"error: interrupted"


@pytest.mark.parametrize("stderr", ["/dev/full", "closed"])
def test_an_import_whose_standard_error_cannot_be_written_imports_everything(
    tmp_path: Path, stderr: str
) -> None:
    """Its progress line, at line 10 000, had stopped it there. Standard error full, the exit
    status is Python's for output it could not flush, 120; closed, there is nothing to flush."""
    at = datetime(2025, 1, 1, tzinfo=UTC)
    ids = IdGenerator()
    lines = tmp_path / "docs.jsonl"
    docs = [plain_document(ids(at), at) for _ in range(10_001)]
    lines.write_bytes(b"".join(doc.model_dump_json().encode() + b"\n" for doc in docs))
    with open(os.devnull if stderr == "closed" else stderr, "wb") as sink:
        proc = start_task(
            tmp_path / "data", "import", str(lines), stderr=sink, stdout=subprocess.PIPE,
            # 2>&-: the child's standard error closed before it starts
            preexec_fn=(lambda: os.close(2)) if stderr == "closed" else None,
        )  # fmt: skip
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == (0 if stderr == "closed" else 120)
    assert out == b""  # a task's logs never go to standard output, export's data
    assert len(run_task(tmp_path / "data", "export").stdout.splitlines()) == len(docs)


def _waits_for_a_pipe(pid: int) -> bool:
    """Whether a thread of the process waits for a pipe's other end to be opened."""
    for thread in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread gone
            if (thread / "wchan").read_text() == "wait_for_partner":
                return True
    return False


@pytest.mark.parametrize("task", ["import", "seed", "export"])
def test_a_task_stopped_with_ctrl_c_while_a_pipe_has_no_other_end_exits(
    tmp_path: Path, task: str
) -> None:
    """Its file's opening waited for a writer (or export's for a reader) that never came, and
    held the stop, then the exit, for ever."""
    data = tmp_path / "data"
    assert run_task(data, "seed").returncode == 0
    pipe = tmp_path / "documents.pipe"
    os.mkfifo(pipe)
    proc = start_task(data, task, str(pipe), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while proc.poll() is None and not _waits_for_a_pipe(proc.pid):
            pass
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 128 + signal.SIGINT
    finally:
        proc.kill()
        proc.wait()
    assert proc.stderr is not None
    rest = proc.stderr.read()
    assert b"Traceback" not in rest
    assert rest.splitlines()[-1] == b"error: interrupted"


def test_ctrl_c_while_the_modules_load_stops_without_a_traceback(tmp_path: Path) -> None:
    """The second or so `python main.py` spends importing its modules: Ctrl-C there had printed
    a traceback of whichever import it cut."""
    proc = start_task(
        tmp_path / "data", "export", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        maps = Path(f"/proc/{proc.pid}/maps")
        while proc.poll() is None and "_pydantic_core" not in maps.read_text():
            pass  # pydantic loads early in the imports, and FastAPI's follow it
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == -signal.SIGINT
    finally:
        proc.kill()
        proc.wait()
    assert proc.stderr is not None
    assert proc.stderr.read() == b""


def test_import_takes_documents_of_one_millisecond_in_any_order(tmp_path: Path) -> None:
    """Data whose times are whole seconds: a thousand documents of one millisecond, newest id
    first (the embedded store had room for a dozen in that order, and import sorted them)."""
    at = datetime(2025, 1, 1, tzinfo=UTC)
    ids = IdGenerator()
    docs = [plain_document(ids(at), at) for _ in range(1000)]
    lines = tmp_path / "docs.jsonl"
    lines.write_bytes(b"".join(d.model_dump_json().encode() + b"\n" for d in docs[::-1]))
    assert run_task(tmp_path / "data", "import", str(lines)).returncode == 0
    exported = run_task(tmp_path / "data", "export").stdout.splitlines()
    assert [json.loads(line)["id"] for line in exported] == [doc.id for doc in docs]


@pytest.mark.parametrize(
    ("task", "where"), [("import", r"{file}:(\d+)"), ("seed", r"sample (\d+) in {file}")]
)
def test_a_document_the_store_refuses_is_named_with_where_it_was_read(
    task: str, where: str, tmp_path: Path
) -> None:
    """The embedded store has 16 384 keys for the documents of one millisecond, taken in any
    order; past them, the refusal says which line (or sample) and which document, and the
    document before it is not written either (seed had kept the samples before the refused one)."""
    at = datetime(2025, 1, 1, tzinfo=UTC)

    async def fill() -> None:
        store = SQLiteStore.open(tmp_path / "data")
        try:
            await fill_millisecond(store, at)
        finally:
            await store.close()

    asyncio.run(fill())
    ids = [IdGenerator()(at) for _ in range(3)]
    later = at + timedelta(milliseconds=1)
    fits = plain_document(IdGenerator()(later), later)
    docs = [fits, *(plain_document(i, at) for i in ids)]
    rest = tmp_path / f"rest.{task}"
    if task == "import":
        rest.write_bytes(b"".join(d.model_dump_json().encode() + b"\n" for d in docs))
    else:
        samples = [d.model_dump(mode="json", exclude={"updated_at", "version"}) for d in docs]
        rest.write_text(json.dumps(samples))
    refused = run_task(tmp_path / "data", task, str(rest))
    assert refused.returncode == 1
    line = refused.stderr.decode().splitlines()[-1]
    named = re.fullmatch(
        rf"error: {where.format(file=re.escape(str(rest)))}: created_at: too many documents"
        rf" created in one millisecond \(the most is {SLOTS}\) \(document (\w{{26}})\)",
        line,
    )
    assert named is not None, line
    assert ids.index(named[2]) == int(named[1]) - 2  # the line holds the document named
    assert fits.id.encode() not in run_task(tmp_path / "data", "export").stdout


GOOD_LINE = {
    "id": "01KB2N4Z9J8E7X3W5Q6R0T1Y2A",
    "title": "t",
    "content": "c",
    "tags": [],
    "metadata": {},
    "created_at": "2026-01-01T00:00:00Z",
    "updated_at": "2026-01-01T00:00:00Z",
    "version": 1,
}


def _line(**fields: object) -> bytes:
    return json.dumps({**GOOD_LINE, **fields}).encode()


def _samples(**fields: object) -> bytes:
    """A seed file of one sample: a document as a client sends it, with an id and a time."""
    sample = {k: v for k, v in GOOD_LINE.items() if k not in ("updated_at", "version")}
    return json.dumps([{**sample, **fields}]).encode()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"id": "x"}', b"bad.jsonl:1: title: Field required"),
        (b"not json", b"bad.jsonl:1: document: Invalid JSON"),
        # Blank lines hold no document, and count: the line named is the file's.
        (b"\n \r\n" + _line() + b"\n\nnot json", b"bad.jsonl:5: document: Invalid JSON"),
        (b"\x0b\x0c", b"bad.jsonl:1: document: Invalid JSON"),  # no white space JSON knows
        # What the API would refuse is refused: the document could not be sent back as it is.
        (_line(title="x" * 201), b"bad.jsonl:1: title: "),
        (_line(tags=["t" * 51]), b"bad.jsonl:1: tags.0: "),
        (_line(metadata={f"k{n}": n for n in range(51)}), b"bad.jsonl:1: metadata: "),
        (_line(content="c" * 100_001), b"bad.jsonl:1: content: at most 100000 characters"),
        (_line(created_at="0001-01-01T00:00:00+01:00"), b"outside the years 1 to 9999"),
        (_line(updated_at="9999-12-31T23:59:59.9999-01:00"), b"outside the years 1 to 9999"),
        # One more on a PATCH would not fit the 64 bits the database stores.
        (_line(version=2**53), b"bad.jsonl:1: version: at most 9007199254740991"),
        (_line(version=2**64), b"bad.jsonl:1: version: at most 9007199254740991"),
        # Read as strictly as a request body: the parser settles none of these by itself.
        (_line()[:-1] + b', "title": "again"}', b"1: document: Invalid JSON: duplicate key"),
        (_line(metadata={"n": math.nan}), b"bad.jsonl:1: document: Invalid JSON: NaN is not"),
        (_line(metadata={"n": 0}).replace(b": 0}", b": 1e999}"), b"1e999 does not fit"),
        (_line(tags=["t"] * 600), b"bad.jsonl:1: document: The body holds more than 512"),
        (_line(tag=["t"]), b"bad.jsonl:1: tag: Extra inputs are not permitted"),
        # No request sets these: they are read as export writes them, not settled.
        (_line(version=True), b"bad.jsonl:1: version: Input should be a valid integer"),
        (_line(version=1.0), b"bad.jsonl:1: version: Input should be a valid integer"),
        (_line(created_at=0), b"bad.jsonl:1: created_at: must be an RFC 3339 time"),
        # Strict pydantic too read digits as a Unix time, in seconds or milliseconds by size.
        (_line(created_at="1700000000000"), b"bad.jsonl:1: created_at: must be an RFC 3339"),
        (_line(updated_at="2026-01-01 00:00:00Z"), b"bad.jsonl:1: updated_at: must be an RFC"),
        (_line(created_at="2026-02-30T00:00:00Z"), b"created_at: 2026-02-30T00:00:00Z is not a"),
        # Read once, as a body reads it: a second parser had read this as -2^63, in range.
        (_line(metadata={"n": 0}).replace(b": 0}", b": -9223372036854775809.0}"), b"n: a number"),
    ],
)
def test_import_refuses_an_invalid_line_in_one_line_naming_file_line_and_field(
    tmp_path: Path, line: bytes, message: bytes
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(line + b"\n")
    result = run_task(tmp_path / "data", "import", str(bad))
    assert result.returncode != 0
    assert message in result.stderr
    assert b"Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1
    # Refused in the first batch, before the store opens: an empty database had been made.
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("task", [["export"], ["backup", "copy.db"], ["import", "none.jsonl"]])
def test_a_task_refuses_a_database_of_an_older_schema_unchanged(
    tmp_path: Path, task: list[str]
) -> None:
    """Only a service migrates: a newer version's task had migrated the database under the
    previous version's service, which then failed its tag listings and writes."""
    (tmp_path / "none.jsonl").write_bytes(b"")
    data = tmp_path / "data"
    SQLiteStore.open(data).close_sync()
    with sqlite3.connect(data / DATABASE_FILE) as conn:  # as the previous version left it
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) - 1}")
    conn.close()
    before = (data / DATABASE_FILE).read_bytes()
    result = run_task(data, *[str(tmp_path / arg) if "." in arg else arg for arg in task])
    assert result.returncode != 0
    assert b"stop the service using it" in result.stderr.splitlines()[-1]
    assert b"Traceback" not in result.stderr
    assert (data / DATABASE_FILE).read_bytes() == before
    assert not (tmp_path / "copy.db").exists()


@pytest.mark.parametrize(
    ("task", "name", "content", "reason"),
    [
        ("import", "missing.jsonl", None, ": No such file or directory"),
        ("import", "two\nlines.jsonl", None, ": No such file or directory"),
        ("import", "two\nlines.jsonl", b"{", ":1: document: Invalid JSON"),
        # A seed file had been opened once the store was: a missing one left an empty database.
        ("seed", "missing.json", None, ": No such file or directory"),
        ("seed", "two\nlines.json", b"{", ": not JSON"),
        # Read whole, as samples are: not past a bound, which a pipe would not reach.
        ("seed", "huge.json", b" " * (1 << 20) + b"[]", ": larger than 1 MiB"),
    ],
)
def test_a_task_error_is_one_line_whatever_the_file_is_named(
    tmp_path: Path, task: str, name: str, content: bytes | None, reason: str
) -> None:
    if content is not None:
        (tmp_path / name).write_bytes(content)
    result = run_task(tmp_path / "data", task, str(tmp_path / name))
    assert result.returncode == 1
    shown = name.replace("\n", "\\n")  # escaped, as every character that is not printable
    assert result.stderr.splitlines()[-1].startswith(f"error: {tmp_path}/{shown}{reason}".encode())
    assert b"Traceback" not in result.stderr
    if content is None:  # refused before the store opens: no database made
        assert not (tmp_path / "data" / DATABASE_FILE).exists()


@pytest.mark.parametrize("task", ["import", "seed"])
def test_a_file_that_opens_but_cannot_be_read_changes_nothing(tmp_path: Path, task: str) -> None:
    """Its first read came once the store was open: an empty database was left behind."""
    result = run_task(tmp_path / "data", task, "/proc/self/mem")  # reading at 0 is EIO
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == b"error: /proc/self/mem: Input/output error"
    assert not (tmp_path / "data" / DATABASE_FILE).exists()


def test_export_writes_the_file_it_is_given(tmp_path: Path) -> None:
    assert run_task(tmp_path / "data", "seed").returncode == 0
    to_stdout = run_task(tmp_path / "data", "export").stdout
    result = run_task(tmp_path / "data", "export", str(tmp_path / "out.jsonl"))
    assert result.returncode == 0
    assert result.stdout == b""
    assert (tmp_path / "out.jsonl").read_bytes() == to_stdout


@pytest.mark.parametrize("reached", ["a link", "a redirection"])
def test_export_refuses_to_write_into_a_store_file_however_it_is_reached(
    tmp_path: Path, reached: str
) -> None:
    """Export had followed a link to the database and emptied it, under a running service too."""
    data = tmp_path / "data"
    assert run_task(data, "seed").returncode == 0
    exported = run_task(data, "export").stdout
    before = (data / DATABASE_FILE).read_bytes()
    link = tmp_path / "out.jsonl"
    link.symlink_to(data / DATABASE_FILE)
    with (data / DATABASE_FILE).open("ab") as appended:  # as `>>` opens it: nothing emptied
        args, stdout = ([str(link)], None) if reached == "a link" else ([], appended)
        proc = start_task(data, "export", *args, stdout=stdout, stderr=subprocess.PIPE)
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert b"the store's own files" in stderr.splitlines()[-1]
    assert (data / DATABASE_FILE).read_bytes() == before
    assert run_task(data, "export").stdout == exported


@pytest.mark.parametrize(
    ("args", "stream", "name"),
    [([], "stdout", f"{DATABASE_FILE}-wal"), (["seed"], "stderr", DATABASE_FILE)],
    ids=["the service's logs", "a task's logs"],
)
def test_logs_redirected_into_a_store_file_are_refused_before_a_line_is_written(
    tmp_path: Path, args: list[str], stream: str, name: str
) -> None:
    """They had been appended there: the service's start lines made a WAL SQLite refused, and
    a task's lines went into the database."""
    data = tmp_path / "data"
    assert run_task(data, "seed").returncode == 0
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    with (data / name).open("ab") as appended:  # as `>>` opens it
        streams = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, stream: appended}
        proc = start_task(data, *args, **streams)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert b"is one of the store's own files" in (err if stream == "stdout" else out)
    assert {p.name: p.read_bytes() for p in data.iterdir()} == {name: b"", **before}


def test_an_export_cut_short_leaves_the_previous_file_and_no_part(tmp_path: Path) -> None:
    """FILE was emptied first and written in place: an export cut short (here past a file size
    limit; Ctrl-C, a full disk) left a part of it, which read as a whole export."""
    at = datetime(2025, 1, 1, tzinfo=UTC)
    ids = IdGenerator()
    large = {"content": "c" * 1000}
    docs = (plain_document(ids(at), at).model_copy(update=large) for _ in range(300))
    lines = tmp_path / "in.jsonl"
    lines.write_bytes(b"".join(d.model_dump_json().encode() + b"\n" for d in docs))
    assert run_task(tmp_path / "data", "import", str(lines)).returncode == 0
    lines.unlink()
    previous = tmp_path / "out.jsonl"
    previous.write_bytes(b"the previous export\n")

    def limit_file_size() -> None:  # past the database's shared memory (32 KiB), not the export
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past it fails (EFBIG) instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    limited = {"stderr": subprocess.PIPE, "preexec_fn": limit_file_size}
    proc = start_task(tmp_path / "data", "export", str(previous), **limited)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert stderr.splitlines()[-1] == f"error: {previous}: File too large".encode()
    assert previous.read_bytes() == b"the previous export\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out.jsonl"]


def test_export_writes_utf_8_whatever_the_locale(tmp_path: Path) -> None:
    """Text was written in the locale's encoding: under LC_ALL=C, a traceback and a cut file."""
    line = _line(title="Crème brûlée ✓")
    (tmp_path / "in.jsonl").write_bytes(line + b"\n")
    assert run_task(tmp_path / "data", "import", str(tmp_path / "in.jsonl")).returncode == 0
    ascii_only = {"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    env = {"DATA_DIR": str(tmp_path / "data"), "API_KEYS": KEY, **ascii_only}
    result = run_main(env, "export", str(tmp_path / "out.jsonl"))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out.jsonl").read_bytes())["title"] == "Crème brûlée ✓"


def test_an_export_whose_reader_goes_away_stops_with_one_line(tmp_path: Path) -> None:
    """`main.py export | head -c 100`: the pipe closes under the export."""
    doc = {"title": "t", "content": "c" * 1000, "tags": [], "metadata": {}, "version": 1}
    lines = tmp_path / "docs.jsonl"
    with lines.open("w") as out:
        for n in range(500):  # 500 KB: more than a pipe holds
            at = f"2025-01-01T00:00:00.{n:03d}000Z"
            out.write(json.dumps({"id": f"01J{n:023d}", **doc, "created_at": at, "updated_at": at}))
            out.write("\n")
    assert run_task(tmp_path / "data", "import", str(lines)).returncode == 0
    export = subprocess.Popen(
        [sys.executable, str(HERE / "main.py"), "export"],
        env={
            "PATH": os.environ.get("PATH", ""),
            "DATA_DIR": str(tmp_path / "data"),
            "API_KEYS": KEY,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert export.stdout is not None
    assert export.stderr is not None
    export.stdout.read(100)
    export.stdout.close()
    stderr = export.stderr.read()
    assert export.wait(60) == 1
    assert stderr.decode().splitlines()[-1] == "error: Broken pipe", stderr


@pytest.mark.parametrize(
    ("samples", "message"),
    [
        (b'{"a":', "not JSON"),
        (b"[1]", "expected a JSON array of documents"),
        (b'{"a": 1}', "expected a JSON array of documents"),
        (b'[{"id": "x"}]', "sample 1 in"),
        # Each sample is taken as import takes a document.
        (_samples(id="not/an id"), "samples.json: id 'not/an id' is not a document id"),
        (_samples(content="c" * 100_001), "samples.json: content: at most 100000 characters"),
        (_samples(created_at="0001-01-01T00:00:00+05:00"), "outside the years 1 to 9999"),
        (_samples(tags=["t" * 51]), "samples.json: tags.0: "),
        # Read as strictly as a body: a repeated key had kept its last value, and an integer
        # past 64 bits had been read as a float, then stored as the integer 2^63.
        (_samples()[:-2] + b', "title": "again"}]', "not JSON: duplicate key 'title'"),
        (_samples(metadata={"n": -(2**63) - 1}), "samples.json: metadata.n: a number must be"),
        (_samples(created_at="1700000000000"), "created_at: must be an RFC 3339 time"),
        # What a sample gives is read, not replaced; what it leaves out is named as such.
        (_samples(version=True), "samples.json: version: Input should be a valid integer"),
        (_samples(updated_at="garbage"), "samples.json: updated_at: must be an RFC 3339 time"),
        (_samples().replace(b'"created_at"', b'"created"'), "samples.json: created: Extra"),
    ],
)
def test_seed_refuses_a_file_it_cannot_use_in_one_line(
    tmp_path: Path, samples: bytes, message: str
) -> None:
    bad = tmp_path / "samples.json"
    bad.write_bytes(samples)
    result = run_task(tmp_path / "data", "seed", str(bad))
    assert result.returncode == 1
    assert b"Traceback" not in result.stderr
    last = result.stderr.decode().splitlines()[-1]
    assert last.startswith("error: ")
    assert message in last
    assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "data").exists()  # every sample is checked before the store opens


def test_seed_stores_a_sample_as_import_stores_a_document(tmp_path: Path) -> None:
    """A time without an offset is UTC, and is kept to the millisecond, as everywhere."""
    samples = tmp_path / "samples.json"
    samples.write_bytes(_samples(created_at="2026-10-01T09:00:00.123456"))
    assert run_task(tmp_path / "data", "seed", str(samples)).returncode == 0
    [doc] = map(json.loads, run_task(tmp_path / "data", "export").stdout.splitlines())
    assert doc["created_at"] == doc["updated_at"] == "2026-10-01T09:00:00.123000Z"


def test_an_export_to_a_closed_standard_output_says_so_in_one_line(tmp_path: Path) -> None:
    assert run_task(tmp_path / "data", "seed").returncode == 0
    result = subprocess.run(
        ["/bin/sh", "-c", f'exec "{sys.executable}" "{HERE / "main.py"}" export >&-'],
        env={
            "PATH": os.environ.get("PATH", ""),
            "DATA_DIR": str(tmp_path / "data"),
            "API_KEYS": KEY,
        },
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert b"Traceback" not in result.stderr
    assert result.stderr.decode().splitlines()[-1] == (
        "error: standard output is closed: give export a FILE"
    )


def test_uvicorn_factory_serves(tmp_path: Path) -> None:
    service = Service(tmp_path)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "main:serve_app",
            "--port",
            str(service.port),
        ],
        cwd=HERE,
        env=service.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    service.proc = proc
    service.follow()
    try:
        service.wait_for_line("Uvicorn running on", timeout=20)
        with service.client() as client:
            assert client.get("/v1/documents").status_code == 200
    finally:
        service.stop_quietly()


def test_compose_file_runs_the_image_with_a_volume_and_a_mongo_profile() -> None:
    compose = yaml.safe_load((HERE / "compose.yaml").read_text())
    service = compose["services"]["documents"]
    assert "documents-data:/app/data" in service["volumes"]
    assert "API_KEYS" in service["environment"]
    mongo = compose["services"]["documents-mongo"]
    assert mongo["profiles"] == ["mongo"]
    assert mongo["environment"]["DATABASE_URL"].startswith("mongodb://")
    assert set(compose["volumes"]) == {
        "documents-data",
        "mongo-data",
        "prometheus-data",
        "grafana-data",
    }


def test_a_malformed_database_url_is_one_line_without_the_password(tmp_path: Path) -> None:
    result = run_main({"DATA_DIR": str(tmp_path), "DATABASE_URL": "mongodb://ada:s3cr3t@x@db/d"})
    assert result.returncode == 2
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("configuration error: DATABASE_URL: ")
    assert b"s3cr3t" not in result.stdout + result.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_in_use_fails_before_the_service_says_it_started_or_changes_a_file(
    service_factory: ServiceFactory, tmp_path: Path, workers: str
) -> None:
    """With several workers the store was opened before the port was bound: the previous
    version's file had been imported and set aside by a start that then failed."""
    data = tmp_path / "data"
    data.mkdir()
    previous = data / "documents.json"
    previous.write_bytes(b'{"documents": {}, "idempotency": {}}')
    service = service_factory(data, {"WORKERS": workers})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", service.port))
        taken.listen()
        service.start(wait=False)
        assert service.proc is not None
        assert service.proc.wait(30) != 0
    output = service.rest_of_output()
    assert "service.started" not in output
    assert "address already in use" in output.lower()
    assert [path.name for path in data.iterdir()] == [previous.name]


def test_a_backup_taken_under_writes_restores_every_document_acknowledged_before_it(
    service_factory: ServiceFactory, tmp_path: Path
) -> None:
    service = service_factory().start()
    acknowledged: list[str] = []
    stop, enough = threading.Event(), threading.Event()

    def writer(n: int) -> None:
        with service.client() as client:
            while not stop.is_set():
                response = client.post("/v1/documents", json={"title": f"w{n}", "content": "c"})
                assert response.status_code == 201
                acknowledged.append(response.json()["id"])
                if len(acknowledged) >= 200:
                    enough.set()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    assert enough.wait(60)
    before = list(acknowledged)
    result = run_task(service.data_dir, "backup", str(tmp_path / "backup.db"))
    stop.set()
    for thread in threads:
        thread.join()
    assert result.returncode == 0, result.stderr
    service.terminate()
    restored = tmp_path / "restored"
    restored.mkdir()
    (tmp_path / "backup.db").rename(restored / "documents.db")
    copy = service_factory(restored).start()
    with copy.client() as client:
        listed = {doc["id"] for doc in walk(client, limit=100)}
    assert set(before) <= listed


def test_a_backup_put_in_place_of_a_killed_service_s_database_is_served_as_it_was(
    service_factory: ServiceFactory, tmp_path: Path
) -> None:
    """Restoring is: stop, put the backup in place of documents.db, start. After a kill -9 the
    replaced database's WAL is still beside it, and SQLite replayed it over the backup: pages of
    one database in the other, "database disk image is malformed" on reads while readiness said
    200. A backup keeps its mark until its first start, which sets that WAL aside."""
    service = service_factory().start()
    with service.client() as client:
        before = [
            client.post("/v1/documents", json={"title": f"b{n}", "content": "kept"}).json()["id"]
            for n in range(20)
        ]
        assert run_task(service.data_dir, "backup", str(tmp_path / "backup.db")).returncode == 0
        for n in range(100):
            after = {"title": f"a{n}", "content": "after the backup", "tags": [f"t{n}"]}
            assert client.post("/v1/documents", json=after).status_code == 201
    service.kill()
    assert (service.data_dir / f"{DATABASE_FILE}-wal").stat().st_size > 0
    (tmp_path / "backup.db").replace(service.data_dir / DATABASE_FILE)
    restored = service_factory(service.data_dir).start()
    with restored.client() as client:
        assert sorted(doc["id"] for doc in walk(client, limit=100)) == sorted(before)
        assert walk(client, q="kept") == walk(client)
        assert client.post("/v1/documents", json={"title": "t", "content": "c"}).status_code == 201
    restored.terminate()
    conn = sqlite3.connect(service.data_dir / DATABASE_FILE)
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    conn.close()
    set_aside = sorted(p.name.split(".replaced-")[0] for p in service.data_dir.glob("*.replaced-*"))
    assert set_aside == [f"{DATABASE_FILE}-shm", f"{DATABASE_FILE}-wal"]


@pytest.mark.parametrize("put", ["moved", "copied"])
def test_a_backup_put_in_place_under_a_running_service_is_refused_and_its_files_kept(
    service_factory: ServiceFactory, tmp_path: Path, put: str
) -> None:
    """Restoring is stop, then put in place. Put in place under a running service, a second
    start set the running one's WAL aside and served the backup, while the first went on
    acknowledging writes into the WAL set aside: lost at its next start."""
    service = service_factory().start()
    database, backup = service.data_dir / DATABASE_FILE, tmp_path / "backup.db"
    with service.client() as client:
        assert client.post("/v1/documents", json={"title": "t", "content": "c"}).status_code == 201
        assert run_task(service.data_dir, "backup", str(backup)).returncode == 0
        if put == "moved":
            backup.replace(database)
        else:
            database.write_bytes(backup.read_bytes())
        files = sorted(p.name for p in service.data_dir.iterdir())
        second = service_factory(service.data_dir).start(wait=False)
        assert second.proc is not None
        assert second.proc.wait(20) != 0
        assert "open in another process" in second.rest_of_output()
        assert sorted(p.name for p in service.data_dir.iterdir()) == files
        if put == "moved":  # the first acknowledges nothing more into the file it has open
            made = client.post("/v1/documents", json={"title": "t", "content": "c"})
            assert "replaced or removed" in assert_problem(made, 503)["detail"]
            assert_problem(client.get("/health/ready"), 503)


@pytest.mark.parametrize(
    "taken", ["-shm removed", "-shm replaced", "-wal replaced", "database removed"]
)
def test_a_second_process_never_opens_a_database_whose_files_were_taken_away(
    service_factory: ServiceFactory, taken: str
) -> None:
    """With the -shm file removed or replaced under a running service, a replaced worker or a
    second process made a new one: two processes then wrote one WAL, each believing itself
    alone, and every document became unreadable. With the -wal replaced, or the database file
    removed, it took the running one's other files for its own. The second is refused; the
    first acknowledges no more writes, and a restart finds every document it acknowledged."""
    service = service_factory().start()
    files = {name: service.data_dir / f"{DATABASE_FILE}{name}" for name in ("", "-wal", "-shm")}
    with service.client() as client:
        made = [client.post("/v1/documents", json={"title": "t", "content": "c"}) for _ in range(5)]
        assert [r.status_code for r in made] == [201] * 5
        name, how = taken.split()
        name = "" if name == "database" else name
        if how == "replaced":
            files[name].rename(service.data_dir / "aside")
            files[name].write_bytes(b"")
        else:
            files[name].unlink()
        before = sorted(p.name for p in service.data_dir.iterdir())
        second = service_factory(service.data_dir).start(wait=False)
        assert second.proc is not None
        assert second.proc.wait(20) != 0
        assert "removed or replaced" in second.rest_of_output()
        task = run_task(service.data_dir, "import", "/dev/null")
        assert task.returncode != 0
        assert b"removed or replaced" in task.stderr + task.stdout
        assert sorted(p.name for p in service.data_dir.iterdir()) == before
        refused = client.post("/v1/documents", json={"title": "t", "content": "c"})
        assert "replaced or removed" in assert_problem(refused, 503)["detail"]
        assert_problem(client.get("/health/ready"), 503)
    assert service.terminate() in CLEAN_EXITS
    if name == "":
        return  # the documents went with the file
    restarted = service_factory(service.data_dir).start()
    with restarted.client() as client:
        assert sorted(doc["id"] for doc in walk(client)) == sorted(r.json()["id"] for r in made)


def test_a_client_connecting_while_workers_start_waits_and_is_never_refused(
    service_factory: ServiceFactory,
) -> None:
    """The socket listens before any worker has loaded the app: a connection made during the
    start waits in its backlog and is answered, as with one worker."""
    service = service_factory(env={"WORKERS": "2"}).start(wait=False)
    service.wait_for_line("Started parent process", timeout=20)
    with service.client() as client:
        assert client.get("/health").status_code == 200


def test_two_workers_share_writes_and_race_exactly(service_factory: ServiceFactory) -> None:
    service = service_factory(env={"WORKERS": "2"}).start()
    with service.client() as client:
        doc = client.post("/v1/documents", json={"title": "t", "content": "c"}).json()
    outcomes: list[int] = []
    created: list[str] = []

    def race(n: int) -> None:
        # A new connection each: the kernel spreads them over both workers.
        with service.client() as client:
            assert client.get(f"/v1/documents/{doc['id']}").status_code == 200
            patched = client.patch(
                f"/v1/documents/{doc['id']}", json={"title": f"p{n}"}, headers={"If-Match": '"1"'}
            )
            outcomes.append(patched.status_code)
            made = client.post(
                "/v1/documents",
                json={"title": "once", "content": "c"},
                headers={"Idempotency-Key": "race"},
            )
            created.append(made.json()["id"])

    run_threads(race, 16)
    assert sorted(outcomes) == [200] + [412] * 15
    assert len(set(created)) == 1
    with service.client() as client:
        assert len(walk(client, limit=100)) == 2


def test_two_workers_together_allow_no_more_than_the_configured_rate(
    service_factory: ServiceFactory,
) -> None:
    service = service_factory(env={"WORKERS": "2", "RATE_LIMIT": "10/minute"}).start()
    statuses: list[int] = []

    def spend(n: int) -> None:
        with service.client() as client:
            statuses.extend(client.get("/v1/documents").status_code for _ in range(3))

    run_threads(spend, 10)
    assert statuses.count(200) <= 10
    assert set(statuses) == {200, 429}


def _workers(service: Service) -> list[int]:
    assert service.proc is not None
    children = Path(f"/proc/{service.proc.pid}/task/{service.proc.pid}/children").read_text()
    # Workers are spawned; multiprocessing's resource tracker is a child too.
    return [
        int(pid)
        for pid in children.split()
        if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


def test_a_worker_killed_with_kill_9_is_replaced_and_loses_nothing(
    service_factory: ServiceFactory,
) -> None:
    service = service_factory(env={"WORKERS": "2"}).start(wait=False)
    service.wait_for_line("Application startup complete", 30, count=2)
    before = set(_workers(service))
    # Each worker's lines name it.
    started = [json.loads(line) for line in service.output if "startup complete" in line]
    assert {line["pid"] for line in started} == before
    acknowledged = write_until_killed_worker(service, before)
    service.wait_for_line("Application startup complete", 30, count=3)
    assert len(set(_workers(service)) - before) == 1
    with service.client() as client:
        listed = {doc["id"] for doc in walk(client, limit=100)}
        assert set(acknowledged) <= listed
        response = client.post("/v1/documents", json={"title": "after", "content": "c"})
        assert response.status_code == 201


def test_workers_stop_when_their_supervisor_is_killed(
    service_factory: ServiceFactory, tmp_path: Path
) -> None:
    """Killed with kill -9 alone, the supervisor had left its workers serving the port they
    share, with the settings of their start, and the next start failed: address in use. The
    metrics directory it could not remove stayed in the temporary directory for good; the next
    start removes it, and never that of a service still running."""
    env = {"WORKERS": "2", "TMPDIR": str(tmp_path)}
    other = service_factory(tmp_path / "other", env=env).start(wait=False)
    other.wait_for_line("Application startup complete", 30, count=2)
    service = service_factory(env=env).start(wait=False)
    service.wait_for_line("Application startup complete", 30, count=2)
    assert service.proc is not None
    before = set(tmp_path.glob("documents-metrics-*"))
    assert len(before) == 2
    service.proc.kill()  # the supervisor alone, not its group
    service.proc.wait(10)
    service.wait_for_line("service.stopped", 30, count=2)  # each worker, gracefully
    assert set(tmp_path.glob("documents-metrics-*")) == before  # left by the kill
    service.start(wait=False)
    service.wait_for_line("Application startup complete", 30, count=2)
    with service.client() as client:
        assert client.get("/health/ready").status_code == 200
    after = set(tmp_path.glob("documents-metrics-*"))
    assert len(after) == 2
    assert len(after & before) == 1  # the killed one's went, not the other service's
    with other.client() as client:  # its workers' counts, in files of its directory
        assert client.get("/health/ready").status_code == 200
        assert 'http_requests_total{method="GET"' in client.get("/metrics").text


def test_requests_a_killed_worker_had_in_progress_stop_counting_once_it_is_replaced(
    service_factory: ServiceFactory,
) -> None:
    """A worker killed with kill -9 never marked its gauges dead: the requests it had in
    progress stayed in `http_requests_in_progress` for good. Its replacement marks them."""
    service = service_factory(env={"WORKERS": "2"}).start(wait=False)
    service.wait_for_line("Application startup complete", 30, count=2)
    head = f"POST /v1/documents HTTP/1.1\r\nHost: t\r\nX-API-Key: {KEY}\r\n"
    head += "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    stalled = [socket.create_connection(("127.0.0.1", service.port)) for _ in range(8)]
    with contextlib.ExitStack() as closing:
        for sock in stalled:  # spread over both workers by the kernel; each waits for its body
            closing.enter_context(sock)
            sock.sendall(head.encode())
        with service.client() as client:
            for _ in range(100):  # until every stalled request is in progress (and the scrape)
                if _in_progress(client) == len(stalled) + 1:
                    break
                time.sleep(0.05)
            assert _in_progress(client) == len(stalled) + 1
        for pid in _workers(service):
            os.kill(pid, signal.SIGKILL)
        service.wait_for_line("Application startup complete", 30, count=4)
    with service.client() as client:
        assert _in_progress(client) == 1  # the scrape's own


def _in_progress(client: httpx.Client) -> float:
    return sum(sample.value for sample in scrape(client)["http_requests_in_progress"].samples)


def write_until_killed_worker(service: Service, workers: set[int]) -> list[str]:
    """Writers on fresh connections while one worker is killed with kill -9; every 201 seen."""
    acknowledged: list[str] = []

    def writer(n: int) -> None:
        for i in range(20):
            try:
                with service.client() as client:
                    response = client.post(
                        "/v1/documents", json={"title": f"{n}-{i}", "content": "c"}
                    )
            except httpx.HTTPError:
                continue  # the killed worker's connection: never acknowledged
            if response.status_code == 201:
                acknowledged.append(response.json()["id"])

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    os.kill(min(workers), signal.SIGKILL)
    for thread in threads:
        thread.join()
    return acknowledged


@pytest.mark.parametrize("task", ["backup", "export", "seed"])
def test_a_task_file_named_as_a_directory_is_refused(tmp_path: Path, task: str) -> None:
    """A path drops a trailing slash: `backup newdir/` wrote a file named newdir."""
    result = run_task(tmp_path / "data", task, f"{tmp_path / 'newdir'}/")
    assert result.returncode == 2
    assert b"names a directory; name a file" in result.stderr
    assert not (tmp_path / "newdir").exists()


@pytest.mark.parametrize("task", ["backup", "export"])
def test_a_backup_or_export_of_a_directory_without_a_database_is_refused(
    tmp_path: Path, task: str
) -> None:
    """A DATA_DIR that is not the service's (a typo, a missing environment file) would copy a
    new, empty database: a backup that looks good and holds nothing."""
    wrong = tmp_path / "not-the-data"
    result = run_task(wrong, task, str(tmp_path / "copy"))
    assert result.returncode != 0
    assert b"no database at" in result.stderr
    assert not (tmp_path / "copy").exists()
    assert not (wrong / "documents.db").exists()


@pytest.mark.parametrize("task", ["backup", "export", "import"])
def test_a_task_never_migrates_an_empty_database(tmp_path: Path, task: str) -> None:
    """An empty SQLite file where the database should be (made by hand, or a start killed
    before its migration): a task made it a store, and a backup or export of it looked good."""
    data = tmp_path / "data"
    data.mkdir()
    sqlite3.connect(data / "documents.db").execute("PRAGMA journal_mode = WAL").connection.close()
    before = (data / "documents.db").read_bytes()
    (tmp_path / "in.jsonl").write_text("")
    result = run_task(data, task, str(tmp_path / ("in.jsonl" if task == "import" else "copy")))
    assert result.returncode != 0
    assert b"is an empty database" in result.stderr
    assert not (tmp_path / "copy").exists()
    assert (data / "documents.db").read_bytes() == before
