"""Requests without a key, at full speed, against `python main.py` (run by hand, not by the tests).

Three measurements, each on a fresh service with its logs kept:
- flood: wrk sends keyless GETs from one address for --seconds; the log lines written meanwhile
  are counted, and a keyed client's p50 is measured during the flood and, before it, alone;
- bodies: three keyless clients post 1 MB bodies back to back; /health's p95 meanwhile, and
  alone, and the server's CPU time per post;
- stalled: --stalled connections each send a keyless (then keyed) 1 MiB body but its last byte
  and wait; the process's RSS before, while they wait, and after they close.

`--root DIR` measures another checkout (say, an earlier commit unpacked with `git archive`).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import multiprocessing
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-key-0001"
MB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def service(root: Path, log: Path) -> Iterator[tuple[str, int]]:
    """The service as in production (its default budgets, JSON logs to `log`); yields its URL
    and pid."""
    port = free_port()
    env = {
        "PATH": os.environ["PATH"],
        "API_KEYS": f"bench:{KEY}",
        "RATE_LIMIT": "100000000/minute",  # the keyed client must not be refused
        "PORT": str(port),
    }
    with tempfile.TemporaryDirectory() as data, log.open("w") as out:
        env["DATA_DIR"] = data
        proc = subprocess.Popen([sys.executable, "main.py"], cwd=root, env=env, stdout=out)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    httpx.get(f"{url}/health", timeout=1)
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise SystemExit(f"the service did not start: see {log}") from None
                    time.sleep(0.05)  # not listening yet
            yield url, proc.pid
        finally:
            proc.terminate()
            proc.wait(30)


def timed(client: httpx.Client, method: str, path: str, stop: threading.Event) -> list[float]:
    """Milliseconds per request, one after another, until `stop`."""
    seen = []
    while not stop.is_set():
        started = time.perf_counter()
        client.request(method, path).raise_for_status()
        seen.append((time.perf_counter() - started) * 1000)
    return seen


def for_seconds(seconds: float, measure: Callable[[threading.Event], list[float]]) -> list[float]:
    stop = threading.Event()
    timer = threading.Timer(seconds, stop.set)
    timer.start()
    try:
        return measure(stop)
    finally:
        timer.cancel()


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else float("nan")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User and system CPU time the process has used (fields 14 and 15 of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def log_lines(log: Path, start: int) -> list[dict[str, object]]:
    with log.open("rb") as f:
        f.seek(start)
        return [json.loads(line) for line in f.read().splitlines() if line.startswith(b"{")]


def flood(root: Path, seconds: int, log: Path) -> None:
    with service(root, log) as (url, pid):
        keyed = httpx.Client(base_url=url, headers={"X-API-Key": KEY})
        doc = keyed.post("/v1/documents", json={"title": "t", "content": "c"}).json()["id"]
        path = f"/v1/documents/{doc}"
        alone = for_seconds(5, lambda stop: timed(keyed, "GET", path, stop))
        before, cpu = log.stat().st_size, cpu_seconds(pid)
        wrk = subprocess.Popen(
            ["wrk", "-t1", "-c32", f"-d{seconds}s", f"{url}/v1/documents"],
            stdout=subprocess.PIPE,
            text=True,
        )
        during = for_seconds(seconds, lambda stop: timed(keyed, "GET", path, stop))
        out, _ = wrk.communicate()
        cpu = cpu_seconds(pid) - cpu
        lines = log_lines(log, before)
    sent = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)  # type: ignore[union-attr]
    kinds = collections.Counter(
        f"{line['message']} {line.get('status_code', '')} {line['level']}".strip()
        for line in lines
        if line.get("api_key") != "bench"
    )
    print(f"flood: {sent} keyless requests in {seconds} s ({rate}/s) from one address")
    print(f"  server CPU {cpu:.1f} s, {cpu / (sent + len(during)) * 1e6:.0f} us a request")
    print(f"  log lines written for them: {sum(kinds.values())}: {dict(kinds)}")
    for q in (50, 95):
        print(f"  keyed GET p{q} alone {pct(alone, q):.2f} ms, during it {pct(during, q):.2f} ms")


# 500 000 numbers in an array: 1 MB that the JSON parser takes long over per byte.
BODY = b'{"title": "t", "content": "c", "tags": [' + b",".join([b"1"] * 500_000) + b"]}"
JSON = {"Content-Type": "application/json"}


def post_bodies(url: str, seconds: float, answers: multiprocessing.Queue[dict[str, int]]) -> None:
    """One client posting 1 MB bodies without a key, back to back (a process of its own, so
    that its CPU does not slow the probe's measurement through the GIL)."""
    seen: collections.Counter[str] = collections.Counter()
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=30) as client:
        while time.monotonic() < deadline:
            try:
                response = client.post("/v1/documents", content=BODY, headers=JSON)
                seen[str(response.status_code)] += 1
            except httpx.TransportError as exc:
                seen[type(exc).__name__] += 1
    answers.put(dict(seen))


