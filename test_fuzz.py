"""Schema-driven fuzzing: schemathesis against the running service's own OpenAPI document, with
every check (`positive_data_acceptance` too: what the document calls valid is accepted) in every
phase. Its only exceptions are listed, with their reasons, in schemathesis.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import HERE, KEY, ServiceFactory


def test_schemathesis_finds_nothing(service_factory: ServiceFactory) -> None:
    service = service_factory().start()
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("schemathesis")),
            "--config-file",
            str(HERE / "schemathesis.toml"),
            "run",
            f"{service.url}/openapi.json",
            "--header",
            f"X-API-Key: {KEY}",
            "--checks",
            "all",
            "--phases",
            "examples,coverage,fuzzing,stateful",
            # Fixed, so that a run is repeatable and takes a bounded time (about 15 s).
            "--seed",
            "20261127",
            "--max-examples",
            "60",
            "--generation-database",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "No issues found" in result.stdout
    server_errors = [line for line in service.output if '"status_code":5' in line]
    assert server_errors == []
