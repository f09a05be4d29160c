"""A hostile client: every input costs time linear in its size and bounded memory before a key is
checked, is refused with a 4xx (or the connection closed), and changes nothing."""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

import bodies
from config import Settings
from conftest import (
    KEY,
    OTHER_KEY,
    SPARSE,
    Service,
    ServiceFactory,
    assert_problem,
    make_settings,
    run_threads,
    scrape,
    seed_common,
)
from logging_config import CLIENT_TEXT_MAX
from main import create_app
from models import Problem
from server import (
    HEAD_TIMEOUT,
    KEEP_ALIVE_TIMEOUT,
    MAX_BODY_FRAMING_BYTES,
    MAX_BODY_PIECES,
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    MAX_PIPELINED,
    MAX_PIPELINED_BYTES,
    SEND_TIMEOUT,
)

KB = 1024
MB = 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    service = Service(tmp_path_factory.mktemp("hostile-http") / "data").start()
    yield service
    service.stop_quietly()


def exchange(service: Service, head: bytes, *, more: Iterable[bytes] = ()) -> bytes:
    """Send raw bytes (no client library fixing them up) and read until the server closes."""
    with socket.create_connection(("127.0.0.1", service.port), timeout=HEAD_TIMEOUT + 10) as sock:
        with contextlib.suppress(OSError):  # the server may close while we still send
            sock.sendall(head)
            for chunk in more:
                sock.sendall(chunk)
        received = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                received += chunk
        return received


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response else 0


# --- request heads: size, count, time ---------------------------------------------------------


def test_requests_pipelined_past_the_bound_end_the_connection_and_a_few_are_answered(
    server: Service,
) -> None:
    """Ten thousand keyless requests in one write would queue ten thousand behind the
    one answered; past MAX_PIPELINED the connection ends once those before are answered. A
    client that pipelines a few gets every answer, in order."""
    request = b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"
    flood = exchange(server, request * 10_000)
    assert flood.count(b"HTTP/1.1 404") <= MAX_PIPELINED + 2
    last = b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    few = exchange(server, request * (MAX_PIPELINED - 1) + last)
    assert few.count(b"HTTP/1.1 404") == MAX_PIPELINED


