"""The HTTP server: uvicorn's httptools protocol with request heads bounded in size, count and time,
and `serve()`, which runs it and reports a failed start of any worker as a non-zero exit.

uvicorn with httptools sets no limit on a request head: one connection without a key could send
hundreds of megabytes of headers, or one byte every few seconds for ever. This protocol refuses a
head over `MAX_HEAD_BYTES` or `MAX_HEADERS` with 431 and closes a connection whose head has not
arrived `HEAD_TIMEOUT` seconds after its first byte (or after the connection opened) with 408,
before the application sees anything. Idle keep-alive connections close after
`KEEP_ALIVE_TIMEOUT` seconds (uvicorn's own timer), once their peer has taken all we sent. A
connection whose peer takes none of the bytes we or the kernel hold for it for `SEND_TIMEOUT`
seconds is reset: asyncio's `close()` waits for ours to drain, and the kernel keeps its own for
minutes after a close, so a client that never reads would otherwise hold its responses in memory
for good, or for minutes. Whatever ends a connection but the client (a malformed request, a
pipelining bound, an `Upgrade`), every request that came whole before it is answered
first, in order (`_finish`); and every close while the client may still be sending, or has not
taken all we sent, is a half-close until it has (`_close`, by the same measure of progress).

uvicorn documents `http=` as taking a protocol class but not the class's insides. This module
leans on them, pinned by the lock and guarded by test_hostile.py: HttpToolsProtocol's parser
callbacks (`on_url`, `on_header`, ...), `send_400_response`, `on_response_complete`,
`_start_asgi_task`, `timeout_keep_alive_handler` and `timeout_keep_alive_task`, `pipeline`, its
`transport` (which it wraps), `flow`, `loop`, `client`, `parser`, `headers`, `cycle` with its
`more_body`, `disconnected` and `message_event`; `Multiprocess` with its `processes` and their
`exitcode`, and `STARTUP_FAILURE`, the status uvicorn gives a failed start. It also leans on the
event loop (uvloop or asyncio) closing a transport's socket only after `connection_lost` returns,
and stopping its reads at the client's end when `eof_received` keeps the transport open.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import functools
import ipaddress
import logging
import multiprocessing
import os
import re
import signal
import socket
import struct
import sys
import termios
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

import httptools
import orjson
import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.supervisors import Multiprocess

from logging_config import clip

MAX_HEAD_BYTES = 16 * 1024
MAX_HEADERS = 100
HEAD_TIMEOUT = 10.0
KEEP_ALIVE_TIMEOUT = 5
# Requests parsed from one read wait in the connection's pipeline, each a request object kilobytes
# in size, while the one before is answered: a 256 KiB read of tiny heads queues ten thousand.
MAX_PIPELINED = 32
# Queued requests are bounded by bytes too (their heads, and any body read): two full heads. Else
# 32 heads of 16 KiB each wait per connection before any key is checked, half a gigabyte over
# 1000 connections (MAX_CONNECTIONS); with it, 1000 connections queue at most 32 MiB.
MAX_PIPELINED_BYTES = 2 * MAX_HEAD_BYTES
SEND_TIMEOUT = 10.0
# How long after it opened a connection on which no request has begun is kept through a graceful
# stop, for the request its client opened it to send (Go's http.Server.Shutdown waits 5 s too);
# and how long after the stop began a request may go on arriving (its head or its body), within
# the 8 s the stop waits for requests before it cancels them.
STOP_GRACE = 5.0
# A connection is half-closed first (RFC 9112 9.6) when its client may still be sending (a
# refusal, an answer before the body came, requests pipelined behind the last answered) or has
# not taken all we sent: a socket closed with bytes unread, or that bytes reach after its close,
# is reset by the kernel, which drops what it still holds of our answers, so the client never
# gets them; and one handed to the kernel with bytes untaken was cut by its own measure of
# progress (a steady reader of 40 KB/s with a small window, after about 10 s). It closes once the
# client has taken them all and sent nothing for LINGER_CHECK seconds, or sent its own end
# (waiting at most SEND_TIMEOUT once all is taken); what comes meanwhile is read and dropped, up to
# LINGER_BYTES, then left unread; a client that takes nothing for SEND_TIMEOUT is reset.
LINGER_CHECK = 1.0
LINGER_BYTES = 4 * 1024 * 1024
# A body reaches the application in pieces, one parser callback each: a chunk of a chunked body,
# or what one read holds. Sent as 1-byte chunks, 6 bytes on the wire cost a Python call: 0.9 s of
# CPU for a 2 MB body, before or after any key is checked. 4096 pieces carry a 1 MiB body in
# 256-byte chunks. The bytes around the chunks (their sizes, extensions, line ends) are no body
# bytes, so MAX_BODY_BYTES does not see them: a chunk extension that never ends was read at line
# speed until the body's deadline, 15 GB and a core for 30 s. A body past either bound is refused
# (400) and its connection closed. Framing is counted in the reads that fall wholly within a body:
# httptools tells that a body began or ended within a read, not where, so the read that also
# holds the head or the end (at most 256 KiB) may add framing uncounted, once each.
MAX_BODY_PIECES = 4096
MAX_BODY_FRAMING_BYTES = 64 * 1024
# RFC 9110 7.2 and 4.2.1, a Host field's value for an http URI: uri-host [":" port], where the
# host is a bracketed IPv6 address or a reg-name (unreserved, pct-encoded and sub-delims), never
# empty.
HOST = re.compile(rb"(?:\[([0-9A-Fa-f:.]+)\]|(?:[\w.~!$&'()*+,;=-]|%[0-9A-Fa-f]{2})+)(?::\d*)?")

log = logging.getLogger("documents.server")


def _problem(status: int, title: str, detail: str, extra: bytes = b"") -> bytes:
    body = orjson.dumps(
        {
            "type": f"urn:documents:problem:{title.lower().replace(' ', '-')}",
            "title": title,
            "status": status,
            "detail": detail,
            "request_id": "",
        }
    )
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/problem+json\r\n"
        b"content-length: %d\r\nconnection: close\r\n%s\r\n%s"
        % (status, title.encode(), len(body), extra, body)
    )


HEAD_TOO_LARGE = _problem(
    431,
    "Request Header Fields Too Large",
    f"A request head may hold at most {MAX_HEADERS} headers and {MAX_HEAD_BYTES} bytes.",
)
MALFORMED = _problem(400, "Bad Request", "The request is not valid HTTP/1.1.")
UPGRADE_WITH_BODY = _problem(
    400,
    "Bad Request",
    "A request asking to Upgrade may not carry a body here: send it without the Upgrade header "
    "(curl: --http1.1).",
)
BODY_IN_TOO_MANY_PIECES = _problem(
    400,
    "Bad Request",
    f"A request body may arrive in at most {MAX_BODY_PIECES} pieces (chunks), with at most "
    f"{MAX_BODY_FRAMING_BYTES // 1024} KiB of chunk sizes and extensions.",
)
HEAD_TIMED_OUT = _problem(
    408, "Request Timeout", f"The request head did not arrive within {HEAD_TIMEOUT:g} seconds."
)
STOPPED_BEFORE_ARRIVAL = _problem(
    503,
    "Service Unavailable",
    f"The server stopped and the request had not all arrived {STOP_GRACE:g} seconds later; "
    "nothing was done: retry.",
    b"retry-after: 1\r\n",
)
TOO_MANY_CONNECTIONS = _problem(
    503,
    "Service Unavailable",
    "The server has as many connections open as it takes (MAX_CONNECTIONS); retry shortly.",
    b"retry-after: 1\r\n",
)

TOO_MANY_FROM_CLIENT = _problem(
    503,
    "Service Unavailable",
    "This address has as many connections open as one address may (a tenth of MAX_CONNECTIONS); "
    "retry shortly.",
    b"retry-after: 1\r\n",
)
# Open connections per client address in this process, past which its next is refused at once:
# else one address held every one of MAX_CONNECTIONS with connections that send nothing, each
# opened again as HEAD_TIMEOUT closed it (100 a second), and every other client got 503. A
# trusted proxy's (FORWARDED_ALLOW_IPS) are not counted: every client behind it shares them.
_open_by_client: Counter[str] = Counter()


@functools.lru_cache(maxsize=4096)
def client_of(host: str) -> str:
    """Who a connection or a keyless budget belongs to: IPv6 clients by /64, the block one
    subscriber gets (per address, one machine would have 2^64). Cached: a flood repeats a few."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return clip(host, 64)  # not an address (a Unix socket, a test client)
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return host


