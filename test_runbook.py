"""The runbook (docs/operations.md) runs as written, against the real service on a temp DATA_DIR.

Each `## ` procedure's ```sh runbook blocks run in order as one bash script, after the blocks
marked `prelude`. Blocks marked `workers` need several workers: they run with WORKERS=2 on each
store, the embedded one and MongoDB (SecantusDB). Blocks marked `sqlite` drive the embedded
store's file with the `sqlite3` shell.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from config import Settings
from conftest import HERE, free_port, require_tool

RUNBOOK = HERE / "docs" / "operations.md"
FENCE = re.compile(r"^```(\S*)[ \t]*(.*?)\n(.*?)^```[ \t]*$", re.M | re.S)
HEADING = re.compile(r"^## (.+)$", re.M)
SCRIPT_TIMEOUT = 240
KEY = "runbook-key-0001"

# What the runbook's four commands are on a service started in the background; the last started
# process group is the service (setsid: it and its workers are stopped as one).
HARNESS = """
service_start() {
  setsid .venv/bin/python main.py >>"$RUN/service.log" 2>&1 &
  SERVICE_PID=$!
  echo "$SERVICE_PID" >>"$RUN/pids"
}
service_stop() { kill -TERM "$SERVICE_PID" 2>/dev/null || true; wait "$SERVICE_PID" || true; }
service_reload() { kill -HUP "$SERVICE_PID"; }
logs() { cat "$RUN/service.log"; }
wait_alive() {
  timeout 30 sh -c 'until curl -fs "$1/health" >/dev/null; do sleep 0.2; done' sh "$BASE"
}
"""


# The corrupt-database procedure meets real damage: with documents on several pages, the first
# and last pages of the documents table (a walk from either end stops at one), the last page of
# a large document's text (which SQLite reads as it is), pages of an index on it, of the tags,
# of the words of `q` and of the cursor secret's table, overwritten while the service is stopped
# (its start would refuse the cursor secret's damage).
# A salvage through `.dump` had lost every document between two damaged pages, and one of the
# cursor secret's page had stopped it, and so had a document whose text was damaged.
DAMAGE = """
for i in $(seq 40); do  # the 20th's text takes pages of its own (overflow pages)
  body=$(printf '{"title": "d%s", "content": "%0*d"}' "$i" $((i == 20 ? 20000 : 300)) 0)
  curl -fsS -o /dev/null "$BASE/v1/documents" -H "X-API-Key: $KEY" --json "$body"
done
service_stop
.venv/bin/python - "$DATA_DIR/documents.db" "$RUN/survivors" <<'EOF'
import sqlite3, sys
with sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True) as conn:
    (size,) = conn.execute("PRAGMA page_size").fetchone()
    (total,) = conn.execute("SELECT count(*) FROM documents").fetchone()
    leaves = "SELECT pageno, ncell FROM dbstat WHERE name = ? AND pagetype = 'leaf' ORDER BY pageno"
    table = conn.execute(leaves, ("documents",)).fetchall()
    others = [conn.execute(leaves, (name,)).fetchall()[-1] for name in
              ("documents_created", "tags", "words_data", "meta")]
    overflow = conn.execute(
        "SELECT max(pageno), 1 FROM dbstat WHERE name = 'documents' AND pagetype = 'overflow'"
    ).fetchone()
