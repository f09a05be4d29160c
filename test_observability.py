"""Logs, metrics and API docs: what an operator and an API user rely on."""

from __future__ import annotations

import io
import json
import logging
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from openapi_spec_validator import validate
from secantus import SecantusDBServer

import problems
from conftest import (
    KEY,
    OTHER_KEY,
    Fate,
    Service,
    ServiceFactory,
    TcpProxy,
    app_client,
    assert_problem,
    make_settings,
    require_tool,
    scrape,
)
from logging_config import configure_logging
from main import DOMAIN_PROBLEMS, create_app

LogLines = Callable[[], list[dict[str, Any]]]
DOC = {"title": "t", "content": "secret body text", "tags": ["x"]}
READER = "reader-key-0003"


@pytest.fixture
def log_lines() -> Iterator[LogLines]:
    stream = io.StringIO()
    configure_logging("INFO", stream=stream)

    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in stream.getvalue().splitlines()]

    yield lines
    configure_logging("INFO")


def access_lines(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in lines if line["logger"] == "documents.access"]


# --- logs -------------------------------------------------------------------------------------


def test_create_logs_event_and_one_access_line_with_every_field(
    tmp_path: Path, log_lines: LogLines
) -> None:
    with app_client(tmp_path) as client:
        response = client.post(
            "/v1/documents",
            json=DOC,
            headers={"X-API-Key": KEY, "X-Request-ID": "req-create-1", "User-Agent": "probe/1"},
        )
    lines = log_lines()
    created = [line for line in lines if line["message"] == "document.created"]
    assert created[0]["document_id"] == response.json()["id"]
    request_id = response.headers["x-request-id"]
    assert request_id != "req-create-1"  # the server's own; the client's is logged beside it
    assert created[0]["request_id"] == request_id
    (access,) = access_lines(lines)
    assert access["level"] == "INFO"
    assert access["timestamp"].endswith("+00:00")
    assert {k: access[k] for k in ("method", "path", "route", "status_code", "api_key")} == {
        "method": "POST",
        "path": "/v1/documents",
        "route": "/v1/documents",
        "status_code": 201,
        "api_key": "alice",
    }
    assert access["user_agent"] == "probe/1"
    assert access["request_id"] == request_id
    assert access["client_request_id"] == "req-create-1"
    assert access["duration_ms"] >= 0
    assert access["client"]
    started = next(line for line in lines if line["message"] == "service.started")
    assert started["backend"] == "sqlite"
    assert started["documents"] == 0
    assert "load_seconds" in started
    assert any(line["message"] == "service.stopped" for line in lines)


def test_client_errors_are_info_and_each_refusal_writes_one_line(
    tmp_path: Path, log_lines: LogLines
) -> None:
    with app_client(tmp_path, api_keys=f"alice:{KEY},reader:{READER}:read") as client:
        client.get("/v1/documents/missing", headers={"X-API-Key": KEY})
        client.post("/v1/documents", json={"title": ""}, headers={"X-API-Key": KEY})
        client.get("/v1/documents", headers={"X-API-Key": "not-a-real-key"})
        client.get("/v1/documents")
        client.post("/v1/documents", json=DOC, headers={"X-API-Key": READER})
    lines = log_lines()
    served = [line for line in lines if line.get("request_id")]
    assert [(a["status_code"], a["level"], a.get("refusal")) for a in served] == [
        (404, "INFO", None),
        (422, "INFO", None),
        (401, "INFO", "key-invalid"),
        (401, "INFO", "key-missing"),
        (403, "INFO", "key-read-only"),
    ]
    assert all(line["message"] == "request" for line in served)
    assert [line for line in lines if line["level"] == "WARNING"] == []