def bodies(root: Path, seconds: int, log: Path) -> None:
    with service(root, log) as (url, pid):
        probe = httpx.Client(base_url=url)
        cpu = cpu_seconds(pid)
        with httpx.Client(base_url=url, timeout=30) as client:
            for _ in range(20):  # within the keyless budget: each is a 401
                client.post("/v1/documents", content=BODY, headers=JSON)
        one = (cpu_seconds(pid) - cpu) / 20
        alone = for_seconds(5, lambda stop: timed(probe, "GET", "/health", stop))
        queue: multiprocessing.Queue[dict[str, int]] = multiprocessing.Queue()
        posters = [
            multiprocessing.Process(target=post_bodies, args=(url, seconds, queue))
            for _ in range(3)
        ]
        cpu = cpu_seconds(pid)
        for p in posters:
            p.start()
        during = for_seconds(seconds, lambda s: timed(probe, "GET", "/health", s))
        answers: collections.Counter[str] = collections.Counter()
        for _ in posters:
            answers.update(queue.get())
        for p in posters:
            p.join()
        cpu = cpu_seconds(pid) - cpu
    posted = sum(answers.values())
    print(f"bodies: server CPU for one keyless 1 MB post, one at a time: {one * 1000:.1f} ms")
    print(f"bodies: 3 keyless clients posting 1 MB for {seconds} s: {dict(answers)}")
    print(f"  server CPU {cpu:.1f} s, {cpu / posted * 1000:.1f} ms a post (and the probes)")
    print(f"  /health p95 alone {pct(alone, 95):.2f} ms, meanwhile {pct(during, 95):.2f} ms")


def stalled(root: Path, count: int, log: Path) -> None:
    for label, key in (("keyless", ""), ("keyed", f"X-API-Key: {KEY}\r\n")):
        head = (
            f"POST /v1/documents HTTP/1.1\r\nHost: x\r\n{key}"
            f"Content-Type: application/json\r\nContent-Length: {MB}\r\n\r\n"
        ).encode()
        with service(root, log) as (url, pid):
            before = rss_mb(pid)
            port = int(url.rsplit(":", 1)[1])
            sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
            answers: collections.Counter[str] = collections.Counter()
            for sock in sockets:
                sock.settimeout(5)
                with contextlib.suppress(OSError):
                    sock.sendall(head + b"x" * (MB - 1))
            time.sleep(2)  # let the server take what it will
            waiting = rss_mb(pid)
            for sock in sockets:
                sock.settimeout(0.01)
                try:
                    reply = sock.recv(200)
                    answers[reply.split(b" ", 2)[1].decode() if reply else "closed"] += 1
                except TimeoutError:
                    answers["nothing yet"] += 1
                except OSError:
                    answers["reset"] += 1
                sock.close()
            time.sleep(2)  # let the server see them close
            print(
                f"stalled: {count} {label} connections of 1 MiB - 1 byte: RSS {before:.0f} MB "
                f"before, {waiting:.0f} MB while they wait, {rss_mb(pid):.0f} MB after they "
                f"close; what each had been told: {dict(answers)}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to run")
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--stalled", type=int, default=150)
    parser.add_argument("--only", choices=["flood", "bodies", "stalled"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as logs:
        log = Path(logs) / "service.log"
        if args.only in (None, "flood"):
            flood(args.root, args.seconds, log)
        if args.only in (None, "bodies"):
            bodies(args.root, args.seconds, log)
        if args.only in (None, "stalled"):
            stalled(args.root, args.stalled, log)


if __name__ == "__main__":
    main()