assert len(table) >= 4, table
damaged = [table[0], table[-1], overflow, *others]
lost = table[0][1] + table[-1][1] + 1  # the large document sits on a leaf between them
with open(sys.argv[1], "r+b") as database:
    for page, _ in damaged:
        database.seek((page - 1) * size)
        database.write(bytes(range(256)) * (size // 256))
open(sys.argv[2], "w").write(str(total - lost))
EOF
"""
SURVIVORS = 'test "$(documents)" = "$(cat "$RUN/survivors")"'


@dataclass(frozen=True)
class Block:
    procedure: str
    tags: frozenset[str]
    text: str


def blocks(kind: str) -> list[Block]:
    """The fenced blocks of a kind (`sh`, `yaml`) whose tags start with `runbook` or are named."""
    text = RUNBOOK.read_text()
    headings = [(m.start(), m.group(1)) for m in HEADING.finditer(text)]
    found = []
    for fence in FENCE.finditer(text):
        language, tags, body = fence.groups()
        if language != kind or not tags:
            continue
        procedure = next((h for at, h in reversed(headings) if at < fence.start()), "")
        found.append(Block(procedure, frozenset(tags.split()), body))
    return found


# A procedure's blocks tagged with a mode run, after its untagged ones, in a case of their own.
MODES = {
    "": "on the embedded store",
    "workers": "with WORKERS=2 on MongoDB",
    "sqlite": "on the SQLite store",
    "mongo-down": "with MongoDB unreachable",
    "redis-down": "with Redis unreachable",
}


def procedures() -> list[Any]:
    """One case per procedure and mode: its untagged blocks alone, then with each mode's."""
    runbook = [b for b in blocks("sh") if "runbook" in b.tags and "prelude" not in b.tags]
    cases = []
    for name in dict.fromkeys(b.procedure for b in runbook):
        own = [b for b in runbook if b.procedure == name]
        for mode, how in MODES.items():
            steps = [b for b in own if not b.tags & MODES.keys() or mode in b.tags]
            if any(mode in b.tags for b in steps) or (not mode and steps):
                cases.append(pytest.param(steps, mode, id=f"{name}, {how}"))
            if mode == "workers" and any(mode in b.tags for b in steps):
                # The embedded store's workers share its file: the same steps there too.
                how = "with WORKERS=2 on the embedded store"
                cases.append(pytest.param(steps, "", id=f"{name}, {how}"))
    return cases


def _app_dir(root: Path) -> Path:
    """The service's directory as an operator has it: its modules, samples, .venv and a .env."""
    app = root / "app"
    (app / "data").mkdir(parents=True)
    for module in HERE.glob("*.py"):
        if not module.name.startswith(("test_", "conftest")):
            (app / module.name).symlink_to(module)
    (app / "data" / "sample_documents.json").symlink_to(HERE / "data" / "sample_documents.json")
    (app / ".venv").symlink_to(sys.prefix)  # the virtualenv running these tests
    return app


def _environment(root: Path, key: str) -> dict[str, str]:
    # Only what the runbook names: no setting of the developer's leaks into the service.
    settings = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k not in settings}
    port = free_port()
    (root / "backups").mkdir()
    return env | {
        "RUN": str(root),
        "DATA_DIR": str(root / "data"),
        "PORT": str(port),
        "BASE": f"http://127.0.0.1:{port}",
        "KEY": key,
        "BACKUPS": str(root / "backups"),
    }


def _stop_all(pids_file: Path) -> None:
    for line in pids_file.read_text().split() if pids_file.exists() else []:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(int(line), signal.SIGKILL)


def _run(
    root: Path,
    settings: list[str],
    steps: list[str],
    *,
    ready: bool = True,
    default_data_dir: bool = False,
) -> None:
    """Start the service (seeded, and ready, unless a dependency is meant to be down), run the
    steps as one strict bash script, then stop every process it started. With
    `default_data_dir`, the service serves `./data` in its directory, as `make run` does."""
    app = _app_dir(root)
    env = _environment(root, KEY)
    if default_data_dir:
        del env["DATA_DIR"]
    (app / ".env").write_text("".join(f"{line}\n" for line in settings))
    prelude = [b.text for b in blocks("sh") if {"runbook", "prelude"} <= b.tags]
    script = "\n".join(
        [
            HARNESS,
            *prelude,
            '.venv/bin/python main.py seed >>"$RUN/service.log" 2>&1' if ready else "",
            "service_start",
            "wait_ready" if ready else "wait_alive",
            "trap 'kill -TERM \"$SERVICE_PID\" 2>/dev/null; wait' EXIT",
            *steps,
        ]
    )
    try:
        done = subprocess.run(
            ["bash", "-euxo", "pipefail", "-c", script],
            cwd=app,
            env=env,
            capture_output=True,
            text=True,
            timeout=SCRIPT_TIMEOUT,
        )
    finally:
        _stop_all(root / "pids")
    log = (root / "service.log").read_text()
    assert done.returncode == 0, (
        f"exit {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
        f"\n--- service log (last 40 lines)\n" + "\n".join(log.splitlines()[-40:])
    )


@pytest.mark.parametrize(("steps", "mode"), procedures())
def test_the_procedure_runs_as_written(
    steps: list[Block], mode: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    require_tool("curl")
    settings = [f"API_KEYS=ops:{KEY}"]
    if mode == "sqlite":
        require_tool("sqlite3")
    if mode == "workers":
        settings += [f"DATABASE_URL={request.getfixturevalue('mongo_url')}", "WORKERS=2"]
    nowhere = f"127.0.0.1:{free_port()}"  # a port nothing listens on
    if mode == "mongo-down":
        settings += [f"DATABASE_URL=mongodb://{nowhere}/documents", "MONGO_TIMEOUT_MS=500"]
    if mode == "redis-down":
        settings += [f"RATE_LIMIT_STORAGE_URI=redis://{nowhere}/0"]
    texts = [b.text for b in steps]
    if mode == "sqlite" and steps[0].procedure == "A corrupt database":
        texts = [DAMAGE, *texts, SURVIVORS]
    _run(tmp_path, settings, texts, ready=not mode.endswith("-down"))


def test_the_readme_walkthrough_runs_against_a_fresh_service(tmp_path: Path) -> None:
    """Every step of the README's curl walkthrough succeeds, and each lookup finds its document."""
    require_tool("curl")
    readme = (HERE / "README.md").read_text()
    walk = readme[readme.index("## A walk through the API") :]
    block = next(m.group(3) for m in FENCE.finditer(walk) if m.group(1) == "sh")
    # The walkthrough names the default address; the test's service has a port of its own.
    assert block.startswith("BASE=http://127.0.0.1:8000\n")
    steps = [block.removeprefix("BASE=http://127.0.0.1:8000\n")]
    _run(tmp_path, [f"API_KEYS=ops:{KEY}"], steps, default_data_dir=True)


def test_the_kubernetes_manifest_runs_one_replica_on_its_own_volume() -> None:
    (manifest,) = [b for b in blocks("yaml") if "kubernetes" in b.tags]
    claim, deployment = yaml.safe_load_all(manifest.text)
    assert claim["kind"] == "PersistentVolumeClaim"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    spec = deployment["spec"]
    assert (spec["replicas"], spec["strategy"]["type"]) == (1, "Recreate")
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["fsGroup"] == 10001
    (container,) = pod["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    data = volumes[mounts["/app/data"]]
    assert data["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert container["securityContext"]["readOnlyRootFilesystem"]
    assert "emptyDir" in volumes[mounts["/tmp"]]


@pytest.mark.parametrize(
    "block", blocks("sh"), ids=lambda b: f"{b.procedure} {' '.join(sorted(b.tags))}"
)
def test_every_runbook_block_is_valid_bash(block: Block) -> None:
    """Every block parses, whether or not its mode can run here."""
    done = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_every_procedure_is_found() -> None:
    names = {b.procedure for b in blocks("sh") if "runbook" in b.tags}
    assert {
        "Deploy strategies",
        "Backup and restore",
        "Upgrade and rollback",
        "Rotating API keys",
        "A corrupt database",
        "A full disk",
        "An unreachable MongoDB or Redis",
        "Reading the logs for a request id",
    } <= names
