"""Build the Dockerfile with podman and run the image the way an engine and compose.yaml would.

No Docker engine and no Docker Hub here, so the `FROM` image is a stand-in of the same name built
from Debian bookworm packages (mmdebstrap, then `podman import`) and kept in podman's store for the
next run. The image is built as the Dockerfile says (`--format docker`, or podman drops
HEALTHCHECK), then checked with a named volume and a key: health, the API, restart, stop, the
user, what it may write, a read-only root filesystem, seeding, a root-owned bind mount, and
compose.yaml under podman-compose. Every container, volume and directory it makes is removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# podman's limits and runtime for this machine (see the file's comments).
CONTAINERS_CONF = ROOT / "tools" / "containers.conf"
IMAGE = "localhost/documents-service:check"
KEY = "container-check-key-1"
NAME = f"documents-check-{os.getpid()}"
CLEAN_EXITS = (0, 143)
STOP_GRACE_SECONDS = 10
# pip in the build reaches the index only through the host's CA bundle, mounted read-only.
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
BASE_SUITE = "bookworm"
BASE_PACKAGES = "python3,python3-venv,python-is-python3,ca-certificates,netbase,tzdata"
STAND_IN_LABEL = "documents-service.stand-in"
APT_SOURCES = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
BUILD_TOOLS = ("pip", "setuptools", "wheel")

# Run inside the container as its user: which paths it can write, and which build tools it has.
PROBE = """
import importlib.util, json, pathlib, subprocess
def writable(path):
    path = pathlib.Path(path)
    try:
        if path.is_dir():
            (path / ".probe").touch()
            (path / ".probe").unlink()
        else:
            open(path, "a").close()
    except OSError:
        return False
    return True
site = next(pathlib.Path("/opt/venv/lib").glob("python3*/site-packages"))
paths = ["/app", "/app/main.py", "/app/samples", "/app/samples/sample_documents.json", "/opt/venv",
         "/opt/venv/bin", str(site), str(site / "fastapi" / "__init__.py"), "/app/data"]
