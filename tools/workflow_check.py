"""Run the workflow's lint and test jobs, step by step, in a container standing in for GitHub's
runner: Debian, a `runner` user with passwordless sudo, CI=true, and nothing the workflow does
not install itself (no Redis, no Prometheus, no browser).

The steps come from .github/workflows/ci.yml, so the check follows the workflow as it changes.
`actions/checkout` is a copy of the tree (what git tracks or would track); `actions/setup-python`
puts a pyenv build of the asked version first on PATH; `cache: pip` is a pip cache kept between
runs, as apt's downloads are. Any other action, or a step key this cannot honour, fails the check.
The test job runs for one matrix entry (MATRIX_PYTHON), the full suite.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from container_check import CA_BUNDLE, CONTAINERS_CONF, ROOT, CheckFailed, ensure_base, from_image
from container_check import podman as podman_

WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
JOBS = ("lint", "test")
# The matrix entry run here: the Python the image ships and the lint job uses, so one
# interpreter serves both jobs; .ci/run tests the other versions on the host.
MATRIX_PYTHON = "3.12"
IMAGE = "localhost/documents-ci-runner"
RECIPE_LABEL = "documents-service.runner-recipe"
# GitHub's runner: uid 1001, the workspace under its home, CI and GITHUB_ACTIONS set.
UID = 1001
HOME = "/home/runner"
WORKSPACE = f"{HOME}/work/documents-service"
TEMP = f"{HOME}/work/_temp"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Kept between runs, so a second run downloads neither packages nor wheels again.
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "documents-ci"
# What ubuntu-latest has and a minimal Debian lacks: sudo, make, git, and the libraries a pyenv
# build links against (Debian's python3 in the base brings the rest); tini reaps orphans as
# the runner's init does.
RUNNER_RECIPE = f"""\
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \\
    --no-install-recommends sudo make git curl procps util-linux tini \\
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid {UID} --shell /bin/bash runner \\
    && echo 'runner ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/runner \\
    && chmod 711 /root
"""
EXPRESSION = re.compile(r"\$\{\{\s*([^}]*?)\s*\}\}")
STEP_KEYS = {"name", "run", "uses", "with", "env"}


def podman(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return podman_(*args, timeout=timeout)


def pyenv_build(version: str) -> Path:
    """The newest pyenv build of `version` (3.12 -> 3.12.x)."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    pattern = re.compile(rf"{re.escape(version)}\.(\d+)")
    patches = {int(m[1]): p for p in root.iterdir() if (m := pattern.fullmatch(p.name))}
    builds = [patches[n] for n in sorted(patches)]
    if not builds:
        raise CheckFailed(f"no pyenv build of Python {version} in {root} (pyenv install {version})")
    return builds[-1]


def runner_image(python: Path) -> str:
    """The stand-in with this Python at its pyenv path, owned by the runner; rebuilt only when
    the recipe or the Python changes."""
    base = from_image()
    ensure_base(base)
    recipe = f"FROM {base}\n{RUNNER_RECIPE}COPY --chown={UID}:{UID} . {python}\n"
    digest = hashlib.sha256(f"{recipe}{python.stat().st_mtime}".encode()).hexdigest()[:16]
    tag = f"{IMAGE}:{python.name}"
    found = podman_("image", "inspect", tag, check=False)
    if found.returncode == 0:
        labels = json.loads(found.stdout)[0]["Config"].get("Labels") or {}
        if labels.get(RECIPE_LABEL) == digest:
            return tag
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="runner-") as tmp:
        containerfile = Path(tmp) / "Containerfile"
        containerfile.write_text(f"{recipe}LABEL {RECIPE_LABEL}={digest}\n")
        podman(
            "build", "--pull=never", "--layers", "--file", containerfile, "--tag", tag, python,
            timeout=900,
        )  # fmt: skip
    if found.returncode == 0:
        podman_("rmi", json.loads(found.stdout)[0]["Id"], check=False)  # the old recipe's image
    print(f"--   runner image {tag} built in {time.monotonic() - started:.0f} s", flush=True)
    return tag


def expand(text: str, context: dict[str, Any]) -> str:
    """`${{ matrix.x }}` and the like; an expression it cannot evaluate fails the check."""

    def value(match: re.Match[str]) -> str:
        found: Any = context
        for part in match.group(1).split("."):
            if not isinstance(found, dict) or part not in found:
                raise CheckFailed(f"cannot evaluate ${{{{ {match.group(1)} }}}} here")
            found = found[part]
        return str(found)

    return EXPRESSION.sub(value, text)