def _names_a_host(value: bytes) -> bool:
    if not (match := HOST.fullmatch(value)):
        return False
    if match[1] is not None:
        try:
            ipaddress.IPv6Address(match[1].decode())
        except ValueError:
            return False
    return True


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(
        name == b"transfer-encoding" or (name == b"content-length" and value.strip(b"0"))
        for name, value in headers
    )


def _valid_target(method: bytes, target: bytes) -> bool:
    """RFC 9112 3.2: a path (origin-form); an http or https URI with a host and no user
    (absolute-form, RFC 9110 4.2.4); `*` for OPTIONS alone."""
    if b"#" in target:  # RFC 9112 3.2.1: no fragment
        return False
    if target.startswith(b"/"):
        return True
    if target == b"*":
        return method == b"OPTIONS"
    try:
        url = httptools.parse_url(target)
    except httptools.HttpParserInvalidURLError:
        return False
    authority = target.partition(b"://")[2].partition(b"/")[0].partition(b"?")[0]
    return url.schema.lower() in (b"http", b"https") and bool(url.host) and b"@" not in authority


@functools.lru_cache(maxsize=4096)
def _is_proxy(host: str, trusted: str) -> bool:
    if trusted.strip() == "*":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    networks = (ipaddress.ip_network(e, strict=False) for e in trusted.split(",") if e)
    return any(address in network for network in networks)


