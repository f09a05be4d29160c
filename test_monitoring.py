"""Alerts, the dashboard and the metrics they read: checked by promtool, by their structure, and
against a real Prometheus scraping the real service."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from limits import parse_many
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from secantus import SecantusDBServer

from config import Settings
from conftest import (
    HERE,
    KEY,
    OTHER_KEY,
    Service,
    ServiceFactory,
    TcpProxy,
    app_client,
    free_port,
    require_tool,
    scrape,
    until_ready,
)
from metrics import DATABASE_FILE, WAL_FILE, Metrics

DEPLOY = HERE / "deploy"
ALERTS = DEPLOY / "alerts.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "documents.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "documents.yaml"
DOC = {"title": "t", "content": "c", "tags": ["x"]}
FILE_METRICS = (
    "store_database_bytes",
    "store_wal_bytes",
    "data_dir_free_bytes",
    "data_dir_size_bytes",
)
# deploy/alerts.yml writes each expression as `<measure> <comparison> <number>`.
THRESHOLD = re.compile(r"^(?P<measure>.+)\s(?:==|!=|>=|<=|>|<)\s+[0-9.]+\s*$", re.DOTALL)


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load(ALERTS)["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(panel["title"], target["expr"]) for panel in panels for target in panel["targets"]]


def values(text: bytes) -> dict[str, float]:
    """Each unlabelled sample of an exposition, by name."""
    families = text_string_to_metric_families(text.decode())
    return {s.name: s.value for family in families for s in family.samples if not s.labels}


# --- promtool ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["check", "rules", str(ALERTS)],
        ["check", "config", str(PROMETHEUS_CONFIG)],
        ["test", "rules", str(DEPLOY / "alerts_test.yml")],
    ],
    ids=["check rules", "check config", "test rules"],
)
def test_promtool_accepts_the_rules_the_config_and_the_rules_unit_tests(
    command: list[str],
) -> None:
    promtool = require_tool("promtool")
    result = subprocess.run([promtool, *command], capture_output=True, check=False, timeout=120)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def test_every_alert_has_a_unit_test_that_fires_and_one_that_does_not() -> None:
    cases = [
        case
        for test in load(DEPLOY / "alerts_test.yml")["tests"]
        for case in test["alert_rule_test"]
    ]
    for rule in alert_rules():
        name = rule["alert"]
        outcomes = {bool(case.get("exp_alerts")) for case in cases if case["alertname"] == name}
        assert outcomes == {True, False}, name
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert rule["annotations"]["summary"], name
        assert rule["annotations"]["description"], name
        assert THRESHOLD.match(rule["expr"].strip()), f"{name}: not `<measure> <op> <number>`"


# --- dashboard and provisioning ---------------------------------------------------------------


def test_dashboard_panels_each_query_the_provisioned_prometheus() -> None:
    (source,) = load(DATASOURCES)["datasources"]
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert dashboard["uid"]
    assert dashboard["title"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        assert panel["title"], panel["id"]
        assert panel["description"], panel["id"]
        assert panel["datasource"] == {"type": source["type"], "uid": source["uid"]}
        targets = panel["targets"]
        assert targets, panel["title"]
        assert len({t["refId"] for t in targets}) == len(targets)
        for target in targets:
            assert target["datasource"] == panel["datasource"]
            assert target["expr"].strip()
            assert target["legendFormat"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area


def test_dashboard_shows_every_metric_an_operator_watches() -> None:
    queries = " ".join(expr for _, expr in dashboard_queries())
    watched = [
        "http_requests_total",
        "http_request_duration_seconds_bucket",
        "store_operation_duration_seconds_count",
        "store_errors_total",
        "rate_limited_total",
        "auth_failures_total",
        "documents_stored",
        *FILE_METRICS,
    ]
    assert [name for name in watched if name not in queries] == []


def test_compose_monitoring_profile_mounts_the_provisioned_files_where_they_point() -> None:
    compose = load(HERE / "compose.yaml")
    services = compose["services"]
    # A plain `docker compose up` still starts the service alone.
    assert [name for name, s in services.items() if "profiles" not in s] == ["documents"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert prometheus["profiles"] == grafana["profiles"] == ["monitoring"]
    mounts = {}
    for service in (prometheus, grafana):
        for volume in service["volumes"]:
            source, target = volume.split(":")[:2]
            if source.startswith("./"):
                assert (HERE / source).exists(), source
                mounts[target] = HERE / source
            else:
                assert source in compose["volumes"], source
    # The image's default command reads this config; its rule_files sit beside it.
    assert mounts["/etc/prometheus/prometheus.yml"] == PROMETHEUS_CONFIG
    for rule_file in load(PROMETHEUS_CONFIG)["rule_files"]:
        assert mounts[f"/etc/prometheus/{rule_file}"] == DEPLOY / rule_file
    assert mounts["/etc/grafana/provisioning"] == GRAFANA / "provisioning"
    (provider,) = load(DASHBOARD_PROVIDERS)["providers"]
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent
    (source,) = load(DATASOURCES)["datasources"]
    assert source["url"] == "http://prometheus:9090"
    assert "127.0.0.1:9090:9090" in prometheus["ports"]
    assert (
        source["jsonData"]["timeInterval"] == load(PROMETHEUS_CONFIG)["global"]["scrape_interval"]
    )


def test_the_provisioned_scrape_interval_is_never_refused_at_the_default_keyless_budget(
    tmp_path: Path,
) -> None:
    """/metrics costs a keyless client its budget: the most scrapes of one target any window of
    the default budget can hold are all answered."""
    interval = int(load(PROMETHEUS_CONFIG)["global"]["scrape_interval"].removesuffix("s"))
    default = Settings.model_fields["keyless_rate_limit"].default
    (budget,) = parse_many(default)
    with app_client(tmp_path, keyless_rate_limit=default) as client:
        scrapes = [client.get("/metrics") for _ in range(budget.get_expiry() // interval + 1)]
    assert [r.status_code for r in scrapes] == [200] * len(scrapes)


def test_a_keyless_flood_from_the_scraper_s_address_leaves_its_scrapes_answered(
    tmp_path: Path,
) -> None:
    """Requests without a valid key from the address Prometheus scrapes from (the same host, or
    the same proxy) had spent the scrape's budget: /metrics answered 429, the target went down
    and DocumentsDown fired. A flood of scrapes is still bounded by the budget."""
    with app_client(tmp_path, keyless_rate_limit="3/minute") as client:
        flood = [client.get("/v1/documents", headers={"X-API-Key": "wrong"}) for _ in range(5)]
        assert [r.status_code for r in flood] == [401] * 3 + [429] * 2
        scrapes = [client.get("/metrics").status_code for _ in range(4)]
    assert scrapes == [200] * 3 + [429]


# --- the metrics the panels need --------------------------------------------------------------


def test_data_dir_files_and_free_space_are_measured_at_each_scrape(tmp_path: Path) -> None:
    metrics = Metrics(data_dir=tmp_path)
    (tmp_path / DATABASE_FILE).write_bytes(b"d" * 8192)
    first = values(metrics.render())
    assert (first["store_database_bytes"], first["store_wal_bytes"]) == (8192, 0)
    (tmp_path / WAL_FILE).write_bytes(b"w" * 1000)
    second = values(metrics.render())
    assert (second["store_database_bytes"], second["store_wal_bytes"]) == (8192, 1000)
    volume = os.statvfs(tmp_path)
    assert second["data_dir_size_bytes"] == volume.f_blocks * volume.f_frsize
    assert 0 < second["data_dir_free_bytes"] <= second["data_dir_size_bytes"]


def test_a_data_dir_that_is_gone_reads_as_unknown_not_as_a_full_disk(tmp_path: Path) -> None:
    measured = values(Metrics(data_dir=tmp_path / "gone").render())
    assert math.isnan(measured["data_dir_free_bytes"])
    assert math.isnan(measured["data_dir_size_bytes"])


def test_the_embedded_store_reports_its_files_and_volume(tmp_path: Path) -> None:
    with app_client(tmp_path, headers={"X-API-Key": KEY}) as client:
        client.post("/v1/documents", json=DOC)
        families = scrape(client)
        # While the store is open: a clean close folds the WAL into the database.
        on_disk = {
            name: path.stat().st_size if path.exists() else 0
            for name, path in (
                ("store_database_bytes", tmp_path / DATABASE_FILE),
                ("store_wal_bytes", tmp_path / WAL_FILE),
            )
        }
    reported = {name: families[name].samples[0].value for name in FILE_METRICS}
    assert {k: reported[k] for k in on_disk} == on_disk
    assert 0 < reported["data_dir_free_bytes"] <= reported["data_dir_size_bytes"]


def test_store_failures_are_counted_by_kind_and_a_clients_mistakes_are_not(
    mongo_server: SecantusDBServer, mongo_url: str, tmp_path: Path
) -> None:
    proxy = TcpProxy(mongo_server.address)
    proxy.start()
    database = mongo_url.rsplit("/", 1)[1]
    url = f"mongodb://{proxy.address}/{database}?directConnection=true"
    try:
        with app_client(
            tmp_path, headers={"X-API-Key": KEY}, database_url=url, mongo_timeout_ms=500
        ) as client:
            until_ready(client)  # a loaded host may make the indexes after the start: 503s
            before = _store_errors(scrape(client))
            doc = client.post("/v1/documents", json=DOC).json()
            assert client.get("/v1/documents/missing").status_code == 404
            stale = client.patch(
                f"/v1/documents/{doc['id']}", json={"title": "u"}, headers={"If-Match": '"9"'}
            )
            assert stale.status_code == 412
            proxy.stop()
            assert client.post("/v1/documents", json=DOC).status_code == 503
            families = scrape(client)
    finally:
        proxy.stop()
    errors = _store_errors(families)
    # MongoDB keeps the documents: the service has no file of its own to measure.
    assert [name for name in FILE_METRICS if name in families] == []
    operations = ("create", "get", "page", "update", "delete", "import", "check")
    # Every operation's StoreUnavailable series exists at 0, so increase() sees a first failure.
    assert set(before) == set(errors) == {(op, "StoreUnavailable") for op in operations}
    assert {series: errors[series] - before[series] for series in errors} == {
        **{(op, "StoreUnavailable"): 0 for op in operations},
        ("create", "StoreUnavailable"): 1,
    }


def _store_errors(families: dict[str, Metric]) -> dict[tuple[str, str], float]:
    return {
        (s.labels["operation"], s.labels["kind"]): s.value
        for s in families["store_errors"].samples
        if s.name == "store_errors_total"
    }


# --- a real Prometheus on the real service ----------------------------------------------------

SCRAPER = "Prometheus/"  # in the access line of each scrape, as its User-Agent
RATE_BUDGET = 20


class Prometheus:
    """/usr/bin/prometheus on a free loopback port, scraping one service every half second with
    deploy/prometheus.yml's job and deploy/alerts.yml's rules."""

    def __init__(self, binary: str, directory: Path, service: Service) -> None:
        config = load(PROMETHEUS_CONFIG)
        config["global"] = {"scrape_interval": "500ms", "evaluation_interval": "500ms"}
        config["rule_files"] = [str(ALERTS)]
        (job,) = config["scrape_configs"]
        job["static_configs"] = [{"targets": [f"127.0.0.1:{service.port}"]}]
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.service = service
        self.log = directory / "prometheus.log"
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={directory / 'prometheus.yml'}",
                    f"--storage.tsdb.path={directory / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def has_ingested_everything_served(self) -> None:
        """Wait, scrape by scrape (each leaves an access line), until Prometheus's request count
        is the service's own: a sample taken after every request so far is in."""
        with self.service.client() as client:
            served = sum(
                s.value
                for s in scrape(client)["http_requests"].samples
                if s.name == "http_requests_total"
            )
        seen = sum(SCRAPER in line for line in self.service.output)
        for more in range(1, 11):
            try:
                self.service.wait_for_line(SCRAPER, timeout=30, count=seen + more)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\nprometheus:\n{self.log.read_text()}") from None
            result = self.query('sum(http_requests_total{job="documents"})')
            if result and float(result[0]["value"][1]) == served:
                return
        raise AssertionError(f"ten scrapes later Prometheus still lacks some of {served} requests")

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert response.status_code == 200, (expr, body)
        assert body["status"] == "success", (expr, body)
        assert not body.get("warnings"), (expr, body["warnings"])
        result: list[dict[str, Any]] = body["data"]["result"]
        return result


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Callable[[Service], Prometheus]]:
    binary = require_tool("prometheus")
    started: list[Prometheus] = []

    def start(service: Service) -> Prometheus:
        started.append(Prometheus(binary, tmp_path, service))
        return started[-1]

    yield start
    for prometheus in started:
        prometheus.stop()