def checkout(workspace: Path) -> None:
    """What a clean clone holds: the tracked files and the new ones git would not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode()  # fmt: skip
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file() or source.is_symlink():
            (workspace / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, workspace / name, follow_symlinks=False)


def read_env_file(path: Path) -> dict[str, str]:
    """$GITHUB_ENV: NAME=value lines and NAME<<DELIMITER blocks."""
    found: dict[str, str] = {}
    lines = iter(path.read_text().splitlines())
    for line in lines:
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, delimiter = line.split("<<", 1)
            block = []
            for inner in lines:
                if inner == delimiter:
                    break
                block.append(inner)
            found[name] = "\n".join(block)
        elif "=" in line:
            name, value = line.split("=", 1)
            found[name] = value
    return found


def run_job(name: str, job: dict[str, Any], matrix: dict[str, str]) -> float:
    started = time.monotonic()
    context = {"matrix": matrix}
    tmp = Path(tempfile.mkdtemp(prefix=f"runner-{name}-"))
    container = f"documents-ci-{name}-{os.getpid()}"
    try:
        workspace, temp = tmp / Path(WORKSPACE).name, tmp / Path(TEMP).name
        workspace.mkdir()
        temp.mkdir()
        (temp / "env").touch()
        (temp / "path").touch()
        pip_cache, apt_archives, apt_lists = (CACHE / "pip", CACHE / "apt", CACHE / "apt-lists")
        for path in (pip_cache, apt_archives, apt_lists):
            path.mkdir(parents=True, exist_ok=True)
        os.chown(pip_cache, UID, UID)
        env = {
            "CI": "true",
            "GITHUB_ACTIONS": "true",
            "GITHUB_WORKSPACE": WORKSPACE,
            "GITHUB_ENV": f"{TEMP}/env",
            "GITHUB_PATH": f"{TEMP}/path",
            "RUNNER_TEMP": TEMP,
            "HOME": HOME,
            # This machine's CA (mounted below) for pip in any virtualenv, as on the host.
            "PIP_CERT": str(CA_BUNDLE),
        }
        prepend: list[str] = []
        image = ""
        steps = job["steps"]
        for step in steps:
            unknown = set(step) - STEP_KEYS
            if unknown:
                raise CheckFailed(f"{name}: step keys this check cannot honour: {sorted(unknown)}")
        setup = [s for s in steps if str(s.get("uses", "")).startswith("actions/setup-python@")]
        if len(setup) != 1:
            raise CheckFailed(f"{name}: expected one actions/setup-python step")
        version = expand(str(setup[0]["with"]["python-version"]), context)
        python = pyenv_build(version)
        image = runner_image(python)
        podman(
            "run", "--detach", "--name", container, "--user", "runner",
            "--shm-size", "1g",
            "--volume", f"{tmp}:{HOME}/work",
            "--volume", f"{pip_cache}:{HOME}/.cache/pip",
            "--volume", f"{apt_archives}:/var/cache/apt/archives",
            "--volume", f"{apt_lists}:/var/lib/apt/lists",
            # This machine reaches package indexes through its own CA, as the image build does.
            "--volume", f"{CA_BUNDLE}:{CA_BUNDLE}:ro",
            image, "tini", "--", "sleep", "infinity",
        )  # fmt: skip
        for number, step in enumerate(steps, 1):
            label = step.get("name") or step.get("uses") or step["run"].splitlines()[0]
            elapsed = time.monotonic() - started
            print(f"::   {name} step {number} at {elapsed:.0f} s: {label}", flush=True)
            uses = str(step.get("uses", ""))
            if uses.startswith("actions/checkout@"):
                checkout(workspace)
                subprocess.run(["chown", "-R", f"{UID}:{UID}", tmp], check=True)
                continue
            if uses.startswith("actions/setup-python@"):
                prepend.append(f"{python}/bin")
                env["pythonLocation"] = str(python)
                continue
            if uses:
                raise CheckFailed(f"{name}: no stand-in for the action {uses}")
            paths = [*reversed((temp / "path").read_text().split()), *prepend, PATH]
            step_env = {
                **env,
                **read_env_file(temp / "env"),
                **{k: expand(str(v), context) for k, v in (step.get("env") or {}).items()},
                "PATH": ":".join(paths),
            }
            command = [
                "podman", "exec", "--user", "runner", "--workdir", WORKSPACE,
                *(f"--env={k}={v}" for k, v in step_env.items()),
                container, "bash", "--noprofile", "--norc", "-eo", "pipefail", "-c",
                expand(step["run"], context),
            ]  # fmt: skip
            if subprocess.run(command, check=False).returncode != 0:
                raise CheckFailed(f"{name}: step {number} ({label}) failed")
    finally:
        podman_("rm", "--force", "--time", "0", container, check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    return time.monotonic() - started


def main() -> int:
    os.environ["CONTAINERS_CONF"] = str(CONTAINERS_CONF)
    jobs = yaml.safe_load(WORKFLOW.read_text())["jobs"]
    try:
        for name in sys.argv[1:] or JOBS:  # a job or two by name: `workflow_check.py test`
            job = jobs[name]
            matrix: dict[str, str] = {}
            if "strategy" in job:
                versions = [str(v) for v in job["strategy"]["matrix"]["python-version"]]
                if MATRIX_PYTHON not in versions:
                    raise CheckFailed(f"{name}: {MATRIX_PYTHON} is not in the matrix {versions}")
                matrix = {"python-version": MATRIX_PYTHON}
            elapsed = run_job(name, job, matrix)
            print(f"ok   workflow job {name} {matrix or ''} passed in {elapsed:.0f} s", flush=True)
    except CheckFailed as exc:
        print(f"workflow-check: FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Stopped (a CI time limit): the containers it started are removed all the same, as
    # SystemExit runs the finally blocks that SIGTERM's default would skip.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    sys.exit(main())
