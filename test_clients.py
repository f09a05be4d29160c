"""A client generated from the live OpenAPI document (openapi-python-client) runs the README's
walkthrough: a spec that drifts from what the service does fails here."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from conftest import KEY, Service

PACKAGE = "documents_client"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    started = Service(tmp_path_factory.mktemp("client") / "data", {"RATE_LIMIT": "40/minute"})
    yield started.start()
    started.stop_quietly()


@pytest.fixture(scope="module")
def generated(service: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """The client package, generated from what the running service serves at /openapi.json."""
    generator = shutil.which("openapi-python-client", path=str(Path(sys.executable).parent))
    assert generator is not None, "openapi-python-client is in requirements-dev.txt"
    root = tmp_path_factory.mktemp("generated")
    spec = root / "openapi.json"
    spec.write_bytes(httpx.get(f"{service.url}/openapi.json").content)
    command = ["generate", "--path", str(spec), "--output-path", str(root / PACKAGE)]
    result = subprocess.run(
        [generator, *command, "--meta", "none"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m.split(".")[0] == PACKAGE]:
            del sys.modules[name]


def api(generated: ModuleType, operation: str) -> Any:
    return importlib.import_module(f"{PACKAGE}.api.documents.{operation}")


def test_the_generated_client_runs_the_walkthrough_with_typed_problems(
    generated: ModuleType, service: Service
) -> None:
    models = importlib.import_module(f"{PACKAGE}.models")
    client = generated.AuthenticatedClient(
        base_url=service.url, token=KEY, prefix="", auth_header_name="X-API-Key"
    )
    body = models.DocumentCreate.from_dict(
        {"title": "Quarterly report", "content": "Revenue grew.", "tags": ["finance"]}
    )
    created = api(generated, "create_document").sync_detailed(
        client=client, body=body, idempotency_key="walkthrough-1"
    )
    assert created.status_code == 201
    doc = created.parsed
    assert isinstance(doc, models.Document)
    assert created.headers["location"] == f"/v1/documents/{doc.id}"
    replayed = api(generated, "create_document").sync_detailed(
        client=client, body=body, idempotency_key="walkthrough-1"
    )
    assert replayed.parsed.id == doc.id

    read = api(generated, "read_document")
    etag = read.sync_detailed(document_id=doc.id, client=client).headers["etag"]
    assert (
        read.sync_detailed(document_id=doc.id, client=client, if_none_match=etag).status_code == 304
    )

    for n in range(3):
        api(generated, "create_document").sync(
            client=client, body=models.DocumentCreate.from_dict({"title": f"d{n}", "content": "c"})
        )
    listing = api(generated, "list_documents")
    first = listing.sync(client=client, limit=2)
    assert isinstance(first, models.DocumentPage)
    second = listing.sync(client=client, limit=2, cursor=first.next_cursor)
    assert len(first.items) + len(second.items) == 4
    tagged = listing.sync(client=client, tag="finance")
    assert [d.id for d in tagged.items] == [doc.id]

    update = api(generated, "update_document")
    patch = models.DocumentUpdate.from_dict({"title": "Quarterly report (final)"})
    updated = update.sync_detailed(document_id=doc.id, client=client, body=patch, if_match=etag)
    assert updated.status_code == 200
    assert updated.parsed.version == 2
    stale = update.sync(document_id=doc.id, client=client, body=patch, if_match=etag)
    missing = read.sync(document_id="01JDQ7Z8X4M2N6P9R3T5V7W9YB", client=client)
    invalid = api(generated, "create_document").sync(
        client=client, body=models.DocumentCreate.from_dict({"title": " ", "content": "c"})
    )
    for problem, status in ((stale, 412), (missing, 404), (invalid, 422)):
        assert isinstance(problem, models.Problem)
        assert problem.status == status
    assert invalid.errors[0].loc == ["body", "title"]

    deleted = api(generated, "delete_document").sync_detailed(document_id=doc.id, client=client)
    assert deleted.status_code == 204
    assert isinstance(read.sync(document_id=doc.id, client=client), models.Problem)

    limited = None
    for _ in range(40):
        limited = listing.sync(client=client)
        if isinstance(limited, models.Problem):
            break
    assert isinstance(limited, models.Problem)
    assert limited.status == 429