class _Transport:
    """The connection's transport as uvicorn and the protocol see it, but whose `close()` is the
    protocol's `_close`: every close of the connection, uvicorn's own after a `Connection: close`
    answer included, may linger (see LINGER_CHECK)."""

    def __init__(self, transport: asyncio.Transport, close: Callable[[], None]) -> None:
        self._transport = transport
        self.lingering = False
        self.close = close
        self.write = transport.write  # each answer's writes: no lookup through __getattr__

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """Counts what a head costs as it arrives; memory stays within one read of the limit. Open
    connections are bounded by uvicorn's `limit_concurrency`, enforced here from accept."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn checks limit_concurrency only once a head has arrived (a connection that sends
        # nothing is never counted against it) and answers in plain text; here a connection past
        # the limit gets a 503 problem at once instead, and uvicorn's own check is off.
        self.max_connections, self.limit_concurrency = self.limit_concurrency, None

    # uvicorn narrows the parameter to asyncio.Transport; BaseTransport in asyncio.Protocol.
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._socket = transport
        self._lingering = _Transport(transport, self._close)
        super().connection_made(cast(asyncio.Transport, self._lingering))
        self._dropped = 0  # bytes read and dropped after the last request (see LINGER_CHECK)
        self._in_message = False  # a request has begun and not all of it has come
        self._eof = False  # the client has sent its end
        self._lingered_since = 0.0
        self._opened = self.loop.time()
        self._stopping = False  # a graceful stop has begun: the next answer is the last
        self._head_bytes = 0
        self._headers = 0
        self._awaiting_head = True
        self._heads = 0  # heads completed on this connection
        self._parsed = 0  # bytes of URL and headers parsed in the current head
        self._too_large = False
        self._target_seen = False  # the request being read has come to its target
        self._fault: bytes | None = None  # the refusal on_headers_complete chose
        # The current request's body: its pieces, their bytes, and the bytes read while it came.
        self._pieces = self._body_bytes = self._body_wire = 0
        # More requests queued behind the one answered than MAX_PIPELINED, or bytes than
        # MAX_PIPELINED_BYTES.
        self._too_many = False
        self._queued: dict[RequestResponseCycle, int] = {}  # bytes each queued request holds
        self._head_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._answering: RequestResponseCycle | None = None  # the request being answered
        self._refusal: bytes | None = None  # set by _finish: sent once the last is answered
        # Paused as soon as one byte waits for the peer, not past asyncio's 64 KiB: the send
        # timer then runs whenever this process holds anything the peer has not taken.
        transport.set_write_buffer_limits(high=0)
        self._client: str | None = None
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            self._turn_away(TOO_MANY_CONNECTIONS)
            return
        host = self.client[0] if self.client else ""
        trusted = self.config.forwarded_allow_ips
        if self.max_connections is not None and not _is_proxy(
            host, trusted if isinstance(trusted, str) else ",".join(trusted)
        ):
            self._client = client_of(host)
            _open_by_client[self._client] += 1
            if _open_by_client[self._client] > max(1, self.max_connections // 10):
                self._turn_away(TOO_MANY_FROM_CLIENT)
                return
        self._start_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._client is not None:
            _open_by_client[self._client] -= 1
            if not _open_by_client[self._client]:
                del _open_by_client[self._client]
        self._stop_head_timer()
        self._stop_send_timer()
        if self.timeout_keep_alive_task is not None:  # uvicorn cancels it only when exc is None
            self.timeout_keep_alive_task.cancel()
        if exc is None and self._untaken():
            # Closed with bytes the peer has not taken, not through _close (the transport closed
            # itself): the kernel goes on sending them once we let go; it gives up after
            # SEND_TIMEOUT without progress, not after minutes.
            sock = self.transport.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(SEND_TIMEOUT * 1000))
        self._abandon_answer()
        super().connection_lost(exc)

    def _abandon_answer(self) -> None:
        """The request being answered gets nothing more through this connection."""
        if self._answering is not None:
            state = self._answering.scope["state"]
            if not self._answering.response_complete and "answered_status" not in state:
                # Its response will never be sent: the access line says so (middleware.py),
                # rather than give the status alone, as if the client had got it.
                state["client_disconnected"] = True
            # uvicorn marks only the last request parsed: with more pipelined behind it, the one
            # being answered would wake from its wait to write on a closed transport.
            self._answering.disconnected = True
            self._answering.message_event.set()  # a wait for its body ends

    # asyncio.Protocol's returns bool | None (True: the protocol closes); uvicorn's says None.
    def eof_received(self) -> bool:  # type: ignore[override]
        """The client's end is taken as its going, as uvicorn takes it: the connection closes (a
        request in progress is abandoned, and its access line says so). While lingering, it
        closes once the client has taken what it was owed (see LINGER_CHECK)."""
        self._eof = True
        return self._lingering.lingering and bool(self._untaken())

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None or self._lingering.lingering:
            # Nothing after the last request is read (see _finish), and what comes once reading
            # resumes (uvicorn resumes it as an answer ends, and so does _close) is dropped.
            self._dropped += len(data)
            if self._dropped > LINGER_BYTES:
                self._socket.pause_reading()
            return
        if self._awaiting_head and self._head_timer is None:
            self._start_head_timer()
        before = (self._awaiting_head, self._heads)
        super().data_received(data)
        if self._refusal is not None:
            return
        if before == (False, self._heads) and not self._awaiting_head:
            # Read wholly inside one body: what of it was not body bytes is framing.
            self._body_wire += len(data)
            framing = self._body_wire - self._body_bytes
            if framing > MAX_BODY_FRAMING_BYTES and not self.transport.is_closing():
                self._finish(BODY_IN_TOO_MANY_PIECES)
        self._bound_begun_head()
        if (
            before == (True, self._heads)
            and self._awaiting_head
            and not self.transport.is_closing()
        ):
            # This read began and ended inside one head, all of it still unparsed (httptools
            # buffers a header's name and value until they end): the head's cost so far.
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._finish(HEAD_TOO_LARGE)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_message = True
        self._head_bytes = 0
        self._headers = 0
        self._parsed = 0
        self._pieces = self._body_bytes = self._body_wire = 0
        self._trailing = False

    def on_url(self, url: bytes) -> None:
        self._target_seen = True
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers += 1
        self._count(len(name) + len(value) + 4)
        # A trailer field (after a chunked body) is counted, then dropped (RFC 9110 6.5.1 lets a
        # recipient discard them): uvicorn added it to the request's headers, which the app may
        # or may not have read yet, so the same bytes were judged by when they came.
        if not self._trailing:
            # RFC 9110 5.5: a field value has no leading or trailing white space. httptools
            # drops the leading only, so a key sent as `KEY ` was another key (401).
            super().on_header(name, value.rstrip(b" \t"))

    def _count(self, size: int) -> None:
        self._parsed += size
        if self._headers > MAX_HEADERS or self._parsed > MAX_HEAD_BYTES:
            self._too_large = True
            # Raising stops the parser; uvicorn then answers through send_400_response.
            raise ValueError("request head over the limits")

    def on_headers_complete(self) -> None:
        self._heads += 1
        self._awaiting_head = False
        self._stop_head_timer()
        self._trailing = True
        version = self.parser.get_http_version()
        # httptools also reads HTTP/0.9 and HTTP/2.0 request lines as HTTP/1.x. Raising stops
        # the parser, as _count does: 400, the connection closed.
        if version not in ("1.0", "1.1"):
            raise ValueError(f"HTTP/{version}")
        # RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing (a proxy
        # that speaks 1.0 reads its body by Content-Length, or to the end): a request smuggled
        # past one.
        if version == "1.0" and any(name == b"transfer-encoding" for name, _ in self.headers):
            raise ValueError("Transfer-Encoding in an HTTP/1.0 request")
        # RFC 9112 3.2: an HTTP/1.1 request names one Host, none names two, and its value is
        # a host (a proxy and this server may each read another).
        hosts = [value for name, value in self.headers if name == b"host"]  # names lower-cased
        if len(hosts) > 1 or (not hosts and version == "1.1"):
            raise ValueError("a request without its one Host header")
        if hosts and not _names_a_host(hosts[0]):
            raise ValueError("a Host header that names no host")
        if not _valid_target(self.parser.get_method(), self.url):
            raise ValueError("a request target that is not this server's")
        if self.parser.should_upgrade() and _has_body(self.headers):
            # httptools ends such a request at its head: its body would be dropped, and the
            # request run without it (a `curl --http2` POST got 422, "Field required").
            self._fault = UPGRADE_WITH_BODY
            raise ValueError("a body on a request asking to Upgrade")
        if version == "1.0":
            self.expect_100_continue = False  # RFC 9110 15.2: no 1xx to an HTTP/1.0 client
        super().on_headers_complete()
        if self._stopping:
            self.cycle.keep_alive = False
        if self.pipeline and self.pipeline[0][0] is self.cycle:  # queued behind the one answered
            self._hold(self._parsed)
        if len(self.pipeline) > MAX_PIPELINED:
            self._too_many = True
            raise ValueError("too many requests pipelined")  # stops the parser, as _count does

    def on_body(self, body: bytes) -> None:
        self._pieces += 1
        self._body_bytes += len(body)
        if self._pieces > MAX_BODY_PIECES:
            raise ValueError("body in too many pieces")  # stops the parser, as _count does
        super().on_body(body)
        if self.cycle in self._queued:
            self._hold(len(body))

    def _hold(self, size: int) -> None:
        """Count bytes the request just parsed holds while it waits in the pipeline."""
        self._queued[self.cycle] = self._queued.get(self.cycle, 0) + size
        if sum(self._queued.values()) > MAX_PIPELINED_BYTES:
            self._too_many = True
            raise ValueError("too many bytes pipelined")  # stops the parser, as _count does

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_message = False
        self._target_seen = False
        # The next request's head is bounded again from its first byte.
        self._awaiting_head = True
        self._head_bytes = 0
        if self.parser.should_upgrade():
            # No protocol is taken up here (RFC 9110 7.8 lets a server ignore Upgrade), but
            # httptools stops reading at such a request and uvicorn drops the rest of the read,
            # so what followed it was read or not by how TCP split it: a request smuggled in
            # another's body. It is the connection's last.
            self.cycle.keep_alive = False
            self._finish(b"")

    def on_response_complete(self) -> None:
        answered = self._answering  # super() starts the next one queued
        super().on_response_complete()
        if self._refusal is not None:  # see _finish
            if self._answering is None or self._answering.response_complete:
                self._refuse(self._refusal)
            return
        # Not the last request parsed (self.cycle): one queued whose body is still coming had
        # closed the connection, unanswered with the write queued before it.
        if answered is not None and answered.more_body:
            # Answered before the body arrived (a 413, or a route that reads none): end the
            # connection rather than go on reading a body nobody will use, at the client's pace.
            self.transport.close()
        else:
            self._bound_begun_head()

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers every parser error here, those _count and on_headers_complete raised
        # included. Past MAX_PIPELINED or MAX_PIPELINED_BYTES the request that went past is
        # not answered: the connection closes after those before it.
        if self._too_many:
            refusal = b""
        elif self._fault is not None:
            refusal = self._fault
        elif self._too_large:
            refusal = HEAD_TOO_LARGE
        else:
            refusal = BODY_IN_TOO_MANY_PIECES if self._pieces > MAX_BODY_PIECES else MALFORMED
        self._finish(refusal)

    def _finish(self, refusal: bytes) -> None:
        """Read nothing more; answer, in order, every request that came whole (their writes are
        done: an answer dropped, or a 400 in its place, said they were not), then send `refusal`
        and close. A request whose body had not all come is never run."""
        self._stop_head_timer()
        self.transport.pause_reading()
        self._refusal = refusal
        for queued in [item for item in self.pipeline if item[0].more_body]:
            self.pipeline.remove(queued)
            self._queued.pop(queued[0], None)
        answering = self._answering
        if answering is None or answering.response_complete or answering.more_body:
            self._refuse(refusal)  # none to answer first

    def _refuse(self, response: bytes) -> None:
        self._stop_head_timer()
        if response and (cycle := self._answering) is not None and not cycle.response_complete:
            # The refusal is its answer (its body had not all come): the access line and the
            # metrics give its status, where they had said the client left.
            cycle.scope["state"]["answered_status"] = int(response[9:12])
        # An answer to HEAD has no content (RFC 9110). The parser holds a request's method from
        # its name's last letter (HEADX too) and the previous request's until then: it is this
        # request's, and a HEAD, only once its target has come. Else the answer goes with neither
        # content nor length, which the close ends for any client.
        if response and self.parser.get_method() == b"HEAD":
            response = response[: response.index(b"\r\n\r\n") + 4]
            if not self._target_seen:
                response = re.sub(rb"content-length: \d+\r\n", b"", response)
        if not self.transport.is_closing():
            self.transport.write(response)
            self.transport.close()

    def _turn_away(self, response: bytes) -> None:
        """Refused as it opens: closed at once, not lingering (see LINGER_CHECK), so that its slot
        is free again. Lingering, refused connections had filled every slot from one address.
        The request the client sends may reach a closed socket, whose reset comes after the 503
        (which a Linux client still reads)."""
        self._socket.write(response)
        self._socket.close()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        self._answering = cycle
        self._queued.pop(cycle, None)
        super()._start_asgi_task(cycle, app)

    def pause_writing(self) -> None:
        super().pause_writing()
        self._watch_sending(self._untaken())

    def resume_writing(self) -> None:
        super().resume_writing()
        self._stop_send_timer()

    def _watch_sending(self, untaken: int) -> None:
        self._send_timer = self.loop.call_later(SEND_TIMEOUT, self._check_sending, untaken)

    def _check_sending(self, before: int) -> None:
        """A peer that took none of our bytes for SEND_TIMEOUT is cut off: closing would wait
        for them to drain, holding them (and the request waiting to write) while it stays open.
        Progress, not the total time, counts, so a slow reader is served to the end."""
        if self._socket.is_closing():  # reset by the linger check meanwhile
            return
        untaken = self._untaken()
        if untaken < before:
            self._watch_sending(untaken)
        else:
            self._reset(untaken)

    def shutdown(self) -> None:
        """A graceful stop (SIGTERM; each worker's in a rolling restart): every request begun is
        answered, as its connection's last. uvicorn closed a connection at once unless it was
        answering, so a head part of which had come was cut; and one on which no request had
        begun, though its client had just opened it to send one, which then met a closed
        socket, unanswered (about 1% of the requests through a rolling restart that opened a
        connection each): such a connection is kept until STOP_GRACE seconds after it opened."""
        self._stopping = True  # on_headers_complete: the request is its connection's last
        wait = self._opened + STOP_GRACE - self.loop.time()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
        elif self.cycle is None and not self._in_message and wait > 0:
            self.loop.call_later(wait, self._stop_unbegun)
        elif not self._in_message:
            self.transport.close()
            return
        self.loop.call_later(STOP_GRACE, self._stop_late)

    def _stop_late(self) -> None:
        """A request not all come STOP_GRACE seconds into a stop (its head or its body) is
        refused, never run: its handler had still been waiting for the body when the stop
        cancelled it, a text/plain 500 and a traceback for a request never acted on."""
        cycle = self.cycle
        answering_early = cycle is not None and cycle.more_body and cycle.response_started
        if self._in_message and not answering_early and not self.transport.is_closing():
            self._finish(STOPPED_BEFORE_ARRIVAL)

    def _stop_unbegun(self) -> None:
        if self.cycle is None and not self._in_message:
            self.transport.close()

    def timeout_keep_alive_handler(self) -> None:
        if not self._in_message:  # else a head has begun: its timer bounds it, with a 408
            self._close()

    def _close(self) -> None:
        """Every close of the connection (see _Transport): at once when nothing is owed either
        way, else a half-close first, and the close once the client has taken every answer and
        gone quiet (see LINGER_CHECK)."""
        if self.transport.is_closing():
            return
        # None comes here after the client's end: eof_received closed, or it already lingers.
        pending = (
            self._in_message or self._refusal is not None or self.pipeline or self.flow.read_paused
        )
        if not (pending or self._untaken()) or not self._socket.can_write_eof():
            self._socket.close()
            return
        self._lingering.lingering = True
        self._lingered_since = self.loop.time()
        self._stop_head_timer()
        self._abandon_answer()
        self._socket.write_eof()  # the FIN goes after every byte already written
        if self._dropped <= LINGER_BYTES:
            self._socket.resume_reading()
        self._linger(self._untaken(), self._dropped, 0.0)

    def _linger(self, untaken: int, dropped: int, stalled: float) -> None:
        """Check again in LINGER_CHECK seconds, on uvicorn's keep-alive timer (which only a
        request or an answer's end cancel: neither comes now, and connection_lost does)."""
        self.timeout_keep_alive_task = self.loop.call_later(
            LINGER_CHECK, self._check_linger, untaken, dropped, stalled
        )

    def _check_linger(self, before: int, dropped: int, stalled: float) -> None:
        if self._socket.is_closing():  # reset by the send timer meanwhile
            return
        untaken = self._untaken()
        if not untaken:  # all taken: closed once the client is quiet, or has had SEND_TIMEOUT
            lingered = self.loop.time() - self._lingered_since
            if self._eof or self._dropped == dropped or lingered >= SEND_TIMEOUT:
                self._socket.close()
                return
        stalled = stalled + LINGER_CHECK if untaken and untaken >= before else 0.0
        if stalled >= SEND_TIMEOUT:
            self._reset(untaken)
        else:
            self._linger(untaken, self._dropped, stalled)

    def _reset(self, untaken: int) -> None:
        log.warning(
            "connection.send_timeout",
            extra={"client": ":".join(map(str, self.client or ())), "untaken_bytes": untaken},
        )
        # Linger 0: the kernel resets the connection and drops what it holds for it too.
        sock = self.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def _untaken(self) -> int:
        """Bytes the peer has not taken: ours, and the kernel's not yet acknowledged (Linux's
        SIOCOUTQ, numbered as TIOCOUTQ). The kernel's part shrinks each time a reader frees some
        of its receive buffer; ours only once the kernel's send buffer (megabytes) has room."""
        sock = self.transport.get_extra_info("socket")
        queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(4))
        return self.transport.get_write_buffer_size() + int.from_bytes(queued, sys.byteorder)

    def _stop_send_timer(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _start_head_timer(self) -> None:
        # After the answers to the requests before it, as every refusal (see _finish).
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT, self._finish, HEAD_TIMED_OUT)

    def _bound_begun_head(self) -> None:
        """A head begun in the read that ended the request before it is timed from then, or
        once reading no longer waits for the answers to those before it."""
        if (
            self._in_message
            and self._awaiting_head
            and self._head_timer is None
            and not self.flow.read_paused
            and not self.transport.is_closing()
        ):
            self._start_head_timer()

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None