@pytest.mark.parametrize(
    ("settings", "headers", "budget", "level"),
    [
        ({"keyless_rate_limit": "3/minute"}, {}, {"client": "testclient"}, "WARNING"),
        (
            {"keyless_rate_limit": "3/minute"},
            {"X-API-Key": "wrong-key-1"},
            {"client": "testclient"},
            "WARNING",
        ),
        ({"rate_limit": "3/minute"}, {"X-API-Key": KEY}, {"api_key": "alice"}, "INFO"),
    ],
    ids=["no key", "a wrong key", "a key over its budget"],
)
def test_a_flood_over_its_budget_writes_one_line_and_one_summary_per_window(
    tmp_path: Path,
    log_lines: LogLines,
    settings: dict[str, Any],
    headers: dict[str, str],
    budget: dict[str, str],
    level: str,
) -> None:
    """Three requests within the budget, one line each; of the 47 refused after them, the first
    writes its line and the window's summary counts them all (written here at shutdown, before
    the window ends)."""
    with app_client(tmp_path, **settings) as client:
        statuses = [client.get("/v1/documents", headers=headers).status_code for _ in range(50)]
    assert statuses[3:] == [429] * 47
    lines = log_lines()
    assert [a["status_code"] for a in access_lines(lines)] == [*statuses[:3], 429]
    (summary,) = [line for line in lines if line["message"] == "rate_limit.refused"]
    assert summary["refused"] == 47
    assert summary["level"] == level
    assert {k: summary[k] for k in budget} == budget
    assert "request_id" not in summary  # it speaks of many requests, not of one
    others = [line for line in lines if line["level"] != "INFO" and line is not summary]
    assert others == []


def test_the_summary_is_written_when_the_window_ends(service_factory: ServiceFactory) -> None:
    service = service_factory(env={"KEYLESS_RATE_LIMIT": "2/second"}).start()
    with httpx.Client(base_url=service.url) as client:
        statuses = [client.get("/v1/documents").status_code for _ in range(30)]
    assert statuses.count(429) >= 20
    summary = json.loads(service.wait_for_line("rate_limit.refused", timeout=10))
    assert summary["client"] == "127.0.0.1"
    assert 1 <= summary["refused"] <= statuses.count(429)
    assert service.proc is not None
    assert service.proc.poll() is None  # written by the running service, not at shutdown


def test_a_client_gone_before_its_response_is_logged_as_gone_not_as_answered(
    service_factory: ServiceFactory, mongo_server: SecantusDBServer, mongo_url: str
) -> None:
    """A read is held at MongoDB (by a relay) while its client closes the connection: its
    access line, and its slow-request warning, keep the status the service chose and say the
    client never got it."""
    proxy = TcpProxy(mongo_server.address)
    proxy.start()
    url = f"mongodb://{proxy.address}/{mongo_url.rsplit('/', 1)[1]}?directConnection=true"
    service = service_factory(env={"DATABASE_URL": url, "SLOW_REQUEST_MS": "1"}).start()
    held, release = threading.Event(), threading.Event()
    try:
        with service.client() as client:
            doc_id = client.post("/v1/documents", json=DOC).json()["id"]

        def hold_the_read(message: bytes) -> Fate:
            if b"find" in message and doc_id.encode() in message:
                held.set()
                release.wait(10)
            return "deliver"

        proxy.fault = hold_the_read
        with socket.create_connection(("127.0.0.1", service.port)) as sock:
            head = f"GET /v1/documents/{doc_id} HTTP/1.1\r\nHost: t\r\nX-API-Key: {KEY}\r\n\r\n"
            sock.sendall(head.encode())
            assert held.wait(10)
        # The close reached the server before a request sent after it: once that one is
        # answered, the server has seen the client go.
        with service.client() as client:
            assert client.get("/health").status_code == 200
        release.set()
        service.wait_for_line('"client_disconnected"', timeout=10, count=2)
    finally:
        release.set()
        proxy.stop()
    lines = [json.loads(line) for line in service.output if '"client_disconnected"' in line]
    access, slow = lines
    assert access["logger"] == "documents.access"
    assert (access["route"], access["status_code"]) == ("/v1/documents/{document_id}", 200)
    assert access["client_disconnected"] is True
    assert (slow["message"], slow["client_disconnected"]) == ("request.slow", True)


