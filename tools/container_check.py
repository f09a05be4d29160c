"""Run the image's command the way the container would, without a Docker engine.

Reads the Dockerfile's final stage (COPY, ENV, WORKDIR, USER, CMD, HEALTHCHECK) rather than
repeating it, lays out exactly the files it copies in a read-only root-owned tree, installs
requirements.txt into a virtualenv of its own (the build stage), and then, as the Dockerfile's
unprivileged uid with a fresh empty data dir: /health, create and read with a key, the
HEALTHCHECK command as written, SIGTERM -> a clean end within 10 s, restart -> still there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
IMAGE_VENV = ROOT / ".image-venv"
KEY = "container-check-key-1"
CLEAN_EXITS = (0, 143, -signal.SIGTERM)


@dataclass
class Stage:
    """What the final stage of the Dockerfile says about the running container."""

    workdir: str = "/"
    env: dict[str, str] = field(default_factory=dict)
    copies: list[tuple[list[str], str]] = field(default_factory=list)
    user: str = "root"
    cmd: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    joined: list[str] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined]


def final_stage(dockerfile: Path) -> Stage:
    stage = Stage()
    for name, args in instructions(dockerfile):
        if name == "FROM":
            stage = Stage()  # only the last stage is the image
        elif name == "WORKDIR":
            stage.workdir = args
        elif name == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                stage.env[key] = value
        elif name == "COPY" and not args.startswith("--from"):
            *sources, dest = shlex.split(args)
            stage.copies.append((sources, dest))
        elif name == "USER":
            stage.user = args
        elif name == "CMD":
            stage.cmd = json.loads(args)
        elif name == "HEALTHCHECK":
            stage.healthcheck = json.loads(args[args.index("CMD") + 3 :])
    return stage


def world_executable(path: Path) -> bool:
    """Can an unprivileged user reach and run this file (every parent directory traversable)?"""
    path = path.resolve()
    return all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents])


def image_python() -> Path:
    """The build stage: requirements.txt in a virtualenv an unprivileged uid can run."""
    candidates = [Path(sys.executable), Path("/usr/bin/python3"), Path("/usr/local/bin/python3")]
    base = next((c for c in candidates if c.exists() and world_executable(c)), None)
    if base is None:
        sys.exit("container-check: no Python that an unprivileged user can run")
    requirements = (ROOT / "requirements.txt").read_bytes()
    stamp = hashlib.sha256(requirements + str(base.resolve()).encode()).hexdigest()
    stamp_file = IMAGE_VENV / ".stamp"
    if not stamp_file.exists() or stamp_file.read_text() != stamp:
        shutil.rmtree(IMAGE_VENV, ignore_errors=True)
        subprocess.run([str(base), "-m", "venv", str(IMAGE_VENV)], check=True)
        pip = [str(IMAGE_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        subprocess.run(
            [*pip, "--disable-pip-version-check", "-r", str(ROOT / "requirements.txt")], check=True
        )
        stamp_file.write_text(stamp)
    return IMAGE_VENV / "bin"


def lay_out(stage: Stage, root: Path, uid: int, gid: int) -> Path:
    """The image's files under `root`: code read-only and root-owned, data dir for the uid."""
    workdir = root / stage.workdir.lstrip("/")
    workdir.mkdir(parents=True)
    for sources, dest in stage.copies:
        target = workdir / dest if not dest.startswith("/") else root / dest.lstrip("/")
        for source in sources:
            into = target / Path(source).name if dest.endswith("/") else target
            into.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / source, into)
    data_dir = Path(stage.env.get("DATA_DIR", f"{stage.workdir}/data"))
    data = root / str(data_dir).lstrip("/")
    data.mkdir(parents=True, exist_ok=True)
    for path in sorted(root.rglob("*"), reverse=True):
        if path == data or data in path.parents:
            continue
        path.chmod(0o555 if path.is_dir() else 0o444)
    if os.geteuid() == 0:
        os.chown(data, uid, gid)
    root.chmod(0o755)
    return workdir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def request(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("X-API-Key", KEY)
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=5) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"container-check: the command exited with {proc.returncode}")
        try:
            if request("GET", f"{url}/health/ready")[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.1)  # polling a port that is not open yet; nothing to be told instead
    raise SystemExit("container-check: /health/ready did not answer within 20 s")