def light_traffic(service: Service) -> None:
    """What a lightly used service sees: each API route once, a 404, a 401, a readiness probe,
    and one key over its budget (429)."""
    nobody = httpx.Client(base_url=service.url, timeout=10)
    with service.client() as alice, service.client(OTHER_KEY) as bob, nobody:
        created = alice.post("/v1/documents", json=DOC)
        assert created.status_code == 201
        path = f"/v1/documents/{created.json()['id']}"
        assert alice.get(path).status_code == 200
        assert alice.patch(path, json={"title": "u"}).status_code == 200
        assert alice.get("/v1/documents").status_code == 200
        assert alice.get("/v1/documents/missing").status_code == 404
        assert alice.delete(path).status_code == 204
        assert nobody.get("/v1/documents").status_code == 401
        assert nobody.get("/health/ready").status_code == 200
        statuses = [bob.get("/v1/documents").status_code for _ in range(RATE_BUDGET + 1)]
        assert statuses[-1] == 429


def test_every_panel_and_alert_measure_returns_numbers_from_a_real_prometheus(
    service_factory: ServiceFactory, prometheus_for: Callable[[Service], Prometheus]
) -> None:
    service = service_factory(
        env={"API_KEYS": f"alice:{KEY},bob:{OTHER_KEY}", "RATE_LIMIT": f"{RATE_BUDGET}/minute"}
    ).start()
    prometheus = prometheus_for(service)
    # Twice: rates need each series sampled before the traffic that moves it.
    for _ in range(2):
        light_traffic(service)
        prometheus.has_ingested_everything_served()
    queries = [
        (title, expr.replace("$__rate_interval", "1m")) for title, expr in dashboard_queries()
    ]
    for rule in alert_rules():
        match = THRESHOLD.match(rule["expr"].strip())
        assert match is not None
        prometheus.query(rule["expr"])  # the whole rule evaluates without an error
        queries.append((rule["alert"], match["measure"]))
    for name, expr in queries:
        result = prometheus.query(expr)
        assert result, f"{name}: no data from {expr}"
        numbers = [float(sample["value"][1]) for sample in result]
        assert all(math.isfinite(n) for n in numbers), f"{name}: {numbers} from {expr}"