def test_500_is_logged_once_with_traceback_and_request_id(
    tmp_path: Path, log_lines: LogLines
) -> None:
    app = create_app(make_settings(tmp_path))

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("kaboom")

    with TestClient(app) as client:
        response = client.get("/boom", headers={"X-Request-ID": "req-500"})
    lines = log_lines()
    errors = [line for line in lines if line["level"] == "ERROR"]
    assert [e["message"] for e in errors] == ["request.unhandled_error", "request"]
    assert "RuntimeError: kaboom" in errors[0]["exc_info"]
    assert all(e["request_id"] == response.headers["x-request-id"] for e in errors)
    assert errors[1]["client_request_id"] == "req-500"
    assert errors[1]["status_code"] == 500


def test_keys_and_document_content_never_reach_the_log(tmp_path: Path, log_lines: LogLines) -> None:
    with app_client(tmp_path) as client:
        doc = client.post("/v1/documents", json=DOC, headers={"X-API-Key": KEY}).json()
        client.get(f"/v1/documents/{doc['id']}", headers={"X-API-Key": OTHER_KEY})
        client.get("/v1/documents", headers={"X-API-Key": "wrong-but-secret-key"})
        client.get("/v1/documents", headers={"Authorization": "Bearer very-secret-token"})
    text = json.dumps(log_lines())
    for secret in (KEY, OTHER_KEY, "wrong-but-secret-key", "very-secret-token", "secret body"):
        assert secret not in text


def test_probes_write_no_line_and_a_failing_store_is_logged_once(
    tmp_path: Path, log_lines: LogLines
) -> None:
    """Orchestrators poll the probes and strangers may flood them, with any method and without a
    budget: a line each would make the log grow ten times faster than the requests, or 20
    times with three lines each while the store failed. Metrics count them; the store logs
    that it fails once, and once that it answers again."""
    data_dir = tmp_path / "data"
    with app_client(data_dir) as client:
        for path in ("/health", "/health/ready"):
            for method in ("GET", "HEAD", "POST", "OPTIONS", "PROPFIND"):
                assert client.request(method, path).status_code < 500
        assert access_lines(log_lines()) == []
        probes = scrape(client)["http_requests"].samples
        assert sum(s.value for s in probes if s.labels["route"].startswith("/health")) >= 4
        data_dir.rename(tmp_path / "away")  # the volume unmounted, say
        for _ in range(5):
            assert_problem(client.get("/health/ready"), 503)
        (tmp_path / "away").rename(data_dir)
        assert client.get("/health/ready").status_code == 200
    lines = log_lines()
    assert not [line for line in access_lines(lines) if line["route"].startswith("/health")]
    store = [line for line in lines if line["logger"] == "documents.store"]
    assert [line["message"] for line in store] == ["store.unavailable", "store.available"]
    assert store[0]["level"] == "WARNING"


def test_a_head_request_is_logged_and_counted_under_its_route(
    tmp_path: Path, log_lines: LogLines
) -> None:
    with app_client(tmp_path, headers={"X-API-Key": KEY}) as client:
        assert client.head("/v1/documents").status_code == 200
        samples = scrape(client)["http_requests"].samples
    (access,) = [line for line in access_lines(log_lines()) if line["method"] == "HEAD"]
    assert access["route"] == "/v1/documents"
    assert {s.labels["route"] for s in samples if s.labels["method"] == "HEAD"} == {"/v1/documents"}


def test_client_request_id_with_newline_or_quote_is_logged_sanitised(
    tmp_path: Path, log_lines: LogLines
) -> None:
    hostile = 'evil\n{"level": "CRITICAL"}"'
    with app_client(tmp_path) as client:
        response = client.get("/no/such", headers={"X-Request-ID": hostile, "User-Agent": hostile})
    assert response.headers["x-request-id"] != hostile
    lines = log_lines()  # every line still parses as one JSON object
    (access,) = access_lines(lines)
    assert access["request_id"] == response.headers["x-request-id"]
    assert access["client_request_id"] == "evil___level_:__CRITICAL___"
    assert access["user_agent"] == hostile  # kept as data, escaped inside one JSON line


def test_console_format_is_one_readable_line(tmp_path: Path) -> None:
    stream = io.StringIO()
    configure_logging("INFO", json_lines=False, stream=stream)
    try:
        logging.getLogger("documents.api").info("document.created", extra={"document_id": "abc"})
    finally:
        configure_logging("INFO")
    line = stream.getvalue().strip()
    assert "INFO" in line
    assert "document.created document_id='abc'" in line