def check(condition: bool, what: str) -> None:
    if not condition:
        raise SystemExit(f"container-check: FAILED: {what}")
    print(f"ok   {what}")


def main() -> int:
    stage = final_stage(ROOT / "Dockerfile")
    allowed = {
        line[1:]
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    copied = {source for sources, _ in stage.copies for source in sources}
    check(copied | {"requirements.txt"} == allowed, ".dockerignore admits exactly what is copied")
    uid, _, gid = stage.user.partition(":")
    uid_n, gid_n = int(uid), int(gid or uid)
    check(uid_n != 0, f"the image runs as an unprivileged uid ({uid_n})")
    bin_dir = image_python()
    with tempfile.TemporaryDirectory(prefix="image-") as tmp:
        root = Path(tmp)
        workdir = lay_out(stage, root, uid_n, gid_n)
        port = free_port()
        env = {
            key: value.replace(stage.workdir, str(workdir), 1)
            if value.startswith(stage.workdir)
            else value
            for key, value in stage.env.items()
        }
        # The image's virtualenv lives at /opt/venv; here it is the one built above.
        env["PATH"] = f"{bin_dir}:/usr/bin:/bin"
        env.update({"PORT": str(port), "API_KEYS": f"check:{KEY}"})
        as_user: dict[str, Any] = {"user": uid_n, "group": gid_n} if os.geteuid() == 0 else {}
        url = f"http://127.0.0.1:{port}"

        log = (root / "service.log").open("wb")

        def start() -> subprocess.Popen[bytes]:
            proc = subprocess.Popen(
                stage.cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, **as_user
            )
            wait_ready(url, proc)
            return proc

        try:
            run_checks(stage, env, workdir, url, uid_n, as_user, start)
        except SystemExit:
            sys.stderr.write((root / "service.log").read_text()[-5000:])
            raise
        finally:
            log.close()
    return 0


def run_checks(
    stage: Stage,
    env: dict[str, str],
    workdir: Path,
    url: str,
    uid: int,
    as_user: dict[str, Any],
    start: Callable[[], subprocess.Popen[bytes]],
) -> None:
    proc = start()
    check(env.get("HOST") == "0.0.0.0", "HOST=0.0.0.0 from the Dockerfile")  # noqa: S104
    check(request("GET", f"{url}/health") == (200, {"status": "ok"}), "/health answers 200")
    status, doc = request("POST", f"{url}/v1/documents", {"title": "image", "content": "c"})
    check(status == 201, "create with the key answers 201")
    check(request("GET", f"{url}/v1/documents/{doc['id']}") == (200, doc), "read it back")
    health = subprocess.run(
        stage.healthcheck, env=env, cwd=workdir, timeout=10, check=False, **as_user
    )
    check(health.returncode == 0, f"HEALTHCHECK {shlex.join(stage.healthcheck)} exits 0")
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(10)
    check(
        code in CLEAN_EXITS and time.monotonic() - started < 10, f"SIGTERM: exit {code} within 10 s"
    )
    proc = start()
    check(
        request("GET", f"{url}/v1/documents/{doc['id']}") == (200, doc),
        "after a restart the document is still there",
    )
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)
    written = [p for p in workdir.rglob("*") if p.stat().st_uid == uid]
    data_dir = Path(env["DATA_DIR"])
    check(
        all(data_dir in p.parents or p == data_dir for p in written),
        "the service wrote only under its data dir",
    )


if __name__ == "__main__":
    sys.exit(main())