cfg = pathlib.Path("/opt/venv/pyvenv.cfg").read_text().splitlines()
home = next(line.split("=", 1)[1].strip() for line in cfg if line.startswith("home"))
tools = "import importlib.util as u; print(*[m for m in %r if u.find_spec(m)])" % (TOOLS,)
base = subprocess.run([home + "/python3", "-c", tools], capture_output=True, text=True, check=True)
print(json.dumps({
    "writable": {p: writable(p) for p in paths},
    "venv_tools": [m for m in TOOLS if importlib.util.find_spec(m)],
    "venv_bin": sorted(p.name for p in pathlib.Path("/opt/venv/bin").iterdir()),
    "base_tools": base.stdout.split(),
}))
"""
PROBE = f"TOOLS = {BUILD_TOOLS!r}\n{PROBE}"
WRITABLE_BY_DESIGN = {"/app/data"}


class CheckFailed(Exception):
    """A check did not hold; the message says which."""


def check(condition: bool, what: str) -> None:
    if not condition:
        raise CheckFailed(what)
    print(f"ok   {what}", flush=True)


def note(text: str) -> None:
    print(f"--   {text}", flush=True)


def run(
    *args: str | Path, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """One command, its output captured; a failure raises with what it said."""
    proc = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise CheckFailed(
            f"{shlex.join(str(a) for a in args)} exited {proc.returncode}:\n"
            f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    return proc


def podman(
    *args: str | Path, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return run("podman", *args, check=check, timeout=timeout)


# --- the base image ---------------------------------------------------------------------------


def from_image() -> str:
    """The one image every FROM names, fully qualified as podman stores it."""
    names = {
        line.split()[1]
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.upper().startswith("FROM ")
    }
    if len(names) != 1:
        raise CheckFailed(f"expected one base image in the Dockerfile, found {sorted(names)}")
    name = names.pop()
    first = name.split("/", 1)[0]
    if "/" not in name:
        return f"docker.io/library/{name}"
    if "." in first or ":" in first or first == "localhost":
        return name
    return f"docker.io/{name}"


def ensure_base(base: str) -> None:
    """Reuse the stand-in while its recipe is unchanged; build it (about 40 s) otherwise."""
    recipe = hashlib.sha256(f"{BASE_SUITE} {BASE_PACKAGES}".encode()).hexdigest()[:16]
    found = podman("image", "inspect", base, check=False)
    if found.returncode == 0:
        labels = json.loads(found.stdout)[0]["Config"].get("Labels") or {}
        if STAND_IN_LABEL not in labels:
            note(f"base: {base} from podman's store, not a stand-in")
            return
        if labels[STAND_IN_LABEL] == recipe:
            return
    sources = [str(p) for p in APT_SOURCES if p.suffix in (".list", ".sources") and p.is_file()]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="base-") as tmp:
        tarball = Path(tmp) / "base.tar"
        run(
            "mmdebstrap", "--quiet", "--variant=minbase", f"--include={BASE_PACKAGES}",
            BASE_SUITE, tarball, *sources, timeout=900,
        )  # fmt: skip
        podman(
            "import", "--change", f"LABEL {STAND_IN_LABEL}={recipe}",
            "--change", 'CMD ["python3"]', tarball, base, timeout=300,
        )  # fmt: skip
    if found.returncode == 0:
        podman("rmi", json.loads(found.stdout)[0]["Id"], check=False)  # the old recipe's image
    note(f"base: built the stand-in {base} in {time.monotonic() - started:.0f} s")


def describe_base(base: str) -> None:
    labels = json.loads(podman("image", "inspect", base).stdout)[0]["Config"].get("Labels") or {}
    if STAND_IN_LABEL not in labels:
        return
    version = podman("run", "--rm", base, "python", "--version").stdout.split()[-1]
    real = base.rsplit(":", 1)[-1].split("-", 1)[0]
    note(
        f"base: {base} is a local stand-in from Debian {BASE_SUITE} packages with Debian's "
        f"Python {version}, not the real base's Python {real}; the GitHub Actions docker job "
        "builds on the real base"
    )


# --- the image ----------------------------------------------------------------------------------


def build() -> dict[str, Any]:
    old = podman("image", "inspect", "--format", "{{.Id}}", IMAGE, check=False).stdout.strip()
    started = time.monotonic()
    podman(
        "build", "--format", "docker", "--pull=never", "--layers",
        "--volume", f"{CA_BUNDLE}:{CA_BUNDLE}:ro", "--tag", IMAGE, ROOT, timeout=1200,
    )  # fmt: skip
    config: dict[str, Any] = json.loads(podman("image", "inspect", IMAGE).stdout)[0]
    note(f"build: {time.monotonic() - started:.0f} s")
    if old and old != config["Id"]:
        podman("rmi", old, check=False)  # the previous build; its layers stay cached if shared
    return config


def check_image(config: dict[str, Any]) -> dict[str, Any]:
    health: dict[str, Any] = config.get("Healthcheck") or {}
    check(bool(health.get("Test")), f"the image has a HEALTHCHECK: {health.get('Test')}")
    check(config["Config"].get("User") == "10001:10001", "the image's USER is 10001:10001")
    # A module the build leaves out fails only at import, in the container: compare with the tree.
    listed = podman("run", "--rm", "--entrypoint", "ls", IMAGE, "/app").stdout.split()
    modules = {p.name for p in ROOT.glob("*.py") if not p.name.startswith(("test_", "conftest"))}
    shipped = {name for name in listed if name.endswith(".py")}
    check(shipped == modules, f"the image holds every service module and no test ({len(modules)})")
    note(f"image size: {config['Size'] / 1e6:.0f} MB ({IMAGE})")
    return health


# --- containers -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def request(
    method: str, url: str, body: dict[str, Any] | None = None, key: str | None = KEY
) -> tuple[int, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode() if body is not None else None, method=method
    )
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("X-API-Key", key)
    try:
        with urllib.request.urlopen(req, timeout=5) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def state(name: str) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(podman("container", "inspect", name).stdout)[0]["State"]
    return found


def logs(name: str) -> str:
    proc = podman("logs", name, check=False)
    return proc.stdout + proc.stderr


def wait_healthy(name: str, url: str, health: dict[str, Any]) -> None:
    """Run the HEALTHCHECK as an engine would (no systemd here, so podman schedules none):
    every second while the start period lasts, then at the interval, up to the retries."""
    interval = health.get("Interval", 10_000_000_000) / 1e9
    start_period = health.get("StartPeriod", 0) / 1e9
    started = time.monotonic()
    failures = 0
    while True:
        if not state(name)["Running"]:
            raise CheckFailed(f"{name} exited {state(name)['ExitCode']}:\n{logs(name)[-3000:]}")
        if podman("healthcheck", "run", name, check=False, timeout=30).returncode == 0:
            break
        in_start_period = time.monotonic() - started < start_period
        failures += 0 if in_start_period else 1
        if failures >= health.get("Retries", 3):
            raise CheckFailed(f"{name} unhealthy:\n{logs(name)[-3000:]}")
        time.sleep(1 if in_start_period else interval)
    status = state(name).get("Health", {}).get("Status")
    check(status == "healthy", f"{name} healthy after {time.monotonic() - started:.1f} s")
    deadline = time.monotonic() + 10
    while request("GET", f"{url}/health/ready", key=None)[0] != 200:
        if time.monotonic() > deadline:
            raise CheckFailed(f"{url}/health/ready never answered 200")
        time.sleep(0.2)  # the port forward can trail the healthcheck by a moment


def stop(name: str) -> None:
    started = time.monotonic()
    podman("stop", "--time", str(STOP_GRACE_SECONDS), name, timeout=60)
    elapsed = time.monotonic() - started
    code = state(name)["ExitCode"]
    out = logs(name)
    check(
        elapsed < STOP_GRACE_SECONDS and code in CLEAN_EXITS,
        f"stop: exit {code} in {elapsed:.1f} s",
    )
    check(
        '"service.stopped"' in out and "Traceback" not in out,
        "the log ends the service cleanly (service.stopped, no traceback)",
    )


def uid_of_pid_1(name: str) -> tuple[str, str]:
    status = podman("exec", name, "cat", "/proc/1/status").stdout.splitlines()
    fields = {line.split(":")[0]: line.split()[1:] for line in status if ":" in line}
    return fields["Uid"][0], fields["Gid"][0]


class Checker:
    """Every container, volume and directory the checks make, removed by `cleanup()`."""

    def __init__(self, health: dict[str, Any]) -> None:
        self.health = health
        self.containers: list[str] = []
        self.volumes: list[str] = []
        self.dirs: list[Path] = []

    def volume(self, suffix: str) -> str:
        name = f"{NAME}-{suffix}"
        podman("volume", "create", name)
        self.volumes.append(name)
        return name

    def start(self, suffix: str, mount: str, *options: str) -> tuple[str, str]:
        """`docker run -d` as the README has it, on a free loopback port instead of 8000."""
        name, port = f"{NAME}-{suffix}", free_port()
        self.containers.append(name)
        podman(
            "run", "--detach", "--name", name, "--publish", f"127.0.0.1:{port}:8000",
            "--volume", f"{mount}:/app/data", "--env", f"API_KEYS=check:{KEY}", *options, IMAGE,
        )  # fmt: skip
        return name, f"http://127.0.0.1:{port}"

    def cleanup(self) -> None:
        for name in self.containers:
            podman("rm", "--force", "--time", "0", name, check=False)
        for volume in self.volumes:
            podman("volume", "rm", "--force", volume, check=False)
        for path in self.dirs:
            shutil.rmtree(path, ignore_errors=True)

    def api_and_lifecycle(self) -> str:
        volume = self.volume("data")
        name, url = self.start("main", volume)
        self.wait(name, url)
        check(request("GET", f"{url}/health", key=None) == (200, {"status": "ok"}), "/health")
        status, doc = request("POST", f"{url}/v1/documents", {"title": "image", "content": "c"})
        check(status == 201, "create with the key: 201")
        check(request("GET", f"{url}/v1/documents/{doc['id']}") == (200, doc), "read it back")
        status, problem = request("GET", f"{url}/v1/documents/{doc['id']}", key=None)
        check(status == 401, f"without the key: {status} {problem.get('title')}")
        check(uid_of_pid_1(name) == ("10001", "10001"), "PID 1 runs as uid/gid 10001")
        probe = json.loads(podman("exec", name, "python", "-c", PROBE).stdout)
        writable = sorted(path for path, ok in probe["writable"].items() if ok)
        check(
            writable == sorted(WRITABLE_BY_DESIGN),
            f"of code, samples, the venv and the data dir it may write only {writable}",
        )
        check(
            not probe["venv_tools"] and not probe["base_tools"],
            f"no {'/'.join(BUILD_TOOLS)} in the venv or the base interpreter",
        )
        check(
            not [b for b in probe["venv_bin"] if b.startswith(BUILD_TOOLS)],
            "no pip scripts in /opt/venv/bin",
        )
        # A second process on the data volume shares it: the served API sees its documents.
        seed = podman("exec", name, "python", "main.py", "seed", check=False)
        check(seed.returncode == 0, f"seed while the server runs: exit {seed.returncode}")
        status, page = request("GET", f"{url}/v1/documents?limit=100")
        check(
            status == 200 and len(page["items"]) == 11,
            "the server lists the 10 samples seeded beside it",
        )
        podman("restart", "--time", str(STOP_GRACE_SECONDS), name, timeout=60)
        self.wait(name, url)
        check(
            request("GET", f"{url}/v1/documents/{doc['id']}") == (200, doc),
            "after a restart the document is still there",
        )
        stop(name)
        return volume

    def read_only(self, volume: str) -> None:
        """As compose.yaml runs it: read-only root filesystem, only /tmp a tmpfs."""
        name, url = self.start(
            # The container's /tmp, as compose.yaml mounts it; nothing on the host.
            "read-only",
            volume,
            "--read-only",
            "--read-only-tmpfs=false",
            "--tmpfs",
            "/tmp",  # noqa: S108
        )
        self.wait(name, url)
        status, _ = request("POST", f"{url}/v1/documents", {"title": "ro", "content": "c"})
        check(status == 201, "read-only root filesystem with a tmpfs /tmp: serves and writes")
        stop(name)

    def seeding(self) -> None:
        """The README's order: seed into the fresh volume, then start the server on it."""
        volume = self.volume("seeded")
        seed = podman(
            "run", "--rm", "--volume", f"{volume}:/app/data", IMAGE, "python", "main.py", "seed"
        )
        check(seed.returncode == 0, "seed before the first start: exit 0")
        name, url = self.start("seeded", volume)
        self.wait(name, url)
        samples = len(json.loads((ROOT / "data" / "sample_documents.json").read_text()))
        status, page = request("GET", f"{url}/v1/documents?limit=100")
        check(
            status == 200 and len(page["items"]) == samples, f"then it serves the {samples} samples"
        )
        stop(name)

    def bind_mount(self) -> None:
        """A fresh host directory is root's: the service must refuse it with the README's
        explanation, and run once it is chowned to 10001:10001."""
        path = Path(tempfile.mkdtemp(prefix="documents-bind-"))
        self.dirs.append(path)
        path.chmod(0o755)
        name, _ = self.start("bind-root", str(path))
        deadline = time.monotonic() + 30
        while state(name)["Running"]:
            if time.monotonic() > deadline:
                raise CheckFailed("the service ran on a root-owned bind mount")
            time.sleep(0.2)  # waiting for the container to exit; podman has no wait-with-timeout
        out = logs(name)
        refused = next((line for line in out.splitlines() if "store.open_failed" in line), "")
        reason = json.loads(refused)["error"] if refused else out[-500:]
        code = state(name)["ExitCode"]
        check(
            code != 0 and "Permission denied" in refused,
            f"a root-owned bind mount is refused, exit {code}: {reason}",
        )
        os.chown(path, 10001, 10001)
        name, url = self.start("bind-chowned", str(path))
        self.wait(name, url)
        check(True, "after chown 10001:10001 it serves from the bind mount")
        stop(name)

    def wait(self, name: str, url: str) -> None:
        wait_healthy(name, url, self.health)