# --- metrics ----------------------------------------------------------------------------------


def test_metrics_count_requests_by_route_template(client: TestClient) -> None:
    doc = client.post("/v1/documents", json=DOC).json()
    client.get(f"/v1/documents/{doc['id']}")
    client.get("/v1/documents/missing")
    client.get(f"/no/such/{doc['id']}")
    families = scrape(client)
    requests = {
        (s.labels["method"], s.labels["route"], s.labels["status"]): s.value
        for s in families["http_requests"].samples
        if s.name == "http_requests_total"
    }
    assert requests[("POST", "/v1/documents", "201")] == 1
    assert requests[("GET", "/v1/documents/{document_id}", "200")] == 1
    assert requests[("GET", "/v1/documents/{document_id}", "404")] == 1
    assert requests[("GET", "<unmatched>", "404")] == 1
    all_labels = " ".join(str(s.labels) for f in families.values() for s in f.samples)
    assert doc["id"] not in all_labels
    assert "http_request_duration_seconds" in families
    assert "http_requests_in_progress" in families


# Some of the methods httptools accepts beyond those the service serves.
STRANGE_METHODS = ("PROPFIND", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK", "PUT", "TRACE", "PURGE")


def test_keyless_clients_cannot_add_series_to_the_request_metrics(tmp_path: Path) -> None:
    """Probes answer without a key: every method a stranger sends them, on every route, shares
    one label, so the series stay the same few however many methods are tried."""
    with app_client(tmp_path) as client:
        for path in ("/health", "/health/ready", "/metrics", "/v1/documents", "/no/such"):
            for method in STRANGE_METHODS:
                client.request(method, path)
        families = scrape(client)
    series = {
        (s.labels["method"], s.labels["route"], s.labels["status"])
        for s in families["http_requests"].samples
    }
    assert {method for method, _, _ in series} == {"other"}
    assert len(series) <= 5


def test_metrics_track_documents_store_timings_and_refusals(tmp_path: Path) -> None:
    """A request without a valid key refused over its address's budget is an auth failure:
    counted as a key's 429, a guesser had fired the alert saying to raise RATE_LIMIT, and
    never the one on auth failures, which one address's 401s alone cannot reach."""
    with app_client(tmp_path, rate_limit="2/minute", keyless_rate_limit="1/minute") as client:
        client.post("/v1/documents", json=DOC, headers={"X-API-Key": KEY})
        client.post("/v1/documents", json=DOC, headers={"X-API-Key": KEY})
        assert client.get("/v1/documents", headers={"X-API-Key": KEY}).status_code == 429
        for status in (401, 429):
            assert client.get("/v1/documents", headers={"X-API-Key": "wrong"}).status_code == status
        families = scrape(client)
    assert families["documents_stored"].samples[0].value == 2
    assert families["rate_limited"].samples[0].value == 1
    assert families["auth_failures"].samples[0].value == 2
    store_ops = {
        s.labels["operation"]: s.value
        for s in families["store_operation_duration_seconds"].samples
        if s.name.endswith("_count")
    }
    assert store_ops["create"] == 2
    assert "process_resident_memory_bytes" in families
    assert "python_gc_objects_collected" in families


def test_scrapes_are_not_api_traffic_and_fast_reads_land_in_a_bucket(client: TestClient) -> None:
    for _ in range(3):
        client.get("/metrics")
    client.get("/health")
    families = scrape(client)
    routes = {s.labels["route"] for s in families["http_requests"].samples}
    assert "/metrics" not in routes
    assert "/health" in routes
    buckets = [
        float(s.labels["le"])
        for s in families["http_request_duration_seconds"].samples
        if s.name.endswith("_bucket")
    ]
    assert min(buckets) <= 0.0001


def test_metrics_pass_promtool_check(client: TestClient) -> None:
    promtool = require_tool("promtool")
    client.post("/v1/documents", json=DOC)
    text = client.get("/metrics").text
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text.encode(), capture_output=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- API docs ---------------------------------------------------------------------------------


def test_openapi_spec_validates_and_documents_every_operation(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    validate(spec)
    assert spec["info"]["title"] == "Documents API"
    assert "make run" in spec["info"]["description"]
    assert spec["components"]["securitySchemes"]["ApiKey"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "An API key from `API_KEYS` (`name:key:read` keys may only read).",
    }
    expected_errors = {
        ("post", "/v1/documents"): {"401", "409", "413", "422", "429"},
        ("get", "/v1/documents"): {"401", "422", "429"},
        ("get", "/v1/documents/{document_id}"): {"401", "404", "429"},
        ("patch", "/v1/documents/{document_id}"): {"401", "404", "409", "412", "413", "422", "429"},
        ("delete", "/v1/documents/{document_id}"): {"401", "404", "412", "429"},
    }
    for path in ("/health", "/health/ready", "/metrics"):
        assert "security" not in spec["paths"][path]["get"]
    for (method, path), errors in expected_errors.items():
        operation = spec["paths"][path][method]
        assert operation["summary"]
        assert operation["description"]
        assert operation["tags"]
        assert operation["security"] == [{"ApiKey": []}]
        assert errors <= set(operation["responses"]), (method, path)
        for status in errors:
            content = operation["responses"][status]["content"]
            assert list(content) == ["application/problem+json"]
            problem = content["application/problem+json"]
            assert problem["schema"] == {"$ref": "#/components/schemas/Problem"}
            assert problem["example"]["status"] == int(status)
        assert "X-Request-ID" in operation["responses"][next(iter(errors))]["headers"]
    create = spec["paths"]["/v1/documents"]["post"]
    assert {"ETag", "Location"} <= set(create["responses"]["201"]["headers"])
    assert "Retry-After" in create["responses"]["429"]["headers"]
    schemas = spec["components"]["schemas"]
    assert schemas["DocumentCreate"]["examples"]
    assert schemas["Document"]["examples"]
    assert schemas["Problem"]["examples"]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_reference_no_outside_host(client: TestClient, page: str) -> None:
    html = client.get(page).text
    assert "http://" not in html
    assert "https://" not in html
    for asset in ("/docs-static/swagger-ui-bundle.js", "/docs-static/redoc.standalone.js"):
        assert client.get(asset).status_code == 200


def test_swagger_ui_works_offline_in_a_real_browser(service_factory: ServiceFactory) -> None:
    chromium = require_tool("chromium")
    from playwright.sync_api import Route, sync_playwright

    service: Service = service_factory().start()
    outside: list[str] = []

    def block_outside(route: Route) -> None:
        url = route.request.url
        if url.startswith(service.url):
            route.continue_()
        else:
            outside.append(url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page()
            page.route("**/*", block_outside)
            page.goto(f"{service.url}/docs")
            page.get_by_role("button", name="Authorize").click()
            page.locator("input[type=text]").last.fill(KEY)
            page.locator(".auth-btn-wrapper button.authorize").click()
            page.locator("button.btn-done").click()
            operation = page.locator("#operations-documents-create_document")
            operation.locator(".opblock-summary").click()
            operation.get_by_role("button", name="Try it out").click()
            operation.get_by_role("button", name="Execute").click()
            status = operation.locator(".live-responses-table tbody .response-col_status").first
            status.wait_for(timeout=15_000)
            assert status.inner_text().strip().startswith("201")
        finally:
            browser.close()
    assert outside == []
    with service.client() as client:
        assert client.get("/v1/documents").json()["items"][0]["title"] == "Quarterly report"


def test_every_problem_the_error_map_answers_with_is_described_in_the_spec(
    client: TestClient,
) -> None:
    assert set(DOMAIN_PROBLEMS.values()) <= set(problems.ALL)
    responses = [
        (status, response["description"])
        for operations in client.get("/openapi.json").json()["paths"].values()
        for operation in operations.values()
        for status, response in operation["responses"].items()
    ]
    for kind in problems.ALL:
        if kind is not problems.METHOD_NOT_ALLOWED:  # a path's, not an operation's
            assert any(
                status == str(kind.status) and kind.description in text
                for status, text in responses
            ), kind