def test_requests_pipelined_past_the_byte_bound_end_the_connection_and_small_heads_pass(
    server: Service,
) -> None:
    """Fewer than MAX_PIPELINED keyless requests, each with a head just under MAX_HEAD_BYTES, would
    hold half a megabyte per connection; past MAX_PIPELINED_BYTES of queued heads the connection
    ends once those before are answered. A few large heads, like many small ones, are all
    answered."""
    big = (
        b"GET /nowhere HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"v" * (MAX_HEAD_BYTES - 100) + b"\r\n\r\n"
    )
    flood = exchange(server, big * (MAX_PIPELINED // 2))
    assert flood.count(b"HTTP/1.1 404") <= 2 + MAX_PIPELINED_BYTES // len(big)
    last = b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    few = exchange(server, big * (MAX_PIPELINED_BYTES // len(big)) + last)
    assert few.count(b"HTTP/1.1 404") == MAX_PIPELINED_BYTES // len(big) + 1


def _many(count: int, size: int) -> bytes:
    return b"".join(b"X-Filler-%d: %s\r\n" % (n, b"v" * size) for n in range(count))


HEADS: list[tuple[str, bytes]] = [
    ("101 headers", b"GET /health HTTP/1.1\r\nHost: x\r\n" + _many(MAX_HEADERS + 1, 1) + b"\r\n"),
    (
        "one 17 KiB header",
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 17 * KB + b"\r\n\r\n",
    ),
    ("50 headers of 400 bytes", b"GET /health HTTP/1.1\r\nHost: x\r\n" + _many(50, 400) + b"\r\n"),
    ("a 20 KiB path", b"GET /" + b"a" * 20 * KB + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
]


@pytest.mark.parametrize("head", [h[1] for h in HEADS], ids=[h[0] for h in HEADS])
def test_a_head_over_the_limits_gets_431_without_a_key(server: Service, head: bytes) -> None:
    response = exchange(server, head)
    assert status_of(response) == 431
    assert b"application/problem+json" in response
    assert Problem.model_validate_json(response.split(b"\r\n\r\n", 1)[1]).status == 431


# Requests the server refuses itself, less their method.
REFUSED: dict[str, bytes] = {
    "a malformed header": b" /v1/documents HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    "too many headers": b" /v1/documents HTTP/1.1\r\n" + _many(MAX_HEADERS + 1, 1) + b"\r\n",
    "a 20 KiB target": b" /v1/documents?" + b"a" * 20 * KB + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "a control character in the target": b" /v1/doc\x01uments HTTP/1.1\r\nHost: x\r\n\r\n",
}


# A request answered 200, less its method.
READ = f" /v1/documents?limit=1 HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n\r\n".encode()


def _framed(stream: bytes, methods: list[bytes]) -> list[tuple[int, bytes]]:
    """The answers to requests of `methods` in order, as a client frames them (RFC 9112): no
    content to a HEAD, else by Content-Length, or without one up to the close. Nothing may be
    left over."""
    answers = []
    for method in methods:
        head, _, stream = stream.partition(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length: *(\d+)", head)
        size = 0 if method == b"HEAD" else int(length[1]) if length else len(stream)
        assert len(stream) >= size  # as much content as announced
        answers.append((status_of(head), stream[:size]))
        stream = stream[size:]
    assert stream == b""
    return answers


@pytest.mark.parametrize("before", [b"", b"GET", b"HEAD"], ids=["alone", "after GET", "after HEAD"])
@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"HEADX"])
@pytest.mark.parametrize("rest", REFUSED.values(), ids=REFUSED)
def test_the_servers_own_refusals_are_framed_as_their_request_asks(
    server: Service, before: bytes, method: bytes, rest: bytes
) -> None:
    """An answer to HEAD has no content (RFC 9110): a client reads any as the next answer's
    start. The server's own refusals of a HEAD had sent their problem document, and then
    (when the method's letters began as HEAD's, or a request after a HEAD failed before its
    target) announced a length they did not send."""
    answered = before + READ if before else b""
    framed_as = [before] * bool(before) + [method]
    answers = _framed(exchange(server, answered + method + rest), framed_as)
    assert [status for status, _ in answers[:-1]] == [200] * bool(before)
    status, content = answers[-1]
    assert status in (400, 431)
    if method == b"GET":
        assert Problem.model_validate_json(content).status == status


def test_a_head_too_slow_is_framed_as_its_request_asks(server: Service) -> None:
    """The 408 for a head that stops after its method, or before it: what a client of that
    method can frame, with the problem document to a GET, after an answered HEAD too (whose
    method the parser still holds)."""
    cases = {  # what comes after a first read, if any: the answer is read before it is sent
        (b"HEAD ", b""): [b"HEAD"],
        (b"GET ", b""): [b"GET"],
        (b"HEAD" + READ, b"GET "): [b"HEAD", b"GET"],
        (b"HEAD" + READ, b"G"): [b"HEAD", b"G"],
        (b"HEAD" + READ, b"\r\n"): [b"HEAD", b"none"],
        (b"GET" + READ, b"HEAD "): [b"GET", b"HEAD"],
        (b"GET" + READ + b"GET /v1", b""): [b"GET", b"GET"],  # begun in the first's read
    }

    def exchange_in_turn(head: bytes, then: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(head)
            received = b""
            while then and not received.endswith(b"\r\n\r\n"):  # a HEAD's whole answer
                received += sock.recv(1)
            sock.sendall(then)
            return received + _read(sock)

    with ThreadPoolExecutor(len(cases)) as pool:  # their 10 s run at once
        streams = list(pool.map(lambda case: exchange_in_turn(*case), cases))
    for stream, methods in zip(streams, cases.values(), strict=True):
        *answered, (status, content) = _framed(stream, methods)
        assert [s for s, _ in answered] == [200] * len(answered)
        assert status == 408
        if methods[-1] == b"GET":
            assert Problem.model_validate_json(content).status == 408


@pytest.fixture(scope="module")
def paged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A service whose first page of 100 is about 1 MB."""
    service = Service(tmp_path_factory.mktemp("paged") / "data").start()
    with service.client() as client:
        for n in range(12):
            assert client.post("/v1/documents", json={"title": f"t{n}", "content": "x" * 99_000})
    yield service
    service.stop_quietly()


PAGE = f"GET /v1/documents?limit=100 HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n\r\n".encode()


def _pages_then(
    service: Service, pages: int, then: bytes, more: bytes, times: int = 1, **read: Any
) -> tuple[bytes, int]:
    """`pages` pages pipelined and `then`, read by a client with a 4 KiB receive buffer, so
    that the answers wait for it (`read`: see _read); once the first answer has begun, it sends
    `more` up to `times` times as it reads. What it read, and how much of `more` it sent."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * KB)
        sock.connect(("127.0.0.1", service.port))
        sock.sendall(PAGE * pages + then)
        received = b""
        while not received.endswith(b"\r\n\r\n"):
            received += sock.recv(1)
        sent = 0

        def send() -> None:
            nonlocal sent
            with contextlib.suppress(OSError):  # the server ended the connection
                for _ in range(times):
                    sock.sendall(more)
                    sent += len(more)

        with ThreadPoolExecutor(1) as pool:
            pool.submit(send)
            received += _read(sock, **read)
        return received, sent


def test_a_refusal_comes_after_the_answers_to_the_requests_before_it(paged: Service) -> None:
    """Eight pages of about 1 MB pipelined, then a head over the limits while their answers wait for
    the client: each is answered, in order, then the 431. It had been written at once, between
    two answers, and those after it followed its `connection: close`."""
    long_head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 17 * KB
    answers = _framed(_pages_then(paged, 8, b"", long_head)[0], [b"GET"] * 9)
    assert [status for status, _ in answers] == [200] * 8 + [431]


# Requests that end their connection, with the statuses of the answers after the pages.
ENDS: dict[str, tuple[bytes, list[int]]] = {
    "malformed": (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", [400]),
    "a body past the pipelining bound": (
        b"POST /v1/documents HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n",
        [],
    ),
}


@pytest.mark.parametrize("flood", [False, True], ids=["256 KiB more", "a flood"])
@pytest.mark.parametrize(("end", "statuses"), ENDS.values(), ids=ENDS)
def test_every_answer_before_a_close_reaches_a_client_still_sending(
    paged: Service, end: bytes, statuses: list[int], flood: bool
) -> None:
    """Four pages of about 1 MB pipelined, then a request that ends the connection, and the
    client goes on sending (the body, or anything) while it reads: it gets every answer whole
    (`_framed`), then the end. Closed with those bytes unread, or before they came, the
    connection had been reset, and the kernel had dropped what it still held of the pages; so
    it had after 4 MiB of them (LINGER_BYTES). The server reads at most that much, and what the
    buffers between hold, of a flood sent while the client reads at 2 MB/s (it had read and
    dropped gigabytes)."""
    if not flood:
        stream, _ = _pages_then(paged, 4, end, b"a" * 256 * KB)
    else:  # a reset may end it, once every answer has been taken
        stream, sent = _pages_then(
            paged, 4, end, b"a" * MB, 256, bytes_per_second=2 * MB, reset_ends=True
        )
        assert sent < 32 * MB
    answers = _framed(stream, [b"GET"] * (4 + len(statuses)))
    assert [status for status, _ in answers] == [200] * 4 + statuses


def test_an_endless_head_is_cut_off_while_memory_stays_flat(server: Service) -> None:
    before = server.rss_kb()

    def headers() -> Iterator[bytes]:
        for _ in range(400):  # 400 MiB if the server kept reading
            yield _many(1000, 1000)

    def value() -> Iterator[bytes]:
        for _ in range(200):  # one 200 MiB header value
            yield b"v" * MB

    for more, start in ((headers(), b""), (value(), b"User-Agent: ")):
        response = exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\n" + start, more=more)
        assert status_of(response) == 431
    assert server.rss_kb() - before < 10 * KB
    with server.client() as client:
        assert client.get("/health").status_code == 200


def _chunked(body: bytes, pieces: int) -> bytes:
    """`body` in chunked encoding, cut into `pieces` chunks (the last takes the rest)."""
    size = len(body) // pieces
    cuts = [body[n * size : (n + 1) * size] for n in range(pieces - 1)] + [
        body[(pieces - 1) * size :]
    ]
    return b"".join(b"%x\r\n%s\r\n" % (len(cut), cut) for cut in cuts) + b"0\r\n\r\n"


@pytest.mark.parametrize(
    ("headers", "chunked"),
    [
        ("Content-Type: application/json\r\nContent-Encoding: identity\r\nContent-Encoding: br", 0),
        ("Content-Type: application/json\r\nTransfer-Encoding: gzip, chunked", 1),
        (
            "Content-Type: application/json\r\nTransfer-Encoding: x-foo\r\n"
            "Transfer-Encoding: chunked",
            1,
        ),
        ("Content-Type: application/json; charset =latin1", 0),
        ("Content-Type: application/json; charset*=utf-16''", 0),
        ("Content-Type: application/json\r\nContent-Type: text/plain", 0),
        ("Content-Type: application/json\xa0", 0),
        ("Content-Type: application/json\r\nContent-Encoding: identity\x85", 0),
    ],
    ids=[
        "a coding on a second line",
        "a transfer coding before chunked",
        "a transfer coding on a line of its own",
        "a charset spelt with a space",
        "a charset in RFC 8187 form",
        "a second media type",
        "a media type with a no-break space",
        "a coding with a next-line character",
    ],
)
def test_a_body_labelled_with_a_coding_or_another_charset_is_refused_unstored(
    server: Service, headers: str, chunked: int
) -> None:
    """Nothing decodes a content coding or a transfer coding but chunked, and JSON is UTF-8:
    each of these was stored as sent (201), the first line of each header alone checked."""
    body = b'{"title": "labelled", "content": "c"}'
    length = "" if chunked else f"Content-Length: {len(body)}\r\n"
    head = (
        f"POST /v1/documents HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\nConnection: close\r\n"
        f"{headers}\r\n{length}\r\n"
    ).encode("latin-1")  # a byte per character, as HTTP sends them
    response = exchange(server, head + (_chunked(body, 2) if chunked else body))
    assert status_of(response) == 415
    with server.client() as client:
        assert "labelled" not in [d["title"] for d in client.get("/v1/documents").json()["items"]]


def test_an_http_1_0_request_with_a_transfer_coding_is_refused_unstored(server: Service) -> None:
    """HTTP/1.0 has no transfer codings (RFC 9112 6.1): a proxy of that version reads such a
    body by its length or to the end, not in chunks, so the framing is faulty. It was stored."""
    body = b'{"title": "ten", "content": "c"}'
    head = (
        f"POST /v1/documents HTTP/1.0\r\nHost: x\r\nX-API-Key: {KEY}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    assert status_of(exchange(server, head + _chunked(body, 1))) == 400
    with server.client() as client:
        assert "ten" not in [d["title"] for d in client.get("/v1/documents").json()["items"]]


@pytest.mark.parametrize(
    ("version", "hosts", "status"),
    [
        ("1.1", "", 400),
        ("1.1", "Host: a\r\nHost: b\r\n", 400),
        ("1.1", "Host: a, b\r\n", 400),
        ("1.1", "Host: user@a\r\n", 400),
        ("1.1", "Host: a/b\r\n", 400),
        ("1.1", "Host: [::1\r\n", 400),
        ("1.1", "Host: a:80x\r\n", 400),
        ("1.0", "Host: a b\r\n", 400),
        ("1.1", "Host: \r\n", 400),
        ("1.1", "Host: :80\r\n", 400),
        ("1.1", "Host: %zz\r\n", 400),
        ("1.1", "Host: [zz]\r\n", 400),
        ("1.1", "Host: [::1]:8000\r\n", 200),
        ("1.1", "Host: a%2Db.example\r\n", 200),
        ("1.0", "", 200),
    ],
    ids=[
        "HTTP/1.1 without Host",
        "two Host fields",
        "two hosts in one field",
        "a user in Host",
        "a path in Host",
        "an IP literal unclosed",
        "a port that is not a number",
        "HTTP/1.0 with a space in Host",
        "an empty Host",
        "a port alone",
        "a bad escape",
        "an IP literal that is no address",
        "an IPv6 literal and a port",
        "an escape",
        "HTTP/1.0 without Host",
    ],
)
def test_a_request_without_its_one_host_header_gets_400(
    server: Service, version: str, hosts: str, status: int
) -> None:
    """RFC 9112 3.2: an HTTP/1.1 request without Host, any with two, or one whose Host names no
    host, is a 400; all had been served."""
    # Connection: close, or a request served would wait out the keep-alive timeout.
    head = (
        f"GET /v1/documents HTTP/{version}\r\n{hosts}X-API-Key: {KEY}\r\nConnection: close\r\n\r\n"
    )
    assert status_of(exchange(server, head.encode())) == status


@pytest.mark.parametrize("between", [0, 1, 3], ids=["right behind", "behind one", "behind three"])
def test_a_malformed_request_pipelined_behind_a_write_is_refused_after_its_answer(
    server: Service, between: int
) -> None:
    """The write's answer had been dropped for the 400, then the write committed: its client
    took the 400 for its answer. Requests queued between had been dropped unanswered."""
    body = b'{"title": "pipelined", "content": "c"}'
    write = (
        f"POST /v1/documents HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    read = f"GET /v1/documents HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n\r\n".encode()
    response = exchange(server, write + read * between + b"GET / HTTP/1.1\r\nHost x\r\n\r\n")
    answers = re.findall(rb"HTTP/1.1 (\d{3}) ", response)
    assert answers == [b"201", *[b"200"] * between, b"400"]
    with server.client() as client:
        assert "pipelined" in [d["title"] for d in client.get("/v1/documents").json()["items"]]


def _write(title: str) -> bytes:
    body = json.dumps({"title": title, "content": "c"}).encode()
    return (
        f"POST /v1/documents HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def _titles(server: Service) -> list[str]:
    with server.client() as client:
        items = client.get("/v1/documents", params={"limit": 100}).json()["items"]
    return [d["title"] for d in items]


@pytest.mark.parametrize("bound", ["count", "bytes"])
def test_requests_pipelined_past_a_bound_behind_a_write_leave_its_answer(
    server: Service, bound: str
) -> None:
    """Past MAX_PIPELINED or MAX_PIPELINED_BYTES the connection had been reset at once: the
    write being answered committed unanswered, and the requests queued were dropped. Now those
    before the one past the bound are answered, then the connection closes."""
    title = f"pipelined past the {bound}"
    if bound == "count":
        queued = [b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"] * (MAX_PIPELINED + 8)
    else:
        pad = b"v" * (MAX_PIPELINED_BYTES // 3)
        queued = [b"GET /nowhere HTTP/1.1\r\nHost: x\r\nX-Pad: " + pad + b"\r\n\r\n"] * 4
    answers = re.findall(rb"HTTP/1.1 (\d{3}) ", exchange(server, _write(title) + b"".join(queued)))
    assert answers == [b"201"] + [b"404"] * (MAX_PIPELINED if bound == "count" else 2)
    assert title in _titles(server)


@pytest.mark.parametrize("split", [False, True], ids=["in its write", "after its answer"])
def test_nothing_sent_after_an_upgrade_request_is_read(server: Service, split: bool) -> None:
    """No other protocol is taken up here, but httptools stops at a request asking for one, and
    the rest of that read was dropped while later reads were parsed: a request in the same
    write went unanswered, one written a moment later was run. A proxy that sent a request's
    body there had it run as a request of its own (smuggled)."""
    upgrade = b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    title = f"after an upgrade, {'split' if split else 'whole'}"
    with socket.create_connection(("127.0.0.1", server.port), timeout=HEAD_TIMEOUT + 10) as sock:
        sock.sendall(upgrade if split else upgrade + _write(title))
        received = sock.recv(65536)
        with contextlib.suppress(OSError):  # the server may have closed
            if split:
                sock.sendall(_write(title))
            while chunk := sock.recv(65536):
                received += chunk
    assert re.findall(rb"HTTP/1.1 (\d{3}) ", received) == [b"404"]
    assert b"connection: close\r\n" in received.lower()
    assert title not in _titles(server)


def test_a_request_asking_to_upgrade_with_a_body_is_refused_unrun(server: Service) -> None:
    """httptools ends a request asking to Upgrade at its head: its body was dropped and the
    request run without it (`curl --http2` sends such a POST, and got 422 "Field required")."""
    body = b'{"title": "upgrading", "content": "c"}'
    head = (
        f"POST /v1/documents HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n"
        "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        "HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    response = exchange(server, head + body)
    assert status_of(response) == 400
    assert b"Upgrade" in response
    assert "upgrading" not in _titles(server)


def _answers(sock: socket.socket, received: bytes, count: int) -> bytes:
    """What `sock` sends until `count` responses have begun, or it closes."""
    while received.count(b"HTTP/1.1 ") < count and (chunk := sock.recv(65536)):
        received += chunk
    return received


def test_a_request_queued_with_its_body_still_coming_leaves_those_before_answered(
    server: Service,
) -> None:
    """Once the request before it was answered, a queued request whose body had not all come
    closed the connection: the write queued between committed, unanswered."""
    slow = _write("its body still coming")
    with socket.create_connection(("127.0.0.1", server.port), timeout=HEAD_TIMEOUT + 10) as sock:
        sock.sendall(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n" + _write("queued") + slow[:-5])
        received = _answers(sock, b"", 2)
        sock.sendall(slow[-5:])
        received = _answers(sock, received, 3)
    assert re.findall(rb"HTTP/1.1 (\d{3}) ", received) == [b"404", b"201", b"201"]
    assert {"queued", "its body still coming"} <= set(_titles(server))


@pytest.mark.parametrize(
    "head",
    [
        b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n",
        b"GET /health\r\n\r\n",
        b"GET ftp://x/health HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET http://user@x/health HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET http://@x/health HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /health#top HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=[
        "HTTP/2.0",
        "HTTP/0.9",
        "another scheme",
        "a user",
        "an empty user",
        "a fragment",
        "* but for OPTIONS",
    ],
)
def test_a_request_line_of_another_version_or_target_gets_400(server: Service, head: bytes) -> None:
    """httptools read HTTP/2.0 and HTTP/0.9 request lines as HTTP/1.x (a chunked body without
    Host was stored); a URI of another scheme or with a user was served as its path (RFC 9112
    3.2, RFC 9110 4.2.4). A URI of this server's is served as its path."""
    assert status_of(exchange(server, head)) == 400
    for this_server in (b"http://x/health", b"HTTP://x/health"):  # a scheme has no case
        request = b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % this_server
        assert status_of(exchange(server, request)) == 200


def test_an_http_1_0_client_is_sent_no_100_continue(server: Service) -> None:
    """RFC 9110 15.2: no 1xx goes to an HTTP/1.0 client, which reads the first status line as
    the answer; it was sent `100 Continue` before its 201."""
    body = b'{"title": "expecting", "content": "c"}'
    head = (
        f"POST /v1/documents HTTP/1.0\r\nHost: x\r\nX-API-Key: {KEY}\r\nExpect: 100-continue"
        f"\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    response = exchange(server, head + body)  # uvicorn wrote its 100 when the app read
    assert re.findall(rb"HTTP/1.\d (\d{3}) ", response) == [b"201"]


def test_trailer_fields_are_dropped_never_taken_for_headers(server: Service) -> None:
    """A chunked body's trailer fields do not join the request's headers: a trailer saying
    `Content-Encoding: gzip` got 415 when it came in the same write as the head, and 201 when
    it came a moment later."""
    body = b'{"title": "trailed", "content": "c"}'
    head = _post_head(f"X-API-Key: {KEY}\r\nConnection: close\r\n", "Transfer-Encoding: chunked")
    chunked = _chunked(body, 1).removesuffix(b"\r\n")  # room for trailer fields
    trailers = b"Content-Encoding: gzip\r\nContent-Type: text/plain\r\n\r\n"
    assert status_of(exchange(server, head + chunked + trailers)) == 201
    with server.client() as client:
        assert "trailed" in [d["title"] for d in client.get("/v1/documents").json()["items"]]


@pytest.mark.parametrize("key", [KEY, "not-a-key"], ids=["with a key", "without a key"])
def test_a_body_in_more_pieces_than_the_bound_is_refused_as_it_arrives(
    server: Service, key: str
) -> None:
    """Each chunk of a chunked body costs a parser callback: a body in 1-byte chunks cost a
    Python call per 6 bytes sent, 0.9 s of CPU for 2 MB. Past MAX_BODY_PIECES the connection is
    refused and closed, with or without a key; a body in about as many pieces as allowed is
    stored."""
    # Connection: close, or the request stored would wait out the keep-alive timeout.
    head = _post_head(f"X-API-Key: {key}\r\nConnection: close\r\n", "Transfer-Encoding: chunked")
    title = f"in pieces, {key}"
    body = b'{"title": "%s", "content": "%s"}' % (title.encode(), b"x" * 100_000)
    response = exchange(server, head, more=[_chunked(body, 30_000)])
    assert status_of(response) in (400, 401)
    if key == KEY:
        assert b"at most %d pieces" % MAX_BODY_PIECES in response
    # A chunk that two reads split arrives as two pieces: a few to spare for where reads end.
    allowed = exchange(server, head + _chunked(body, MAX_BODY_PIECES - 64))
    assert status_of(allowed) == (201 if key == KEY else 401)
    with server.client() as client:
        titles = [d["title"] for d in client.get("/v1/documents").json()["items"]]
        assert titles.count(title) == (key == KEY)


@pytest.mark.parametrize(
    "framing",
    [b"1;ext=" + b"e" * 64 * KB, b"0" * 64 * KB],
    ids=["a chunk extension without end", "a chunk size of endless leading zeros"],
)
def test_chunk_framing_past_the_bound_is_refused_as_it_arrives(
    server: Service, framing: bytes
) -> None:
    """The bytes around a chunk are no body bytes, so MAX_BODY_BYTES never counted them: a
    chunk extension that never ended was read at line speed until the body's deadline (15 GB,
    a core for 30 s, for one unit of a key's budget). Past MAX_BODY_FRAMING_BYTES of them the
    request is refused and its connection closed."""
    head = _post_head(f"X-API-Key: {KEY}\r\n", "Transfer-Encoding: chunked")
    response = exchange(server, head, more=[framing[: 64 * KB]] + [framing[-64 * KB :]] * 63)
    assert status_of(response) == 400
    assert b"%d KiB of chunk sizes" % (MAX_BODY_FRAMING_BYTES // KB) in response


def test_a_head_within_the_limits_is_served(server: Service) -> None:
    head = b"GET /health HTTP/1.1\r\nHost: x\r\n" + _many(40, 300) + b"Connection: close\r\n\r\n"
    assert len(head) < MAX_HEAD_BYTES
    assert status_of(exchange(server, head)) == 200


def test_slow_and_silent_connections_are_closed_and_others_are_served(server: Service) -> None:
    """Half-sent heads and connections that send nothing are closed
    once HEAD_TIMEOUT has passed; meanwhile the service answers everyone else."""
    sockets = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(40)]
    started = time.monotonic()
    try:
        for n, sock in enumerate(sockets):
            if n % 2:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        with server.client() as client:
            assert client.get("/health").status_code == 200
        for sock in sockets:
            sock.settimeout(HEAD_TIMEOUT + 10)
            received = b""
            with contextlib.suppress(OSError):
                while chunk := sock.recv(4096):
                    received += chunk
            assert status_of(received) == 408
        assert time.monotonic() - started < HEAD_TIMEOUT + 10
    finally:
        for sock in sockets:
            sock.close()


def test_an_idle_keep_alive_connection_is_closed(server: Service) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            f"GET /v1/documents?limit=0 HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n\r\n".encode()
        )
        sock.settimeout(KEEP_ALIVE_TIMEOUT + 10)
        first = b""
        while not first.endswith(b"}"):
            first += sock.recv(65536)
        assert status_of(first) == 422
        assert b"connection: close" not in first.lower()
        started = time.monotonic()
        assert sock.recv(65536) == b""  # closed by the server, not by us
        assert time.monotonic() - started < KEEP_ALIVE_TIMEOUT + 5


def test_white_space_after_a_header_value_is_not_part_of_it(server: Service) -> None:
    """RFC 9110 5.5: `X-API-Key: KEY ` names KEY, and an ETag sent with a tab after it is that
    ETag (the parser drops the white space before a value, not after)."""
    body = json.dumps({"title": "spaced", "content": "x"}).encode()
    head = (
        f"POST /v1/documents HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY} \t\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    created = exchange(server, head + body)
    assert status_of(created) == 201
    doc_id = json.loads(created.split(b"\r\n\r\n", 1)[1])["id"]
    read = exchange(
        server,
        f"GET /v1/documents/{doc_id} HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}  \r\n"
        'If-None-Match: "1"\t\r\nConnection: close\r\n\r\n'.encode(),
    )
    assert status_of(read) == 304


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
@pytest.mark.parametrize("path", ["/health", "/health/ready"])
def test_a_probe_ends_its_connection(server: Service, path: str, method: str) -> None:
    """A probe spends no budget, so a connection that polled one for ever, without a key, held
    one of MAX_CONNECTIONS for good: 1000 such made every keyed request a 503. Each probe's
    answer, whatever the method, now ends its connection."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        received = b""
        while chunk := sock.recv(65536):  # until the server closes
            received += chunk
    assert status_of(received) == (405 if method == "OPTIONS" else 200)
    assert b"connection: close" in received.lower()


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n", 200),
        (b"GET /nowhere HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", 404),
        (
            f"POST /v1/documents HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 99999999\r\n\r\n".encode(),
            413,
        ),
        (
            f"POST /v1/documents HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n"
            "Content-Length: 9999\r\n\r\n".encode(),
            415,
        ),
    ],
    ids=["unread body", "unread chunked body", "body over the limit", "body of no JSON type"],
)
def test_a_body_nobody_reads_ends_the_connection_once_answered(
    server: Service, head: bytes, status: int
) -> None:
    """Whoever answered before the body arrived, the server does not go on reading it at the
    client's pace: the connection closes right after the response, which says so."""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head + b"1\r\na\r\n")
        sock.settimeout(KEEP_ALIVE_TIMEOUT - 1)  # well before any idle timer could close it
        received = b""
        with contextlib.suppress(ConnectionResetError):  # closed while we still sent: closed
            while chunk := sock.recv(65536):  # a timeout here fails the test
                received += chunk
                with contextlib.suppress(OSError):
                    sock.sendall(b"a")
    assert status_of(received) == status
    assert received.lower().count(b"connection: close") == 1


def _read(
    sock: socket.socket,
    size: float = math.inf,
    bytes_per_second: float = math.inf,
    *,
    reset_ends: bool = False,
) -> bytes:
    """Read `size` bytes or until the server closes (or resets, if `reset_ends`), at most as
    fast as a client of that pace (the pace is the behaviour under test, not a wait for the
    server)."""
    received = bytearray()
    started = time.monotonic()
    with contextlib.suppress(*[ConnectionResetError] * reset_ends):
        while len(received) < size and (chunk := sock.recv(16 * KB)):
            received += chunk
            time.sleep(max(0.0, started + len(received) / bytes_per_second - time.monotonic()))
    return bytes(received)


def test_clients_that_do_not_read_are_reset_and_a_slow_reader_is_served(
    service_factory: ServiceFactory,
) -> None:
    """40 connections pipeline 5 to 8 requests for a page of 1 MiB and never read: the kernel
    takes a few pages, so each ends with a response in the server's buffer, either whole and
    idle (the keep-alive close waiting on it) or with the next request waiting to write it. 12
    more ask for one page of 400 KiB, which the kernel takes whole, and never read; closed (at
    the keep-alive timeout, or at once when the request says `Connection: close`), the kernel
    would go on holding it for minutes. Each is reset once it has taken nothing for
    SEND_TIMEOUT, with one log line, and their memory is freed (the `Connection: close` ones had
    been left to the kernel, whose measure of progress cut a steady reader too). Beside them, a
    client reads 8 pages, its first MiB at 40 KiB/s (over twice SEND_TIMEOUT), and gets every
    byte; another reads one 400 KiB page at 20 KiB/s (past the keep-alive timeout and
    SEND_TIMEOUT), gets it whole, then the close; so does a third, its request saying
    `Connection: close`, with a 16 KiB receive buffer."""
    # Two keys: each has fewer than its 32 requests in progress at once (admission.py).
    service = service_factory(env={"API_KEYS": f"alice:{KEY},bob:{OTHER_KEY}"}).start()
    with service.client() as client:
        for n in range(10):
            client.post("/v1/documents", json={"title": f"t{n}", "content": "x" * 100_000})
        assert len(client.get("/v1/documents", params={"limit": 100}).content) > 0.9 * MB
    baseline = service.rss_kb()
    head = f"GET /v1/documents?limit=100 HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n"
    request = f"{head}\r\n".encode()
    small = f"GET /v1/documents?limit=4 HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n"
    # The `Connection: close` ones first: their answers' ends come first.
    payloads = [f"{small}Connection: close\r\n\r\n".encode()] * 4
    payloads += [request * (5 + n % 4) for n in range(40)] + [f"{small}\r\n".encode()] * 8
    payloads = [
        p.replace(KEY.encode(), OTHER_KEY.encode()) if n % 2 else p for n, p in enumerate(payloads)
    ]

    def read_slowly_then_the_rest(sock: socket.socket) -> bytes:
        return _read(sock, MB, 40 * KB) + _read(sock)

    stalled = [socket.create_connection(("127.0.0.1", service.port)) for _ in payloads]
    with (
        socket.create_connection(("127.0.0.1", service.port)) as slow,
        socket.create_connection(("127.0.0.1", service.port)) as slow_small,
        socket.socket() as slow_close,
        ThreadPoolExecutor() as pool,
    ):
        slow.sendall(request * 7 + f"{head}Connection: close\r\n\r\n".encode())
        read = pool.submit(read_slowly_then_the_rest, slow)
        slow_small.sendall(f"{small}\r\n".encode())
        read_small = pool.submit(_read, slow_small, math.inf, 20 * KB)
        slow_close.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * KB)
        slow_close.connect(("127.0.0.1", service.port))
        slow_close.sendall(f"{small}Connection: close\r\n\r\n".encode())
        read_close = pool.submit(_read, slow_close, math.inf, 20 * KB)
        try:
            for sock, payload in zip(stalled, payloads, strict=True):
                sock.sendall(payload)
            service.wait_for_line(
                "connection.send_timeout",
                timeout=KEEP_ALIVE_TIMEOUT + 2 * SEND_TIMEOUT + 10,
                count=len(payloads),
            )
            for sock in stalled:
                sock.settimeout(5)
                with pytest.raises(ConnectionResetError):
                    _read(sock)  # what reached the client before the reset, then the reset
        finally:
            for sock in stalled:
                sock.close()
        received = read.result(timeout=60)
        received_small = read_small.result(timeout=60)
        received_close = read_close.result(timeout=60)
    assert received.count(b"HTTP/1.1 200 OK\r\n") == 8
    assert received.endswith(b"}")
    for whole in (received_small, received_close):
        small_head, _, small_body = whole.partition(b"\r\n\r\n")
        assert small_head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"content-length: %d\r\n" % len(small_body) in small_head
    assert service.rss_kb() - baseline < 20 * KB
    lines = service.output
    assert sum("connection.send_timeout" in line for line in lines) == len(payloads)
    assert not [line for line in lines if '"ERROR"' in line]


# --- work before authentication: decided from the head ---------------------------------------

READER = "reader-key-0003"
SPENDER = "spender-key-0004"


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """Small budgets, and a read-only key; each test sends as a client address of its own
    (X-Forwarded-For, trusted from 127.0.0.1 here, as from a proxy on this host)."""
    env = {
        "FORWARDED_ALLOW_IPS": "127.0.0.1",
        "API_KEYS": f"alice:{KEY},reader:{READER}:read,spender:{SPENDER}",
        "RATE_LIMIT": "3/minute",
        "KEYLESS_RATE_LIMIT": "3/minute",
    }
    service = Service(tmp_path_factory.mktemp("gate") / "data", env).start()
    yield service
    service.stop_quietly()


def _post_head(headers: str, framing: str = "Content-Length: 1000000") -> bytes:
    return (
        f"POST /v1/documents HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"{headers}{framing}\r\n\r\n"
    ).encode()


def _spend(
    service: Service, headers: dict[str, str], times: int = 3, path: str = "/v1/documents"
) -> None:
    with httpx.Client(base_url=service.url, headers=headers) as client:
        for _ in range(times):
            client.get(path)


@pytest.mark.parametrize(
    ("headers", "spent", "framing", "status"),
    [
        ("X-Forwarded-For: 198.51.100.1\r\n", {}, "Content-Length: 1000000", 401),
        ("X-Forwarded-For: 198.51.100.2\r\n", {}, "Transfer-Encoding: chunked", 401),
        (
            "X-Forwarded-For: 198.51.100.3\r\nX-API-Key: wrong-key-123\r\n",
            {},
            "Content-Length: 1000000",
            401,
        ),
        (
            "X-Forwarded-For: 198.51.100.4\r\n",
            {"X-Forwarded-For": "198.51.100.4"},
            "Content-Length: 1000000",
            429,
        ),
        (f"X-API-Key: {READER}\r\n", {}, "Content-Length: 1000000", 403),
        (f"X-API-Key: {SPENDER}\r\n", {"X-API-Key": SPENDER}, "Content-Length: 1000000", 429),
    ],
    ids=[
        "no key",
        "no key, chunked",
        "a wrong key",
        "no key, over the keyless budget",
        "a read-only key writes",
        "a key over its budget",
    ],
)
def test_a_refused_request_is_answered_from_its_head_and_the_connection_closed(
    gate: Service, headers: str, spent: dict[str, str], framing: str, status: int
) -> None:
    """The client sends the head and a few bytes of a 1 MB body, then waits: the refusal comes
    without the body being read, and the server ends the connection."""
    if spent:
        _spend(gate, spent)
    with socket.create_connection(("127.0.0.1", gate.port)) as sock:
        first = b'{"title": '
        if "chunked" in framing:
            first = b"a\r\n" + first + b"\r\n"
        sock.sendall(_post_head(headers, framing) + first)
        sock.settimeout(5)  # far below BODY_TIMEOUT_SECONDS: a server that waits fails here
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert status_of(received) == status
    assert Problem.model_validate_json(received.split(b"\r\n\r\n", 1)[1]).status == status


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/v1/documents", "", 401),
        ("/v1/documents", f"X-API-Key: {'w' * 32}\r\n", 401),
        ("/v1/documents", "X-Forwarded-For: 198.51.100.9\r\n", 429),
        ("/metrics", "X-Forwarded-For: 198.51.100.10\r\n", 429),
    ],
    ids=[
        "no key",
        "a wrong key",
        "no key, over the keyless budget",
        "no key, scraping /metrics over the keyless budget",
    ],
)
def test_a_refusal_without_a_body_ends_its_connection_too(
    gate: Service, path: str, headers: str, status: int
) -> None:
    """A refused client keeps no connection open to go on being refused on it. A /metrics render
    costs a stranger its budget too: a flood of them is refused as cheaply."""
    if status == 429:
        client = headers.removeprefix("X-Forwarded-For: ").strip()
        _spend(gate, {"X-Forwarded-For": client}, path=path)
    with socket.create_connection(("127.0.0.1", gate.port)) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
        sock.settimeout(3)  # below the keep-alive timeout: a connection kept open fails here
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert status_of(received) == status
    assert b"connection: close" in received.lower()


def test_heads_uvicorn_cannot_parse_or_upgrade_write_no_log_line(
    service_factory: ServiceFactory,
) -> None:
    """Such a head is answered before any budget applies: a line each would let a flood of
    them write without bound."""
    service = service_factory().start()
    upgrade = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: %s\r\n\r\n"
    for _ in range(10):
        assert status_of(exchange(service, b"GARBAGE\r\n\r\n")) == 400
        for protocol in (b"websocket", b"h2c"):
            with socket.create_connection(("127.0.0.1", service.port), timeout=5) as sock:
                sock.sendall(upgrade % protocol)
                assert status_of(sock.recv(65536)) == 200
    service.stop_quietly()
    lines = service.rest_of_output().splitlines()
    assert not [line for line in lines if '"WARNING"' in line or "upgrade" in line.lower()]


@pytest.mark.parametrize(
    ("trusted", "first", "second", "status"),
    [
        ("127.0.0.1", "203.0.113.7", "203.0.113.8", 401),
        ("", "203.0.113.7", "203.0.113.8", 429),
        ("10.0.0.1", "203.0.113.7", "203.0.113.8", 429),
        ("127.0.0.1", "2001:db8::1", "2001:db8::2", 429),
        ("127.0.0.1", "2001:db8::1", "2001:db8:0:1::1", 401),
    ],
    ids=[
        "a trusted proxy's clients apart",
        "no proxy trusted by default, this machine included",
        "an untrusted peer's forwarded address ignored",
        "one IPv6 /64 is one client",
        "another /64 is another client",
    ],
)
def test_the_keyless_budget_is_per_client_behind_a_trusted_proxy(
    service_factory: ServiceFactory, trusted: str, first: str, second: str, status: int
) -> None:
    env = {"KEYLESS_RATE_LIMIT": "2/minute"} | ({"FORWARDED_ALLOW_IPS": trusted} if trusted else {})
    service = service_factory(env=env).start()
    _spend(service, {"X-Forwarded-For": first}, times=2)
    with httpx.Client(base_url=service.url) as client:
        assert client.get("/v1/documents", headers={"X-Forwarded-For": first}).status_code == 429
        assert client.get("/v1/documents", headers={"X-Forwarded-For": second}).status_code == (
            status
        )
        # A valid key from the very same address is never charged for the strangers' budget.
        keyed = {"X-Forwarded-For": first, "X-API-Key": KEY}
        assert client.get("/v1/documents", headers=keyed).status_code == 200


def test_stalled_bodies_without_a_key_cost_no_memory(server: Service) -> None:
    """150 connections each send 1 MB minus a byte without a key, then stall: each is refused
    from its head, so none of those bytes is held."""
    before = server.rss_kb()
    head = _post_head("", f"Content-Length: {MB}")
    sockets = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(150)]
    try:
        for sock in sockets:
            sock.settimeout(10)
            with contextlib.suppress(OSError):  # refused and closed while we still send
                sock.sendall(head + b"x" * (MB - 1))
        assert server.rss_kb() - before < 30 * KB
    finally:
        for sock in sockets:
            sock.close()
    with server.client() as client:
        assert client.get("/health").status_code == 200


def _in_progress(service: Service) -> float:
    with httpx.Client(base_url=service.url) as client:
        text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return families["http_requests_in_progress"].samples[0].value


CAROL = "carol-key-0005"


def test_bodies_held_at_once_are_bounded_across_connections(
    service_factory: ServiceFactory,
) -> None:
    """Two keys' uploads of 1 MB stall and hold the 2 MB allowed; a third key's body gets 503
    with Retry-After instead of being read; once they end, bodies are read again."""
    env = {
        "API_KEYS": f"alice:{KEY},bob:{OTHER_KEY},carol:{CAROL}",
        "MAX_CONTENT_CHARS": "30000",  # so that 1 MB holds the largest valid document
        "MAX_BODY_BYTES": str(MB),
        "MAX_BUFFERED_BODY_BYTES": str(2 * MB),
    }
    service = service_factory(env=env).start()
    stalled = [socket.create_connection(("127.0.0.1", service.port)) for _ in range(2)]
    try:
        for sock, key in zip(stalled, (KEY, OTHER_KEY), strict=True):
            sock.sendall(_post_head(f"X-API-Key: {key}\r\n", f"Content-Length: {MB}"))
        deadline = time.monotonic() + 10
        while _in_progress(service) < 3:  # both uploads and this scrape are being served
            assert time.monotonic() < deadline
        with service.client(CAROL) as client:
            busy = client.post("/v1/documents", json={"title": "t", "content": "c"})
            problem = assert_problem(busy, 503)
            assert busy.headers["retry-after"] == "1"
            assert "retry" in problem["detail"]
    finally:
        for sock in stalled:
            sock.close()
    with service.client() as client:
        deadline = time.monotonic() + 10
        while (
            created := client.post("/v1/documents", json={"title": "t", "content": "c"})
        ).status_code == 503:
            assert time.monotonic() < deadline  # until the server has seen both uploads end
        assert created.status_code == 201
        assert [d["title"] for d in client.get("/v1/documents").json()["items"]] == ["t"]


def test_one_key_holds_at_most_a_quarter_of_the_bodies_held_at_once(
    service_factory: ServiceFactory,
) -> None:
    """One key's uploads declare 1 MB each and send nothing, to fill MAX_BUFFERED_BODY_BYTES:
    they fill the key's quarter of it, and each further body of that key gets 503 with
    Retry-After from its head; another key's bodies are still read and stored."""
    env = {
        "API_KEYS": f"alice:{KEY},bob:{OTHER_KEY}",
        "MAX_CONTENT_CHARS": "30000",  # so that 1 MB holds the largest valid document
        "MAX_BODY_BYTES": str(MB),
        "MAX_BUFFERED_BODY_BYTES": str(4 * MB),
    }
    service = service_factory(env=env).start()
    stalled = socket.create_connection(("127.0.0.1", service.port))
    try:
        stalled.sendall(_post_head(f"X-API-Key: {KEY}\r\n", f"Content-Length: {MB}"))
        deadline = time.monotonic() + 10
        while _in_progress(service) < 2:  # the upload and this scrape are being served
            assert time.monotonic() < deadline
        for _ in range(3):  # the rest of the budget, wanted by the same key: refused at once
            refused = exchange(
                service, _post_head(f"X-API-Key: {KEY}\r\n", f"Content-Length: {MB}")
            )
            assert status_of(refused) == 503
            assert b"retry-after: 1" in refused
        with service.client(KEY) as alice:
            problem = assert_problem(
                alice.post("/v1/documents", json={"title": "t", "content": "c"}), 503
            )
            assert "key" in problem["detail"]
        with service.client(OTHER_KEY) as bob:
            body = {"title": "bob's", "content": "x" * 30_000}
            assert bob.post("/v1/documents", json=body).status_code == 201
    finally:
        stalled.close()


def test_a_key_has_at_most_32_requests_in_progress(service_factory: ServiceFactory) -> None:
    """Read time is charged once a request is answered: a key's 33rd request while 32 are in
    progress gets 429 from its head, whatever its budget, so a burst cannot run ahead of what
    it pays. Another key is served; the first is again once its requests end."""
    service = service_factory(env={"API_KEYS": f"alice:{KEY},bob:{OTHER_KEY}"}).start()
    held = [socket.create_connection(("127.0.0.1", service.port)) for _ in range(32)]
    try:
        for sock in held:  # in progress until their bodies come
            sock.sendall(_post_head(f"X-API-Key: {KEY}\r\n", "Content-Length: 100"))
        deadline = time.monotonic() + 10
        while _in_progress(service) < 33:  # the 32 and this scrape are being served
            assert time.monotonic() < deadline
        with service.client(KEY) as alice:
            busy = alice.get("/v1/documents")
            assert "32 requests in progress" in assert_problem(busy, 429)["detail"]
            assert busy.headers["retry-after"] == "1"
        with service.client(OTHER_KEY) as bob:
            assert bob.get("/v1/documents").status_code == 200
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    with service.client(KEY) as alice:
        while alice.get("/v1/documents").status_code == 429:
            assert time.monotonic() < deadline  # until the server has seen the 32 end


def test_one_address_holds_at_most_a_tenth_of_the_connections(
    service_factory: ServiceFactory,
) -> None:
    """Connections that send nothing, opened again as the head timeout closes them, held every
    one of MAX_CONNECTIONS from one address. Past a tenth of them, that address's next gets 503
    at once (and holds no slot), and is served again once one of its own closes. No address is
    a trusted proxy by default, this machine's included (a trusted proxy's connections are not
    counted)."""
    env = {"MAX_CONNECTIONS": "20"}
    service = service_factory(env=env).start()
    silent = [socket.create_connection(("127.0.0.1", service.port)) for _ in range(2)]
    try:
        refused = exchange(service, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(refused) == 503
        assert b"as one address may" in refused
        assert b"retry-after: 1" in refused
        # Refused, they hold no slot, however many the address opens and keeps: another address
        # is served (refusals had lingered, and filled every slot).
        more = [socket.create_connection(("127.0.0.1", service.port)) for _ in range(25)]
        try:
            for sock in more:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            with socket.socket() as other:
                other.bind(("127.0.0.2", 0))
                other.connect(("127.0.0.1", service.port))
                other.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                assert status_of(other.recv(65536)) == 200
        finally:
            for sock in more:
                sock.close()
    finally:
        silent.pop().close()
    try:
        deadline = time.monotonic() + 10
        while status_of(exchange(service, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")) != 200:
            assert time.monotonic() < deadline  # until the server has seen one close
    finally:
        for sock in silent:
            sock.close()


def test_connections_past_the_limit_get_503_at_once(service_factory: ServiceFactory) -> None:
    # As behind a proxy on this host: its connections are not held to one address's tenth.
    env = {"MAX_CONNECTIONS": "8", "FORWARDED_ALLOW_IPS": "127.0.0.1"}
    service = service_factory(env=env).start()
    held = [socket.create_connection(("127.0.0.1", service.port)) for _ in range(8)]
    try:
        for sock in held:  # each is served, so each is open on the server's side
            sock.sendall(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")  # a probe would close
            assert status_of(sock.recv(65536)) == 404
            sock.sendall(b"GET /health HTTP/1.1\r\n")  # and kept open by a head under way
        refused = exchange(service, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(refused) == 503
        assert b"retry-after: 1" in refused
        assert Problem.model_validate_json(refused.split(b"\r\n\r\n", 1)[1]).status == 503
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while (
        status_of(
            exchange(service, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        )
        != 200
    ):
        assert time.monotonic() < deadline  # until the server has seen the others close


@pytest.mark.parametrize(
    "head",
    [
        b"FOO / HTTP/1.1\r\n\r\n",
        b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01garbage\r\n\r\n",
    ],
    ids=["unknown method", "raw byte in the path", "TLS to a plain port"],
)
def test_what_is_not_http_gets_a_400_problem_and_the_connection_closed(
    server: Service, head: bytes
) -> None:
    response = exchange(server, head)
    assert status_of(response) == 400
    assert b"application/problem+json" in response
    assert Problem.model_validate_json(response.split(b"\r\n\r\n", 1)[1]).status == 400


def test_a_body_that_stops_arriving_gets_408_once_the_body_timeout_passes(tmp_path: Path) -> None:
    service = Service(tmp_path / "data", {"BODY_TIMEOUT_SECONDS": "1"}).start()
    try:
        head = (
            f"POST /v1/documents HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        ).encode()

        response = exchange(service, head + b'{"title": "t", ')  # and the rest never comes
        assert status_of(response) == 408
        assert b"application/problem+json" in response
        with service.client() as client:
            assert client.get("/v1/documents").json()["items"] == []
    finally:
        service.stop_quietly()


# --- logs: every client-controlled field is bounded -------------------------------------------


def test_long_paths_user_agents_and_forwarded_addresses_are_cut_in_the_access_line(
    service_factory: ServiceFactory,
) -> None:
    server = service_factory(env={"FORWARDED_ALLOW_IPS": "127.0.0.1"}).start()
    with server.client() as client:
        long_path = "/v1/documents/" + "p" * 6000
        headers = {"User-Agent": "u" * 8000, "X-Forwarded-For": "f" * 1000}
        assert_problem(client.get(long_path, headers=headers), 404)
    line = json.loads(server.wait_for_line("/v1/documents/pppp", timeout=10))
    for field in ("path", "user_agent", "client"):
        assert len(line[field]) < CLIENT_TEXT_MAX + 50
        assert "more characters" in line[field]
    assert len(json.dumps(line)) < 4 * KB


# --- bodies: linear cost ----------------------------------------------------------------------


def _object(keys: int) -> bytes:
    pairs = ",".join(f'"k{n}": {n}' for n in range(keys))
    return b'{"title": "t", "content": "x", "metadata": {%s, "k0": 0}}' % pairs.encode()


def _tags(count: int) -> bytes:
    return json.dumps(
        {"title": "t", "content": "x", "tags": [f"t{n}" for n in range(count)]}
    ).encode()


def _nested(depth: int) -> bytes:
    return b'{"title": "t", "content": "x", "metadata": ' + b"[" * depth + b"]" * depth + b"}"


def _bad_values(count: int) -> bytes:
    pairs = ",".join(f'"k{n}": [1]' for n in range(count))
    return b'{"title": "t", "content": "x", "metadata": {%s}}' % pairs.encode()


def _unknown_fields(count: int) -> bytes:
    pairs = ",".join(f'"f{n}": 1' for n in range(count))
    return b'{"title": "t", "content": "x", %s}' % pairs.encode()


def _escapes(count: int) -> bytes:
    return b'{"title": "t", "content": "' + b"\\u00e9" * count + b'"}'


# Most past MAX_VALUES: refused before they are parsed, in time linear all the same.
BODIES: list[tuple[str, Callable[[int], bytes], int]] = [
    ("keys with the last repeated", _object, 400),
    ("tags", _tags, 400),
    ("nested arrays", _nested, 400),
    ("escapes in a string", _escapes, 201),
    ("metadata values of a wrong type", _bad_values, 400),
    ("unknown fields", _unknown_fields, 400),
]


@pytest.mark.parametrize(("make", "status"), [b[1:] for b in BODIES], ids=[b[0] for b in BODIES])
def test_reading_a_body_costs_time_linear_in_its_size(
    client: TestClient, make: Callable[[int], bytes], status: int
) -> None:
    """Four times the body, at most about four times the time: the minimum of several runs of
    each, as a ratio (a quadratic step shows as 16). It counts this process's CPU time, not the
    clock, so other work on the machine does not show; the two sizes take turns all the same.
    Whatever the body, the answer stays small."""
    headers = {"Content-Type": "application/json"}
    bodies = {size: make(size) for size in (1000, 12_500, 50_000)}
    assert all(len(body) < MB for body in bodies.values())

    def run(size: int) -> float:
        gc.collect()  # start each run from the same heap
        started = time.process_time()
        response = client.post("/v1/documents", content=bodies[size], headers=headers)
        elapsed = time.process_time() - started
        assert response.status_code == status, response.text[:200]
        assert status < 400 or len(response.content) < 16 * KB
        return elapsed

    run(1000)  # warm up
    timings: dict[int, list[float]] = {12_500: [], 50_000: []}
    for _ in range(5):
        for size, seen in timings.items():
            seen.append(run(size))
    assert min(timings[50_000]) / min(timings[12_500]) < 8


def test_integer_literals_cost_no_more_than_a_string_as_long(client: TestClient) -> None:
    """CPython converts an integer literal in time quadratic in its digits: 400 literals of 4 000
    digits held the event loop for about 100 ms, where a string as long costs a few. Both are
    refused (no document holds either); the minimum CPU time of several runs of each, in turns."""
    numbers = b'{"title": "t", "content": "x", "metadata": {"n": [%s]}}' % b",".join(
        [b"9" * 4_000] * 400
    )
    string = b'{"title": "t", "content": "x", "metadata": {"n": "%s"}}' % (b"9" * len(numbers))
    cpu = _least_cpu_to_refuse(client, numbers, string)
    assert cpu[numbers] < 3 * cpu[string]


def _least_cpu_to_refuse(client: TestClient, *bodies: bytes) -> dict[bytes, float]:
    """The least CPU time of five posts of each body, in turns, each refused with 422."""
    headers = {"Content-Type": "application/json"}
    timings: dict[bytes, list[float]] = {body: [] for body in bodies}
    for _ in range(5):
        for body, seen in timings.items():
            started = time.process_time()
            assert_problem(client.post("/v1/documents", content=body, headers=headers), 422)
            seen.append(time.process_time() - started)
    return {body: min(seen) for body, seen in timings.items()}


@pytest.mark.parametrize(
    "escape", [b"\\\\", b'\\"', b"\\u00e9"], ids=["backslashes", "quotes", "unicode"]
)
def test_a_string_of_escapes_costs_about_what_plain_text_as_long_does(
    client: TestClient, escape: bytes
) -> None:
    """Counting a body's values before it is parsed stepped through a string's escapes one at
    a time, with a regular expression: 1.8 MB of them held the event loop for 66 ms, about 14
    times a plain string as long. Both are refused (too long for content); the minimum CPU time
    of several runs of each, in turns."""
    metadata = b",".join(b'"k%d": "v"' % n for n in range(50))  # values enough to be counted

    def body(text: bytes) -> bytes:
        return b'{"title": "t", "content": "%s", "metadata": {%s}}' % (text, metadata)

    size = 1_800_000
    escaped, plain = body(escape * (size // len(escape))), body(b"x" * size)
    cpu = _least_cpu_to_refuse(client, escaped, plain)
    assert cpu[escaped] < 5 * cpu[plain]


def _largest_document() -> bytes:
    """A document at every bound at once, its text full of JSON's own separators."""
    return json.dumps(
        {
            "title": "t" * 200,
            "content": '[{"a": 1}, {"b": 2}]: ' * 4_000,
            "tags": [f"tag{n}" for n in range(20)],
            "metadata": {f"key{n}": f"value, {n}: [x]" for n in range(50)},
        }
    ).encode()


# A megabyte of tiny values held the parser (and the event loop) for 50-170 ms.
TOO_MANY_VALUES: list[tuple[str, bytes]] = [
    ("empty objects", b"[" + b"{}," * 300_000 + b"{}]"),
    ("empty arrays", b"[" + b"[]," * 300_000 + b"[]]"),
    ("integers", b"[" + b"1," * 500_000 + b"1]"),
    ("empty strings", b"[" + b'"",' * 300_000 + b'""]'),
    ("keys of one object", _object(60_000)),
]


@pytest.mark.parametrize(
    "body", [c[1] for c in TOO_MANY_VALUES], ids=[c[0] for c in TOO_MANY_VALUES]
)
def test_a_body_of_more_values_than_any_document_holds_is_refused_before_it_is_parsed(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, body: bytes
) -> None:
    parsed: list[int] = []
    loads = json.loads

    def recording(text: bytes, **options: Any) -> Any:
        parsed.append(len(text))
        return loads(text, **options)

    monkeypatch.setattr(json, "loads", recording)
    response = client.post(
        "/v1/documents", content=body, headers={"Content-Type": "application/json"}
    )
    assert_problem(response, 400)
    assert f"more than {bodies.MAX_VALUES}" in response.json()["detail"]
    assert len(body) not in parsed
    largest = client.post(
        "/v1/documents", content=_largest_document(), headers={"Content-Type": "application/json"}
    )
    assert largest.status_code == 201, largest.text[:300]
    assert len(_largest_document()) in parsed


def test_a_large_body_is_parsed_off_the_event_loop(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checking and parsing the largest body a document takes held the event loop for about
    8 ms, which every other request waited out; a small one is parsed where it is read, which
    costs less than handing it to a thread."""
    threads: list[int] = []
    parse = bodies.parse_strict

    def recording(body: bytes) -> Any:
        threads.append(threading.get_ident())
        return parse(body)

    monkeypatch.setattr(bodies, "parse_strict", recording)
    headers = {"Content-Type": "application/json"}
    small = client.post("/v1/documents", json={"title": "small", "content": "a few words"})
    largest = client.post("/v1/documents", content=_largest_document(), headers=headers)
    assert (small.status_code, largest.status_code) == (201, 201), largest.text[:300]
    malformed = client.post("/v1/documents", content=_largest_document()[:-1], headers=headers)
    assert_problem(malformed, 400)
    on_loop, *in_threads = threads
    assert len(in_threads) == 2
    assert on_loop not in in_threads


# --- input that must never be stored ----------------------------------------------------------

SURROGATES: list[tuple[str, dict[str, Any]]] = [
    ("content", {"title": "t", "content": "x\ud800"}),
    ("title", {"title": "t\udfff", "content": "x"}),
    ("tags", {"title": "t", "content": "x", "tags": ["a\ud800"]}),
    ("metadata", {"title": "t", "content": "x", "metadata": {"k\ud800": 1}}),
    ("metadata", {"title": "t", "content": "x", "metadata": {"k": "v\ud800"}}),
]


def _raw(body: dict[str, Any]) -> bytes:
    # json.dumps writes a lone surrogate as the escape \ud800, exactly as an attacker would.
    return json.dumps(body).encode()


@pytest.mark.parametrize("backend", ["sqlite", "mongodb"])
def test_a_lone_surrogate_is_a_422_naming_the_field_and_stores_nothing(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    extra = {"database_url": request.getfixturevalue("mongo_url")} if backend == "mongodb" else {}
    app = create_app(make_settings(tmp_path, **extra))
    headers = {"X-API-Key": KEY, "Content-Type": "application/json"}
    with TestClient(app, headers=headers) as client:
        kept = client.post("/v1/documents", json={"title": "kept", "content": "c"}).json()
        for field, body in SURROGATES:
            for method, path, sent in (
                ("POST", "/v1/documents", body),
                ("PATCH", f"/v1/documents/{kept['id']}", {field: body[field]}),
            ):
                response = client.request(method, path, content=_raw(sent))
                error = assert_problem(response, 422)["errors"][0]
                assert error["loc"][:2] == ["body", field]
                assert "lone surrogate" in error["msg"]
        assert client.get("/v1/documents").json()["items"] == [kept]
        assert client.get(f"/v1/documents/{kept['id']}").json() == kept


# --- methods, HEAD, Allow and URLs ------------------------------------------------------------


def test_head_answers_like_get_without_a_body(client: TestClient) -> None:
    doc = client.post("/v1/documents", json={"title": "t", "content": "c"}).json()
    for path in (f"/v1/documents/{doc['id']}", "/v1/documents", "/health"):
        got, head = client.get(path), client.head(path)
        assert head.status_code == 200
        assert head.content == b""
        assert head.headers["content-length"] == got.headers["content-length"]
        assert head.headers.get("etag") == got.headers.get("etag")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/v1/documents", "GET, HEAD, POST"),
        ("HEAD", "/v1/documents/x", None),
        ("POST", "/v1/documents/x", "DELETE, GET, HEAD, PATCH"),
        ("DELETE", "/health", "GET, HEAD"),
        ("TRACE", "/health/ready", "GET, HEAD"),
        ("POST", "/docs-static/favicon.png", "GET, HEAD"),
    ],
)
def test_a_method_a_path_does_not_serve_gets_405_with_every_allowed_method(
    client: TestClient, method: str, path: str, allowed: str | None
) -> None:
    response = client.request(method, path)
    if allowed is None:
        assert response.status_code == 404  # HEAD of a missing document: like its GET
        return
    assert response.status_code == 405
    assert response.headers["allow"] == allowed


@pytest.mark.parametrize(
    ("range_", "status", "detail"),
    [
        ("bytes=99999999-", 416, "Range Not Satisfiable."),
        ("bytes=5-1", 400, "Range header: start must be less than end"),
        ("items=0-1", 400, "Only support bytes range"),
    ],
)
def test_an_error_a_framework_part_answers_itself_is_a_problem_too(
    client: TestClient, range_: str, status: int, detail: str
) -> None:
    """Starlette's static files answer a Range they cannot serve themselves, in plain text:
    that answer becomes a problem document with its headers kept."""
    response = client.get("/docs-static/favicon.png", headers={"Range": range_})
    assert assert_problem(response, status)["detail"] == detail
    if status == 416:
        assert response.headers["content-range"].startswith("bytes */")


@pytest.mark.parametrize("path", ["/v1/documents/", "/health/", "//v1/documents"])
def test_no_redirect_is_built_from_what_the_client_sent(client: TestClient, path: str) -> None:
    response = client.get(path, headers={"Host": "evil.example"}, follow_redirects=False)
    assert_problem(response, 404)
    assert "location" not in response.headers


def test_location_never_carries_the_client_host(client: TestClient) -> None:
    response = client.post(
        "/v1/documents", json={"title": "t", "content": "c"}, headers={"Host": "evil.example"}
    )
    assert response.status_code == 201
    assert response.headers["location"].startswith("/v1/documents/")


# --- readiness ------------------------------------------------------------------------------


CHECKS = {"operation": "check"}


def test_readiness_is_right_under_400_concurrent_probes_and_writes_nothing(
    service_factory: ServiceFactory,
) -> None:
    server = service_factory(env={"MAX_CONNECTIONS": "4000"}).start()  # 400 from one address
    before = sorted(p.name for p in server.data_dir.iterdir())
    mtime = server.data_dir.stat().st_mtime_ns

    # Connected first, then sent in one burst: probes opening their connections one by one
    # had arrived as fast as this process could open them, which a busy machine slowed to one
    # a check, and the bound below measured the machine, not the sharing.
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(400)]
    statuses = []
    try:
        for sock in socks:
            sock.sendall(b"GET /health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        for sock in socks:
            sock.settimeout(30)
            received = b""
            while chunk := sock.recv(65536):  # a probe's answer ends its connection
                received += chunk
            statuses.append(status_of(received))
    finally:
        for sock in socks:
            sock.close()
    assert statuses == [200] * 400
    assert sorted(p.name for p in server.data_dir.iterdir()) == before
    assert server.data_dir.stat().st_mtime_ns == mtime
    # Probes that arrive while one checks share its answer: a keyless flood of them had cost
    # the store a check each, and slowed every keyed write 20x.
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}) as client:
        samples = scrape(client)["store_operation_duration_seconds"].samples
    (checks,) = (s.value for s in samples if s.name.endswith("_count") and s.labels == CHECKS)
    assert checks <= 40


# --- listings: a key pays for what its reads cost ---------------------------------------------

BUDGET = 10
# Enough that the sparse listing reads for several READ_UNIT_S on a machine several times faster
# than the ones it was written on, few enough to import in seconds (SecantusDB, the MongoDB
# server of the tests, reads every document of the collection for any listing: far fewer do).
SEEDED = {"sqlite": 45_000, "mongodb": 300}


@pytest.fixture(scope="module")
def seeded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory of many documents, imported once: the tests only read them."""
    data_dir = tmp_path_factory.mktemp("seeded")
    anyio.run(seed_common, make_settings(data_dir), SEEDED["sqlite"])
    return data_dir


@pytest.fixture(params=["sqlite", "mongodb"])
def seeded(request: pytest.FixtureRequest, seeded_dir: Path, tmp_path: Path) -> Settings:
    if request.param == "sqlite":
        return make_settings(seeded_dir, rate_limit=f"{BUDGET}/minute")
    url = request.getfixturevalue("mongo_url")
    settings = make_settings(tmp_path, rate_limit=f"{BUDGET}/minute", database_url=url)
    anyio.run(seed_common, settings, SEEDED["mongodb"])
    return settings


def test_a_sparse_listing_spends_a_unit_per_10_ms_its_reads_took(seeded: Settings) -> None:
    with TestClient(create_app(seeded), headers={"X-API-Key": KEY}) as client:
        first = client.get("/v1/documents", params=SPARSE)
        assert first.status_code == 200
        assert first.json()["items"] == []
        assert first.headers["x-ratelimit-remaining"] == str(BUDGET - 1)  # spent from the head
        # The next request, spending its one unit from the head, shows what the first cost.
        second = client.get("/v1/documents", params=SPARSE)
        assert BUDGET - int(second.headers["x-ratelimit-remaining"]) - 1 > 1


@contextlib.contextmanager
def _one_processor() -> Iterator[None]:
    """Every thread of this process, and those they start, on one processor: threads beside a
    read take turns with it, as on a busy machine, rather than running on the other processor,
    whose share of the caches and the memory bus slows the read's own work by up to half."""
    every = os.sched_getaffinity(0)
    for thread in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # it ended meanwhile (an idle worker)
            os.sched_setaffinity(int(thread), {min(every)})
    try:
        yield
    finally:
        for thread in os.listdir("/proc/self/task"):
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                os.sched_setaffinity(int(thread), every)


def test_a_read_is_charged_its_own_work_not_the_waits_other_work_makes_it(
    seeded_dir: Path,
) -> None:
    """Work beside a read (another key's words found in a thread) holds the interpreter lock
    and a processor: a sparse listing took twice as long, and its key paid twice as much."""
    settings = make_settings(seeded_dir, rate_limit="1000/minute")
    with _one_processor(), TestClient(create_app(settings), headers={"X-API-Key": KEY}) as client:

        def cost() -> int:
            """Units the sparse listing spent beyond its head's, seen by the probes around it."""
            probe = {"limit": 1}
            before = int(client.get("/v1/documents", params=probe).headers["x-ratelimit-remaining"])
            assert client.get("/v1/documents", params=SPARSE).status_code == 200
            after = int(client.get("/v1/documents", params=probe).headers["x-ratelimit-remaining"])
            return before - after - 2

        def cost_beside_spinners() -> int:
            stop = threading.Event()

            def spin() -> None:
                while not stop.is_set():
                    total = 0
                    for n in range(10_000):
                        total += n

            spinners = [threading.Thread(target=spin) for _ in range(2)]
            for spinner in spinners:
                spinner.start()
            try:
                return cost()
            finally:
                stop.set()
                for spinner in spinners:
                    spinner.join()

        cost()  # the first listing also reads the file into SQLite's cache
        # Rounds alternate, so that whatever else the machine runs weighs on both alike.
        alone, beside = [], []
        for _ in range(3):
            alone.append(cost())
            beside.append(cost_beside_spinners())
    assert sum(alone) >= len(alone)  # beyond its head's unit: a listing costly enough to tell
    assert sum(beside) < 1.5 * sum(alone)  # it was twice


def test_a_key_runs_out_after_far_fewer_sparse_listings_than_cheap_reads(seeded_dir: Path) -> None:
    settings = make_settings(seeded_dir, rate_limit=f"{BUDGET}/minute")
    with TestClient(create_app(settings)) as client:
        alice, bob = {"X-API-Key": KEY}, {"X-API-Key": OTHER_KEY}
        page = client.get("/v1/documents", params={"limit": 50}, headers=alice)
        doc_id = page.json()["items"][0]["id"]
        cheap = [page] + [
            client.get(f"/v1/documents/{doc_id}", headers=alice)
            if n % 2
            else client.get("/v1/documents", params={"limit": 50, "tag": "common"}, headers=alice)
            for n in range(1, BUDGET)
        ]
        assert [r.status_code for r in cheap] == [200] * BUDGET
        # A get or a page of 50 spends one unit, over any number of documents.
        remaining = [r.headers["x-ratelimit-remaining"] for r in cheap]
        assert remaining == [str(n) for n in range(BUDGET - 1, -1, -1)]
        assert_problem(client.get(f"/v1/documents/{doc_id}", headers=alice), 429)
        # Each sparse listing spends two units or more: half the budget is the most it gets.
        sparse = [
            client.get("/v1/documents", params=SPARSE, headers=bob) for _ in range(BUDGET // 2 + 1)
        ]
        assert sparse[0].status_code == 200
        assert_problem(sparse[-1], 429)


@pytest.mark.parametrize(
    "params",
    [SPARSE, {"sort": "-updated_at", "metadata.s": "y"}],
    ids=["filters", "a filter off the sort"],
)
def test_sparse_listings_started_at_once_run_one_at_a_time_and_stop_when_paid(
    seeded: Settings, params: dict[str, str]
) -> None:
    """A read is charged once answered: ten sparse listings started at once all ran before the
    first charge landed (60 of 330 ms each, in one window of 60 units). A key's reads that
    leave the event loop now wait for each other and for each other's charges, so once those
    have spent the budget the rest get 429: at most a few of the ten are answered. On MongoDB,
    whose reads run in the database, every filtered listing waits so."""
    with TestClient(create_app(seeded), headers={"X-API-Key": KEY}) as client:
        statuses: list[int] = []
        run_threads(
            lambda _: statuses.append(client.get("/v1/documents", params=params).status_code),
            BUDGET,
        )
        assert sorted(set(statuses)) == [200, 429]
        assert statuses.count(200) <= BUDGET // 2
        # Each counted as a key's refusal (these had been left out): scraped without the key,
        # whose budget is spent.
        refused = scrape(client, headers={"X-API-Key": "not-a-key"})["rate_limited"]
        assert refused.samples[0].value == statuses.count(429)


def test_a_patch_pays_for_the_words_it_makes_the_store_find(tmp_path: Path) -> None:
    """Changing only the title of a document of 100 000 characters makes the store find the
    words of all its text again (63 ms of CPU), for a 15-byte request: that time is charged to
    the key like a read's, one unit per 10 ms."""
    settings = make_settings(tmp_path, rate_limit="1000/minute")
    with TestClient(create_app(settings), headers={"X-API-Key": KEY}) as client:
        body = {"title": "t", "content": "ἀλήθεια καὶ δόξα " * 5_880}
        doc_id = client.post("/v1/documents", json=body).json()["id"]
        before = int(
            client.get("/v1/documents", params={"limit": 1}).headers["x-ratelimit-remaining"]
        )
        assert client.patch(f"/v1/documents/{doc_id}", json={"title": "t1"}).status_code == 200
        after = int(
            client.get("/v1/documents", params={"limit": 1}).headers["x-ratelimit-remaining"]
        )
        assert before - after > 2  # the PATCH's unit, the listing's, and its words' time