PR_SET_PDEATHSIG = 1  # prctl(2)


def stop_with_supervisor() -> None:
    """In each of several workers: SIGTERM (uvicorn's graceful stop) as soon as the supervisor
    is gone. Killed with -9 alone, it had left its workers serving the socket they share, with
    the settings of their start, and no new service could bind the port."""
    parent = multiprocessing.parent_process()
    if parent is None or sys.platform != "linux":
        return
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent.pid:  # gone before the call
        os.kill(os.getpid(), signal.SIGTERM)


def _refuse_reload(signum: int, frame: object) -> None:
    """SIGHUP (`systemctl reload`) with one worker. With several, uvicorn's supervisor replaces
    them one at a time; one worker cannot be replaced in place, and SIGHUP's default action had
    ended it mid-request, with no clean stop. It serves on, and says so once a reload."""
    reason = "one worker is not replaced in place: restart it, or run WORKERS=2"
    said = functools.partial(log.warning, "service.reload_refused", extra={"reason": reason})
    # Said from the event loop, not inside what the signal interrupted (a write to the log
    # itself, which would be entered twice); before the loop runs there is nothing to refuse.
    with contextlib.suppress(RuntimeError):
        asyncio.get_running_loop().call_soon_threadsafe(said)


def serve(app: Any, prepare: Callable[[], bool], **options: Any) -> int:
    """Run uvicorn until it stops; the exit status to report. uvicorn's own `run` exits 0 when
    one of several workers failed to start (its supervisor stops all of them quietly), so the
    workers are supervised here, where their exit codes can be seen. `prepare` runs once the
    port is bound, before any worker starts; False stops the start."""
    config = uvicorn.Config(app, **options)
    # Bound and listening before the app starts: a port in use fails before `service.started`
    # and before `prepare` changes anything, and a client that connects during the start waits,
    # not refused (with several workers too: each says its startup is complete before it serves
    # the socket).
    sock = config.bind_socket()
    sock.listen(config.backlog)
    if not prepare():
        sock.close()
        return STARTUP_FAILURE
    if config.workers == 1:
        server = uvicorn.Server(config)
        signal.signal(signal.SIGHUP, _refuse_reload)
        # Its stop by Ctrl-C ends in KeyboardInterrupt, which uvicorn's own `run` catches too:
        # else a traceback after the clean stop.
        with contextlib.suppress(KeyboardInterrupt):
            server.run(sockets=[sock])
        return 0 if server.started else STARTUP_FAILURE
    supervisor = Multiprocess(config, sockets=[sock])
    supervisor.run()
    failed = any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes)
    return STARTUP_FAILURE if failed else 0


# What both the service and the benchmark's ceiling run under.
SERVER_OPTIONS: dict[str, Any] = {
    "http": BoundedHttpToolsProtocol,
    "timeout_keep_alive": KEEP_ALIVE_TIMEOUT,
    "log_config": None,
    "access_log": False,
    "server_header": False,
}