# --- compose ----------------------------------------------------------------------------------


@contextmanager
def compose_project() -> Iterator[tuple[list[str], str]]:
    """podman-compose on compose.yaml with an .env made as the README says (from .env.example)."""
    project = NAME.replace("-", "")
    tmp = Path(tempfile.mkdtemp(prefix="documents-compose-"))
    port = free_port()
    example = (ROOT / ".env.example").read_text()
    env_file = tmp / ".env"
    env_file.write_text(
        example.replace("API_KEYS=dev:change-me-to-a-long-random-string", f"API_KEYS=check:{KEY}")
        + f"DOCUMENTS_PORT={port}\n"
    )
    compose = [
        str(Path(sys.executable).with_name("podman-compose")),
        "--project-name", project, "--env-file", str(env_file), "-f", str(ROOT / "compose.yaml"),
    ]  # fmt: skip
    # compose.yaml's `image:` is what `up` runs; it is the image just built.
    image = compose_image()
    podman("tag", IMAGE, image)
    try:
        yield compose, f"http://127.0.0.1:{port}"
    finally:
        run(*compose, "down", "--volumes", check=False, timeout=120)
        for name in podman(
            "ps", "--all", "--quiet", "--filter", f"label=io.podman.compose.project={project}"
        ).stdout.split():
            podman("rm", "--force", "--time", "0", name, check=False)
        podman("volume", "rm", "--force", f"{project}_documents-data", check=False)
        podman("untag", IMAGE, image, check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def compose_image() -> str:
    line = next(
        line
        for line in (ROOT / "compose.yaml").read_text().splitlines()
        if "image: documents" in line
    )
    return "localhost/" + line.split("image:", 1)[1].strip()


def check_compose(health: dict[str, Any]) -> None:
    with compose_project() as (compose, url):
        run(*compose, "up", "--detach", timeout=300)
        project = compose[compose.index("--project-name") + 1]
        names = podman(
            "ps",
            "--all",
            "--format",
            "{{.Names}}",
            "--filter",
            f"label=io.podman.compose.project={project}",
        ).stdout.split()
        check(
            len(names) == 1,
            f"compose up starts the one default service (profiles honoured): {names}",
        )
        name = names[0]
        wait_healthy(name, url, health)
        inspect = json.loads(podman("container", "inspect", name).stdout)[0]
        check(
            inspect["HostConfig"].get("ReadonlyRootfs") is True,
            "compose: read-only root filesystem",
        )
        status, doc = request("POST", f"{url}/v1/documents", {"title": "compose", "content": "c"})
        check(status == 201, "compose: create with the key: 201")
        check(
            request("GET", f"{url}/v1/documents/{doc['id']}") == (200, doc), "compose: read it back"
        )
        started = time.monotonic()
        run(*compose, "down", timeout=120)
        elapsed = time.monotonic() - started
        left = podman(
            "ps", "--all", "--quiet", "--filter", f"label=io.podman.compose.project={project}"
        ).stdout.split()
        check(
            not left and elapsed < STOP_GRACE_SECONDS + 5,
            f"compose down in {elapsed:.1f} s, nothing left",
        )


def main() -> int:
    started = time.monotonic()
    os.environ["CONTAINERS_CONF"] = str(CONTAINERS_CONF)
    allowed = {
        line[1:]
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    instructions = (ROOT / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    copied = {
        source
        for line in instructions
        if line.startswith("COPY ") and "--from" not in line
        for source in line.split()[1:-1]
    }
    # The build fails on a missing file but not on one admitted and never copied.
    check(copied == allowed, ".dockerignore admits exactly what the Dockerfile copies")
    base = from_image()
    ensure_base(base)
    describe_base(base)
    config = build()
    health = check_image(config)
    checker = Checker(health)
    try:
        volume = checker.api_and_lifecycle()
        checker.read_only(volume)
        checker.seeding()
        checker.bind_mount()
        check_compose(health)
    except CheckFailed as exc:
        print(f"container-check: FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        checker.cleanup()
    print(f"container-check: passed in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    # Stopped (a CI time limit): the containers it started are removed all the same, as
    # SystemExit runs the finally blocks that SIGTERM's default would skip.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        sys.exit(main())
    except CheckFailed as exc:
        sys.exit(f"container-check: FAILED: {exc}")
