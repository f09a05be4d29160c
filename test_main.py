"""The HTTP contract, through the real app on a temp data dir."""

from __future__ import annotations

import gzip
import hashlib
import json
import sqlite3
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from fastapi.testclient import TestClient
from limits import parse, parse_many
from limits.aio.strategies import FixedWindowRateLimiter
from limits.storage import storage_from_string
from pydantic import ValidationError

from config import Settings
from conftest import (
    KEY,
    OTHER_KEY,
    app_client,
    assert_problem,
    cursor_values_out_of_range,
    make_settings,
    minted_cursor,
    plain_document,
    walk,
)
from main import create_app
from models import (
    METADATA_KEY_MAX_CHARS,
    METADATA_MAX_KEYS,
    METADATA_STRING_MAX_CHARS,
    TAG_MAX_CHARS,
    TAGS_MAX,
    TITLE_MAX_CHARS,
    DocumentQuery,
)
from ratelimit import LocalStorage, spend

DOC = {"title": "Quarterly report", "content": "Revenue grew.", "tags": ["Finance"]}


def create(client: TestClient, body: dict[str, Any] | None = None, **headers: str) -> Any:
    response = client.post("/v1/documents", json=body or DOC, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


# --- create -----------------------------------------------------------------------------------


def test_create_returns_201_with_location_etag_and_normalised_document(client: TestClient) -> None:
    response = client.post(
        "/v1/documents",
        json={
            "title": "  Hello  ",
            "content": "x",
            "tags": ["B", "b", " a "],
            "metadata": {"n": 1},
        },
    )
    assert response.status_code == 201
    doc = response.json()
    assert response.headers["location"] == f"/v1/documents/{doc['id']}"
    assert response.headers["etag"] == '"1"'
    assert doc["title"] == "Hello"
    assert doc["tags"] == ["b", "a"]
    assert doc["metadata"] == {"n": 1}
    assert doc["version"] == 1
    assert doc["created_at"] == doc["updated_at"]
    assert doc["created_at"].endswith("Z")


def test_ids_are_distinct_url_safe_and_unguessable(client: TestClient) -> None:
    ids = [create(client)["id"] for _ in range(20)]
    assert len(set(ids)) == 20
    assert all(i.isalnum() and len(i) == 26 for i in ids)
    # 80 random bits follow the timestamp: neighbours share no random suffix.
    assert len({i[10:] for i in ids}) == 20


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"title": "   ", "content": "x"}, "title"),
        ({"title": "t" * 201, "content": "x"}, "title"),
        ({"content": "x"}, "title"),
        ({"title": 5, "content": "x"}, "title"),
        ({"title": "t"}, "content"),
        ({"title": "t", "content": ["x"]}, "content"),
        ({"title": "t", "content": "x", "tags": [f"t{i}" for i in range(21)]}, "tags"),
        ({"title": "t", "content": "x", "tags": ["x" * 51]}, "tags"),
        ({"title": "t", "content": "x", "tags": [""]}, "tags"),
        ({"title": "t", "content": "x", "metadata": {"a": {"nested": 1}}}, "metadata"),
        ({"title": "t", "content": "x", "metadata": {f"k{i}": i for i in range(51)}}, "metadata"),
        ({"title": "t", "content": "x", "metadata": {"big": 2**70}}, "metadata"),
        ({"title": "t", "content": "x", "id": "chosen"}, "id"),
        ({"title": "a\x00b", "content": "x"}, "title"),
        ({"title": "line\nbreak", "content": "x"}, "title"),
        ({"title": "t", "content": "x", "tags": ["a\tb"]}, "tags"),
    ],
)
def test_invalid_body_returns_422_naming_the_field(
    client: TestClient, body: dict[str, Any], field: str
) -> None:
    problem = assert_problem(client.post("/v1/documents", json=body), 422)
    assert any(field in e["loc"] for e in problem["errors"]), problem["errors"]
    assert client.get("/v1/documents").json()["items"] == []


# Every number within the 64-bit integers' range, integral floats too: kept as the number sent.
METADATA_NUMBERS = [
    2.0**63 - 2**10,  # the largest float below 2**63
    -(2.0**63) + 2**11,  # the float above -2**63 (which, as JSON writes it, is below the range)
    12.0,
    12.5,
    2**63 - 1,
    -(2**63),
    12,
]


@pytest.mark.parametrize("number", METADATA_NUMBERS, ids=repr)
def test_metadata_keeps_every_finite_number_as_sent_and_finds_it(
    client: TestClient, number: float
) -> None:
    created = create(client, {**DOC, "metadata": {"x": number, "y": 1}})
    patched = client.patch(f"/v1/documents/{created['id']}", json={"metadata": {"y": number}})
    assert patched.status_code == 200, patched.text
    read = client.get(f"/v1/documents/{created['id']}").json()
    assert patched.json() == read
    for value in (created["metadata"]["x"], read["metadata"]["x"], read["metadata"]["y"]):
        assert (type(value), value) == (type(number), number)
    # As JSON writes it, and as an integer's digits: the number they spell.
    for spelled in (json.dumps(number), str(Decimal(number))):
        found = client.get("/v1/documents", params={"metadata.x": spelled}).json()["items"]
        assert [d["id"] for d in found] == [created["id"]], spelled


@pytest.mark.parametrize(
    "literal",
    ["9223372036854775807.0", "9.2233720368547758070e18", "-9223372036854775808.5", "1e400"],
)
def test_a_number_literal_means_the_same_in_a_body_and_in_a_filter(
    client: TestClient, literal: str
) -> None:
    """A literal beside a bound of the range is read on its side of it in a body; a filter had
    read it as its nearest float, past the bound (the document it was stored in was not found),
    or within it (a filter found -2^63 for a literal whose body was refused)."""
    raw = f'{{"title": "t", "content": "c", "metadata": {{"n": {literal}}}}}'
    created = client.post(
        "/v1/documents", content=raw, headers={"Content-Type": "application/json"}
    )
    edge = create(client, {**DOC, "metadata": {"n": -(2**63)}})
    found = client.get("/v1/documents", params={"metadata.n": literal}).json()["items"]
    if created.status_code == 201:
        assert [d["id"] for d in found] == [created.json()["id"]]
    else:
        assert created.status_code in (400, 422)
        assert edge["id"] not in [d["id"] for d in found]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (2**63, "64-bit"),
        (-(2**63) - 1, "64-bit"),
        (2.0**63, "64-bit"),
        (-1e20, "64-bit"),
        (sys.float_info.max, "64-bit"),
        ({"nested": 1}, "a string, a boolean, an integer, a finite number or null"),
        ("x" * (METADATA_STRING_MAX_CHARS + 1), "at most 1000 characters"),
        ("0" * METADATA_STRING_MAX_CHARS + "1", "at most 1000 characters"),  # no number either
    ],
)
def test_a_bad_metadata_value_gets_one_readable_error_at_its_key(
    client: TestClient, value: Any, message: str
) -> None:
    problem = assert_problem(
        client.post("/v1/documents", json={**DOC, "metadata": {"x": value}}), 422
    )
    (error,) = problem["errors"]
    assert error["loc"] == ["body", "metadata", "x"]
    assert message in error["msg"]
    assert problem["detail"] == f"body.metadata.x: {error['msg']}"


@pytest.mark.parametrize(
    "raw",
    [
        '{"title": "t", "content": "x", "metadata": {"n": NaN}}',
        '{"title": "t", "content": "x", "metadata": {"n": -Infinity}}',
        '{"title": "t", "content": "x", "metadata": {"n": 1e999}}',
        '{"title": "t", "content": "x", "title": "again"}',
        '{"title": "t", "content": "x", "metadata": {"k": 1, "k": 2}}',
    ],
)
def test_non_json_numbers_and_duplicate_keys_are_malformed(client: TestClient, raw: str) -> None:
    response = client.post(
        "/v1/documents", content=raw, headers={"Content-Type": "application/json"}
    )
    assert_problem(response, 400)
    assert client.get("/v1/documents").json()["items"] == []


def test_content_longer_than_setting_returns_422(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, max_content_chars=10)
    with TestClient(create_app(settings), headers={"X-API-Key": KEY}) as client:
        problem = assert_problem(
            client.post("/v1/documents", json={"title": "t", "content": "x" * 11}), 422
        )
        assert problem["errors"][0]["loc"] == ["body", "content"]
        assert client.post("/v1/documents", json={"title": "t", "content": "x" * 10}).is_success


@pytest.mark.parametrize("raw", [b'{"title": "t",', b"not json", b'{"title": "\xff"}'])
def test_malformed_json_returns_400_problem(client: TestClient, raw: bytes) -> None:
    response = client.post(
        "/v1/documents", content=raw, headers={"Content-Type": "application/json"}
    )
    assert_problem(response, 400)


def test_a_header_sent_on_several_lines_is_read_whole(client: TestClient) -> None:
    """The first line alone was read: two keys authenticated as the first (a proxy in front
    may have read the other), two Idempotency-Keys created under the first, and If-None-Match
    lines, one list as on one line, answered 200 where their second tag matched."""
    two_keys = [("X-API-Key", KEY), ("X-API-Key", OTHER_KEY)]
    assert_problem(client.get("/v1/documents", headers=two_keys), 401)
    two_retry_keys = [("Idempotency-Key", "k1"), ("Idempotency-Key", "k2")]
    assert_problem(client.post("/v1/documents", json=DOC, headers=two_retry_keys), 422)
    assert client.get("/v1/documents").json()["items"] == []
    made = client.post("/v1/documents", json=DOC)
    tags = [("If-None-Match", '"99"'), ("If-None-Match", made.headers["etag"])]
    assert client.get(made.headers["location"], headers=tags).status_code == 304
    # If-Match lines too: the second named the current version, and the PATCH got 412.
    tags = [("If-Match", '"99"'), ("If-Match", made.headers["etag"])]
    patched = client.patch(made.headers["location"], json={"title": "u"}, headers=tags)
    assert patched.status_code == 200
    stale = [("If-Match", '"98"'), ("If-Match", '"99"')]
    assert_problem(client.delete(made.headers["location"], headers=stale), 412)
    tags = [("If-Match", '"98"'), ("If-Match", patched.headers["etag"])]
    assert client.delete(made.headers["location"], headers=tags).status_code == 204


@pytest.mark.parametrize("coding", ["identity", "identity,,", ", identity", ""])
def test_a_body_labelled_identity_is_stored(client: TestClient, coding: str) -> None:
    """`identity` is no coding at all, and a list may hold empty elements (RFC 9110, 5.6.1):
    `identity,,` was refused 415."""
    headers = {"Content-Type": "application/json", "Content-Encoding": coding}
    assert client.post("/v1/documents", json=DOC, headers=headers).status_code == 201


@pytest.mark.parametrize("coding", ["gzip", "br", "GZIP, identity"])
def test_a_body_with_a_content_encoding_is_refused_415(client: TestClient, coding: str) -> None:
    """No coding is decoded: a body labelled with one was stored as sent, a real gzip body
    answered 400 as malformed JSON."""
    plain = json.dumps({"title": "t", "content": "c"}).encode()
    for body in (plain, gzip.compress(plain)):
        headers = {"Content-Type": "application/json", "Content-Encoding": coding}
        assert_problem(client.post("/v1/documents", content=body, headers=headers), 415)
    assert client.get("/v1/documents").json()["items"] == []


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le"])
def test_a_body_in_another_encoding_than_utf8_is_malformed(
    client: TestClient, encoding: str
) -> None:
    """JSON is UTF-8 (RFC 8259); a UTF-8 byte-order mark is ignored, as it allows."""
    headers = {"Content-Type": "application/json"}
    raw = json.dumps({"title": "t", "content": "\u2241 x"}, ensure_ascii=False)
    assert_problem(client.post("/v1/documents", content=raw.encode(encoding), headers=headers), 400)
    assert client.get("/v1/documents").json()["items"] == []
    marked = client.post("/v1/documents", content=raw.encode("utf-8-sig"), headers=headers)
    assert marked.status_code == 201
    assert marked.json()["content"] == "\u2241 x"


@pytest.mark.parametrize(
    ("method", "content_type", "status"),
    [
        ("POST", "text/plain", 415),
        ("POST", "application/merge-patch+json", 415),
        ("POST", "application/vnd.other+json", 415),
        ("POST", "application/json; charset=latin-1", 415),
        ("POST", 'Application/JSON; Charset="UTF-8"', 201),
        ("PATCH", "application/json", 200),
        ("PATCH", "application/merge-patch+json; charset=utf-8", 200),
        ("PATCH", "application/json-patch+json", 415),
    ],
)
def test_a_body_is_taken_in_the_media_types_the_document_lists_and_utf8_only(
    client: TestClient, method: str, content_type: str, status: int
) -> None:
    doc_id = client.post("/v1/documents", json={"title": "t", "content": "c"}).json()["id"]
    path = "/v1/documents" + ("" if method == "POST" else f"/{doc_id}")
    body = b'{"title": "x", "content": "y"}'
    response = client.request(method, path, content=body, headers={"Content-Type": content_type})
    if status != 415:
        assert response.status_code == status
        return
    assert "Send JSON" in assert_problem(response, 415)["detail"]
    media = "application/json" if method == "POST" else "application/merge-patch+json"
    operation = client.get("/openapi.json").json()["paths"][path.replace(doc_id, "{document_id}")]
    assert media in operation[method.lower()]["requestBody"]["content"]
    assert client.get("/v1/documents").json()["items"][0]["title"] == "t"


def test_body_over_limit_returns_413_before_parsing(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, max_content_chars=1000)
    limit = settings.max_body_bytes
    big = {"title": "t", "content": "x" * limit}
    with TestClient(create_app(settings), headers={"X-API-Key": KEY}) as client:
        assert_problem(client.post("/v1/documents", json=big), 413)

        def chunks() -> Iterator[bytes]:
            yield b'{"title": "t", "content": "'
            for _ in range(limit // 1000 + 1):
                yield b"x" * 1000
            yield b'"}'

        # A chunked body declares no length; it is cut off once it passes the limit.
        chunked = client.post(
            "/v1/documents", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert_problem(chunked, 413)
        assert client.get("/v1/documents").json()["items"] == []


@pytest.mark.parametrize(
    ("ensure_ascii", "indent", "newline"),
    [(True, None, "\n"), (False, None, "\n"), (True, 4, "\n"), (True, "\t", "\r\n")],
    ids=["ascii-escapes", "utf-8", "pretty", "pretty-tabs-crlf"],
)
def test_a_document_at_every_limit_is_accepted_in_either_json_encoding(
    tmp_path: Path, ensure_ascii: bool, indent: int | str | None, newline: str
) -> None:
    """Every field at its limit and every character outside the BMP: as json.dumps sends it by
    default (12 bytes a character, as ASCII escapes) as well as in UTF-8, and pretty-printed,
    create and patch."""
    wide = [chr(0x1F600 + i) for i in range(METADATA_MAX_KEYS)]  # distinct, for tags and keys
    doc = {
        "title": wide[0] * TITLE_MAX_CHARS,
        "content": wide[0] * Settings().max_content_chars,
        "tags": [c * TAG_MAX_CHARS for c in wide[:TAGS_MAX]],
        "metadata": {c * METADATA_KEY_MAX_CHARS: c * METADATA_STRING_MAX_CHARS for c in wide},
    }
    body = json.dumps(doc, ensure_ascii=ensure_ascii, indent=indent).replace("\n", newline)
    json_type = {"Content-Type": "application/json"}
    with app_client(tmp_path, headers={"X-API-Key": KEY}) as client:
        created = client.post("/v1/documents", content=body.encode(), headers=json_type)
        assert created.status_code == 201, created.text
        assert created.json()["content"] == doc["content"]
        url = f"/v1/documents/{created.json()['id']}"
        patched = client.patch(url, content=body.encode(), headers=json_type)
        assert patched.status_code == 200, patched.text


# --- read -------------------------------------------------------------------------------------


def test_read_returns_document_and_etag(client: TestClient) -> None:
    doc = create(client)
    response = client.get(f"/v1/documents/{doc['id']}")
    assert response.status_code == 200
    assert response.json() == doc
    assert response.headers["etag"] == '"1"'


@pytest.mark.parametrize("header", ['"1"', 'W/"1"', '"7", "1"', "*"])
def test_if_none_match_current_etag_returns_304_without_body(
    client: TestClient, header: str
) -> None:
    doc = create(client)
    response = client.get(f"/v1/documents/{doc['id']}", headers={"If-None-Match": header})
    assert response.status_code == 304
    assert response.content == b""
    assert response.headers["etag"] == '"1"'


def test_if_none_match_stale_etag_returns_200(client: TestClient) -> None:
    doc = create(client)
    response = client.get(f"/v1/documents/{doc['id']}", headers={"If-None-Match": '"0"'})
    assert response.status_code == 200


@pytest.mark.parametrize("doc_id", ["missing", "..%5C..%5Cetc", "%00", "x" * 300])
def test_read_missing_document_returns_404_problem(client: TestClient, doc_id: str) -> None:
    assert_problem(client.get(f"/v1/documents/{doc_id}"), 404)


# --- list -------------------------------------------------------------------------------------


def test_list_is_newest_first_and_walks_every_document_once(client: TestClient) -> None:
    ids = [create(client, {"title": f"d{i}", "content": "x"})["id"] for i in range(23)]
    first = client.get("/v1/documents").json()
    assert len(first["items"]) == 20
    assert first["next_cursor"]
    assert [d["id"] for d in walk(client, limit=7)] == ids[::-1]


def test_walk_sees_each_existing_document_once_while_others_are_created(
    client: TestClient,
) -> None:
    ids = [create(client, {"title": f"d{i}", "content": "x"})["id"] for i in range(10)]
    seen: list[str] = []
    page = client.get("/v1/documents", params={"limit": 3}).json()
    while True:
        seen.extend(d["id"] for d in page["items"])
        create(client, {"title": "new during walk", "content": "x"})
        if page["next_cursor"] is None:
            break
        page = client.get(
            "/v1/documents", params={"limit": 3, "cursor": page["next_cursor"]}
        ).json()
    assert seen == ids[::-1]


def test_list_filters_by_tag_case_insensitively(client: TestClient) -> None:
    tagged = create(client, {"title": "a", "content": "x", "tags": ["Red"]})
    create(client, {"title": "b", "content": "x", "tags": ["blue"]})
    assert [d["id"] for d in walk(client, tag="RED", limit=1)] == [tagged["id"]]
    assert walk(client, tag="green") == []


@pytest.mark.parametrize("limit", ["0", "101", "-1", "ten", "1.5"])
def test_list_limit_out_of_range_returns_422(client: TestClient, limit: str) -> None:
    problem = assert_problem(client.get("/v1/documents", params={"limit": limit}), 422)
    assert problem["errors"][0]["loc"] == ["query", "limit"]


def test_every_finding_parameter_reaches_the_listing(client: TestClient) -> None:
    report = create(
        client,
        {
            "title": "Quarterly report",
            "content": "Revenue grew.",
            "tags": ["finance", "q3"],
            "metadata": {"pages": 12, "draft": True},
        },
    )
    note = create(client, {"title": "Crème brûlée", "content": "dessert", "tags": ["finance"]})
    client.patch(f"/v1/documents/{report['id']}", json={"content": "Revenue grew 12%."})

    def ids(query: str) -> list[str]:
        response = client.get(f"/v1/documents?{query}")
        assert response.status_code == 200, response.text
        return [d["id"] for d in response.json()["items"]]

    assert ids("q=REVENUE") == [report["id"]]
    assert ids("q=creme%20BRULEE") == [note["id"]]
    assert ids("q=reven") == []
    assert ids("tag=Finance&tag=q3") == [report["id"]]
    assert ids("tag=finance") == [note["id"], report["id"]]
    assert ids("metadata.pages=12&metadata.draft=true") == [report["id"]]
    assert ids("metadata.pages=%2212%22") == []
    assert ids(f"created_after={note['created_at']}") == [note["id"]]
    assert ids(f"created_before={note['created_at']}") == [report["id"]]
    assert ids("created_after=2000-01-01T00:00:00%2B01:00") == [note["id"], report["id"]]
    assert ids("sort=-updated_at") == [report["id"], note["id"]]
    assert ids("sort=created_at") == [report["id"], note["id"]]
    assert [d["id"] for d in walk(client, q="grew", limit=1)] == [report["id"]]


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("q=", "q"),
        ("q=" + "a" * 201, "q"),
        ("sort=title", "sort"),
        ("sort=-created", "sort"),
        ("created_after=2026-11-27", "created_after"),
        ("created_before=2026-11-27T09:30:00", "created_before"),
        ("updated_after=2026-02-30T00:00:00Z", "updated_after"),
        ("updated_before=1700000000", "updated_before"),
        ("created_after=2026-11-27T09:30:00+01:00", "created_after"),  # + is a space in a URL
        ("created_after=2026-11-27T09:30:00%2B00:60", "created_after"),
        ("created_after=2026-11-27T09:30:00.%D9%A1Z", "created_after"),  # an Arabic-Indic digit
        ("metadata.=x", "metadata"),
        ("metadata.pages=" + "1" * 1001, "metadata.pages"),
        ("metadata.pages=1&metadata.pages=2", "metadata.pages"),
        ("&".join(f"metadata.k{i}=v" for i in range(51)), "metadata"),
        ("&".join(f"tag=t{i}" for i in range(21)), "tag"),
        ("tag=", "tag"),
        ("tags=finance", "tags"),
        ("q=x&nope=1", "nope"),
        ("metadata=x", "metadata"),
        ("metadata=x&metadata.k=v", "metadata"),  # not a filter, whatever comes with it
    ],
)
def test_malformed_finding_parameters_get_422_naming_the_parameter(
    client: TestClient, query: str, parameter: str
) -> None:
    create(client)
    problem = assert_problem(client.get(f"/v1/documents?{query}"), 422)
    assert f"query.{parameter}" in problem["detail"]


@pytest.mark.parametrize(
    ("method", "query"),
    [
        ("GET", "fields=title"),
        ("HEAD", "x"),
        ("PATCH", "if_match=99"),
        ("DELETE", "version=99"),
        ("DELETE", "version=1&version=2"),
        ("POST", "dry_run=1"),
    ],
)
def test_a_query_parameter_where_none_is_taken_gets_422_and_changes_nothing(
    client: TestClient, method: str, query: str
) -> None:
    """A precondition misspelt into the query must not leave a write unconditional."""
    doc = create(client)
    path = "/v1/documents" if method == "POST" else f"/v1/documents/{doc['id']}"
    body = {"title": "changed", "content": "c"} if method in ("POST", "PATCH") else None
    response = client.request(method, f"{path}?{query}", json=body)
    assert response.status_code == 422
    if method != "HEAD":
        problem = assert_problem(response, 422)
        assert f"query.{query.split('=')[0]}" in problem["detail"]
    assert client.get("/v1/documents").json()["items"] == [doc]


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("GET", "/v1/documents?tag=%FF"),
        ("GET", "/v1/documents?q=%ED%A0%80"),  # a lone surrogate, as UTF-8 would encode it
        ("GET", "/v1/documents?metadata.%C0=1"),
        ("GET", "/v1/documents/%FF"),
        ("POST", "/v1/documents?%FF"),
        ("DELETE", "/v1/documents/{id}%FF"),
        ("GET", "/v1/docu%FFments"),  # no route: its 404 had named the path with U+FFFD
        ("PUT", "/v1/documents/%FF"),
        ("GET", "/metrics?x=%C0%AF"),
        ("GET", "/v1/documents?q=100%"),  # a % that escapes nothing
        ("GET", "/v1/documents/%zz"),
        ("GET", "/v1%2Fdocuments"),  # had been routed as /v1/documents
        ("DELETE", "/v1/documents%2f{id}"),
        ("GET", "/health%2Fready"),  # had been answered as the readiness probe
    ],
)
def test_a_path_or_query_that_is_malformed_gets_400_and_changes_nothing(
    client: TestClient, method: str, target: str
) -> None:
    """Decoded, each byte that is not UTF-8 had become U+FFFD: `tag=%FF` found the documents
    tagged with that character, and a `q` of such bytes was dropped, listing every document. A
    slash sent encoded had been routed as a slash, past a proxy's rules on the path it saw."""
    doc = create(
        client, {"title": "\ufffd", "content": "c", "tags": ["\ufffd"], "metadata": {"\ufffd": 1}}
    )
    body = {"title": "t", "content": "c"} if method == "POST" else None
    response = client.request(method, target.format(id=doc["id"]), json=body)
    assert "malformed" in assert_problem(response, 400)["detail"]
    assert client.get("/v1/documents").json()["items"] == [doc]
    assert client.get("/v1/documents?tag=%EF%BF%BD").json()["items"] == [doc]  # U+FFFD itself


@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_where_none_is_taken_gets_415_and_changes_nothing(
    client: TestClient, method: str, framing: str
) -> None:
    """A precondition sent as content (`{"version": 1}`) must not leave a delete unconditional."""
    doc = create(client)
    sent = b'{"version": 1}'
    content = sent if framing == "content-length" else iter([sent])  # an iterator goes chunked
    path = f"/v1/documents/{doc['id']}"
    response = client.request(
        method, path, content=content, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 415
    if method != "HEAD":
        assert "no request body" in assert_problem(response, 415)["detail"]
    assert client.get(path).json() == doc
    assert client.delete(path).status_code == 204  # with no content, as ever


@pytest.mark.parametrize(
    ("sent", "means"),
    [
        ("2026-11-27T10:30:00+01:00", "2026-11-27T09:30:00"),
        ("2026-11-27t09:30:00z", "2026-11-27T09:30:00"),
        ("2026-11-27T09:30:00.0001Z", "2026-11-27T09:30:00.001"),  # rounded up: half-open
        ("2026-11-27T09:30:00.1234567891Z", "2026-11-27T09:30:00.124"),
        ("2026-12-31T23:59:60Z", "2027-01-01T00:00:00"),  # a leap second
        ("2026-12-31T23:59:60.5Z", "2027-01-01T00:00:00"),
        ("9999-12-31T23:59:59.9999Z", "9999-12-31T23:59:59.999999"),  # the last instant
        ("0001-01-01T00:00:00+01:00", "0001-01-01T00:00:00"),  # the first
        ("0000-01-01T00:00:00Z", "0001-01-01T00:00:00"),  # before it: RFC 3339 has a year 0
        ("0000-12-31T23:30:00-02:00", "0001-01-01T01:30:00"),
    ],
)
def test_every_rfc_3339_time_is_taken_at_its_instant_to_the_millisecond_above(
    sent: str, means: str
) -> None:
    query = DocumentQuery.model_validate({"created_after": sent, "updated_before": sent})
    expected = datetime.fromisoformat(means).replace(tzinfo=UTC)
    assert query.created_after == query.updated_before == expected


@pytest.mark.parametrize("year", [1, 5, 999, 2026, 9999])
def test_every_timestamp_has_one_length_and_sorts_as_its_time(year: int) -> None:
    """Clients sort and compare the strings: four digits of year, six of fraction, always."""
    at = datetime(year, 1, 1, tzinfo=UTC)
    doc = plain_document("0" * 26, at)
    stamp = orjson.loads(doc.json_bytes)["created_at"]
    assert stamp == f"{year:04d}-01-01T00:00:00.000000Z"


def test_a_cursor_is_valid_only_for_the_query_that_made_it(client: TestClient) -> None:
    for i in range(3):
        create(client, {**DOC, "title": f"Crème {i}", "tags": ["a", "b"], "metadata": {"n": 1}})
    query: dict[str, Any] = {
        "q": "creme",
        "tag": ["a", "b"],
        "metadata.n": "1",
        "created_after": "2000-01-01T00:00:00Z",
        "sort": "created_at",
        "limit": 1,
    }
    cursor = client.get("/v1/documents", params=query).json()["next_cursor"]
    # The same query spelled otherwise, or with another page size, carries on.
    for same in [
        {**query, "q": "CRÈME", "tag": ["B", "a"], "limit": 2},
        {**query, "created_after": "2000-01-01T01:00:00+01:00"},
    ]:
        assert client.get("/v1/documents", params={**same, "cursor": cursor}).status_code == 200
    for changed in [
        {**query, "q": "creme 1"},
        {**query, "tag": ["a"]},
        {**query, "metadata.n": "2"},
        {**query, "metadata.m": "1"},
        {**query, "created_after": "2000-01-01T00:00:00.001Z"},
        {**query, "created_before": "2100-01-01T00:00:00Z"},
        {**query, "updated_after": "2000-01-01T00:00:00Z"},
        {**query, "sort": "-created_at"},
        {key: value for key, value in query.items() if key != "q"},
    ]:
        response = client.get("/v1/documents", params={**changed, "cursor": cursor})
        assert "query" in assert_problem(response, 400)["detail"], changed


def test_every_finding_parameter_is_documented_with_its_rules(client: TestClient) -> None:
    operation = client.get("/openapi.json").json()["paths"]["/v1/documents"]["get"]
    parameters = {p["name"]: p for p in operation["parameters"]}
    assert set(parameters) == {
        "q",
        "tag",
        "metadata.{key}",
        "created_after",
        "created_before",
        "updated_after",
        "updated_before",
        "sort",
        "limit",
        "cursor",
    }
    for name, parameter in parameters.items():
        assert parameter["description"], name
    for name in ("q", "tag", "created_after", "sort", "limit"):
        assert "examples" in json.dumps(parameters[name]["schema"]), name
    assert parameters["metadata.{key}"]["examples"]
    assert parameters["sort"]["schema"]["enum"] == [
        "-created_at",
        "created_at",
        "-updated_at",
        "updated_at",
    ]
    assert parameters["q"]["schema"]["maxLength"] == 200
    assert "null" not in json.dumps([p["schema"] for p in parameters.values()])  # no null in a URL


def test_bad_or_tampered_cursor_returns_400_and_another_key_may_continue_a_walk(
    client: TestClient,
) -> None:
    for i in range(3):
        create(client, {"title": f"d{i}", "content": "x", "tags": ["t"]})
    cursor = client.get("/v1/documents", params={"limit": 1}).json()["next_cursor"]
    payload, _, signature = cursor.partition(".")
    tampered = payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB") + "." + signature
    junk = [cursor + "==", cursor[:-2] + "!!" + cursor[-2:]]
    for bad in ["garbage", "a.b", tampered, cursor + "x", *junk]:
        assert_problem(client.get("/v1/documents", params={"cursor": bad}), 400)
    # Keys are not tenants: a client that rotates its key mid-walk carries on where it was.
    mine = client.get("/v1/documents", params={"cursor": cursor})
    rotated = client.get(
        "/v1/documents", params={"cursor": cursor}, headers={"X-API-Key": OTHER_KEY}
    )
    assert rotated.status_code == 200
    assert rotated.json() == mine.json()
    other_listing = client.get("/v1/documents", params={"cursor": cursor, "tag": "t"})
    assert_problem(other_listing, 400)


def test_no_client_can_mint_a_cursor_from_the_api_key_it_holds(tmp_path: Path) -> None:
    """A one-key deployment used to sign cursors with a hash of that key's digest."""
    from_key = hashlib.sha256(b"cursor\0" + hashlib.sha256(KEY.encode()).digest()).digest()
    minted = minted_cursor(0, "0" * 26, from_key)
    with app_client(tmp_path, api_keys=KEY, headers=AUTH) as one_key:
        create(one_key)
        assert_problem(one_key.get("/v1/documents", params={"cursor": minted}), 400)


AUTH = {"X-API-Key": KEY}


def test_a_cursor_from_another_data_set_is_400_and_api_key_rotation_keeps_cursors(
    tmp_path: Path,
) -> None:
    with app_client(tmp_path / "a", headers=AUTH) as first:
        for _ in range(3):
            create(first)
        cursor = first.get("/v1/documents", params={"limit": 1}).json()["next_cursor"]
        expected = first.get("/v1/documents", params={"cursor": cursor}).json()
    with app_client(tmp_path / "b", headers=AUTH) as other:
        assert_problem(other.get("/v1/documents", params={"cursor": cursor}), 400)
    rotated = {"X-API-Key": "a-brand-new-key-0003"}
    with app_client(tmp_path / "a", api_keys="a-brand-new-key-0003", headers=rotated) as later:
        assert later.get("/v1/documents", params={"cursor": cursor}).json() == expected


def test_every_value_a_cursor_holds_is_range_checked(client: TestClient) -> None:
    cursor_values_out_of_range(client)


# --- update -----------------------------------------------------------------------------------


def test_patch_merges_fields_and_bumps_version_and_etag(client: TestClient) -> None:
    doc = create(
        client, {"title": "t", "content": "c", "tags": ["a"], "metadata": {"x": 1, "y": 2}}
    )
    response = client.patch(
        f"/v1/documents/{doc['id']}",
        json={"title": "new", "tags": ["B"], "metadata": {"x": None, "z": True}},
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert response.status_code == 200
    new = response.json()
    assert response.headers["etag"] == '"2"'
    assert (new["title"], new["content"], new["tags"]) == ("new", "c", ["b"])
    assert new["metadata"] == {"y": 2, "z": True}
    assert new["version"] == 2
    assert new["created_at"] == doc["created_at"]
    assert new["updated_at"] > doc["updated_at"]
    assert client.get(f"/v1/documents/{doc['id']}").json() == new
    assert client.get("/v1/documents").json()["items"] == [new]


def test_patch_with_current_if_match_applies(client: TestClient) -> None:
    doc = create(client)
    response = client.patch(
        f"/v1/documents/{doc['id']}", json={"content": "v2"}, headers={"If-Match": '"1"'}
    )
    assert response.status_code == 200
    assert response.json()["content"] == "v2"


@pytest.mark.parametrize("if_match", ['"0"', '"2"', 'W/"1"', "garbage"])
def test_stale_if_match_returns_412_and_changes_nothing(client: TestClient, if_match: str) -> None:
    doc = create(client)
    problem = assert_problem(
        client.patch(
            f"/v1/documents/{doc['id']}", json={"content": "v2"}, headers={"If-Match": if_match}
        ),
        412,
    )
    assert "If-Match" in problem["detail"]
    assert client.get(f"/v1/documents/{doc['id']}").json() == doc


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"title": None}, "title"),
        ({"content": None}, "content"),
        ({"title": ""}, "title"),
        ({"version": 9}, "version"),
    ],
)
def test_invalid_patch_returns_422_and_changes_nothing(
    client: TestClient, patch: dict[str, Any], field: str
) -> None:
    doc = create(client)
    problem = assert_problem(client.patch(f"/v1/documents/{doc['id']}", json=patch), 422)
    assert any(field in e["loc"] for e in problem["errors"])
    assert client.get(f"/v1/documents/{doc['id']}").json() == doc


@pytest.mark.parametrize(
    ("header", "value", "status"),
    [
        ("If-None-Match", '"\u00b2"', 200),
        ("If-None-Match", '"' + "9" * 5000 + '"', 200),
        ("If-Match", '"\u00b9"', 412),
        ("If-Match", '"01"', 412),
        ("If-Match", '"' + "9" * 5000 + '"', 412),
        ("If-Match", '"1", "1"', 200),
        ("If-Match", '"2", "1"', 200),
        ("If-Match", '"2", "3"', 412),
    ],
)
def test_etags_this_service_never_issued_name_no_version(
    client: TestClient, header: str, value: str, status: int
) -> None:
    doc = create(client)
    path = f"/v1/documents/{doc['id']}"
    headers = {header.encode(): value.encode("latin-1")}  # the raw bytes a client may send
    if header == "If-None-Match":
        response = client.get(path, headers=headers)
    else:
        response = client.patch(path, json={"title": "x"}, headers=headers)
    assert response.status_code == status, response.text
    if status == 412:
        assert_problem(response, 412)


def test_patch_without_changes_keeps_version(client: TestClient) -> None:
    doc = create(client)
    response = client.patch(f"/v1/documents/{doc['id']}", json={"title": doc["title"]})
    assert response.json() == doc


def test_patch_missing_document_returns_404(client: TestClient) -> None:
    assert_problem(client.patch("/v1/documents/missing", json={"title": "x"}), 404)


# --- delete -----------------------------------------------------------------------------------


def test_delete_returns_204_then_404(client: TestClient) -> None:
    doc = create(client)
    response = client.delete(f"/v1/documents/{doc['id']}")
    assert response.status_code == 204
    assert response.content == b""
    assert_problem(client.get(f"/v1/documents/{doc['id']}"), 404)
    assert_problem(client.delete(f"/v1/documents/{doc['id']}"), 404)
    assert client.get("/v1/documents").json()["items"] == []


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"If-Match": '"2"'}, 412),
        ({"If-Match": 'W/"1"'}, 412),
        ({"If-Match": '"2"', "If-None-Match": '"1"'}, 412),
        ({"If-Match": '"1"'}, 200),
        ({"If-Match": '"7", "1"'}, 200),
        ({"If-Match": "*"}, 200),
        ({"If-Match": '"1"', "If-None-Match": '"1"'}, 304),
    ],
)
def test_if_match_on_a_read_holds_as_rfc_9110_says(
    client: TestClient, method: str, headers: dict[str, str], status: int
) -> None:
    """It was ignored: 200, or 304 where If-Match, evaluated first, fails."""
    doc = create(client)
    response = client.request(method, f"/v1/documents/{doc['id']}", headers=headers)
    assert response.status_code == status
    if status == 412 and method == "GET":
        assert_problem(response, 412)


@pytest.mark.parametrize("method", ["PATCH", "DELETE"])
@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"If-None-Match": "*"}, 412),
        ({"If-None-Match": '"1"'}, 412),
        ({"If-None-Match": 'W/"1"'}, 412),
        ({"If-None-Match": '"7", "1"'}, 412),
        ({"If-None-Match": '"1"', "If-Match": '"1"'}, 412),
        ({"If-None-Match": '"7"', "If-Match": '"2"'}, 412),
        ({"If-None-Match": '"7"'}, None),
        ({"If-None-Match": '"7"', "If-Match": '"1"'}, None),
    ],
)
def test_if_none_match_on_a_write_holds_as_rfc_9110_says(
    client: TestClient, method: str, headers: dict[str, str], status: int | None
) -> None:
    """A write whose If-None-Match names the current ETag (or is `*`) is refused: it had been
    ignored, and the PATCH or DELETE done."""
    doc = create(client)
    body = {"content": "v2"} if method == "PATCH" else None
    response = client.request(method, f"/v1/documents/{doc['id']}", json=body, headers=headers)
    if status is None:
        assert response.status_code == {"PATCH": 200, "DELETE": 204}[method]
    else:
        assert_problem(response, status)
        assert client.get(f"/v1/documents/{doc['id']}").json() == doc


def test_delete_with_stale_if_match_returns_412_and_keeps_document(client: TestClient) -> None:
    doc = create(client)
    assert_problem(client.delete(f"/v1/documents/{doc['id']}", headers={"If-Match": '"5"'}), 412)
    assert client.get(f"/v1/documents/{doc['id']}").status_code == 200
    assert (
        client.delete(f"/v1/documents/{doc['id']}", headers={"If-Match": '"1"'}).status_code == 204
    )


# --- idempotency ------------------------------------------------------------------------------


def test_same_idempotency_key_and_body_returns_original_and_creates_nothing(
    client: TestClient,
) -> None:
    first = create(client, DOC, **{"Idempotency-Key": "req-1"})
    again = client.post("/v1/documents", json=DOC, headers={"Idempotency-Key": "req-1"})
    assert again.status_code == 201
    assert again.json() == first
    assert again.headers["idempotent-replayed"] == "true"
    assert len(walk(client)) == 1


@pytest.mark.parametrize("key", ["", "   "])
def test_an_empty_idempotency_key_is_422_and_creates_nothing(client: TestClient, key: str) -> None:
    """An empty key names no create to replay: refused, never taken for no key (which would
    create a document at each retry)."""
    for _ in range(2):
        refused = client.post("/v1/documents", json=DOC, headers={"Idempotency-Key": key})
        assert "idempotency-key" in assert_problem(refused, 422)["errors"][0]["loc"]
    assert walk(client) == []


@pytest.mark.parametrize(
    "again",
    [
        b'{ "content" : "c",\n "title": "t", "metadata": {"a": 1, "b": 2} }',
        b'{"title": "t", "content": "c", "metadata": {"b": 2, "a": 1}}',
    ],
    ids=["white space and field order", "metadata key order"],
)
def test_the_same_json_object_sent_again_with_its_key_is_a_replay(
    client: TestClient, again: bytes
) -> None:
    """RFC 8259 objects are unordered: metadata keys in another order had got 409."""
    headers = {"Idempotency-Key": "same-object", "Content-Type": "application/json"}
    first = client.post(
        "/v1/documents",
        json={"title": "t", "content": "c", "metadata": {"a": 1, "b": 2}},
        headers=headers,
    )
    replay = client.post("/v1/documents", content=again, headers=headers)
    assert (replay.status_code, replay.json()) == (201, first.json())
    assert replay.headers["idempotent-replayed"] == "true"


def test_same_idempotency_key_with_other_body_returns_409(client: TestClient) -> None:
    create(client, DOC, **{"Idempotency-Key": "req-1"})
    other = {**DOC, "title": "different"}
    problem = assert_problem(
        client.post("/v1/documents", json=other, headers={"Idempotency-Key": "req-1"}), 409
    )
    assert "Idempotency-Key" in problem["detail"]
    assert len(walk(client)) == 1


def test_idempotency_keys_are_scoped_per_api_key(client: TestClient) -> None:
    mine = create(client, DOC, **{"Idempotency-Key": "shared"})
    theirs = client.post(
        "/v1/documents", json=DOC, headers={"Idempotency-Key": "shared", "X-API-Key": OTHER_KEY}
    )
    assert theirs.status_code == 201
    assert theirs.json()["id"] != mine["id"]


def test_idempotency_keys_survive_a_restart(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    with TestClient(create_app(settings), headers={"X-API-Key": KEY}) as client:
        first = create(client, DOC, **{"Idempotency-Key": "req-1"})
    with TestClient(create_app(settings), headers={"X-API-Key": KEY}) as client:
        again = client.post("/v1/documents", json=DOC, headers={"Idempotency-Key": "req-1"})
        assert again.json()["id"] == first["id"]
        assert len(walk(client)) == 1


# --- auth and rate limits ---------------------------------------------------------------------


def _api_operations() -> list[tuple[str, str]]:
    """Every operation under /v1, read from the app itself: a route added without the key
    dependency fails the test below."""
    paths = create_app(make_settings(Path("unused"))).openapi()["paths"]
    return [
        (method.upper(), path.replace("{document_id}", "x"))
        for path, operations in paths.items()
        if path.startswith("/v1/")
        for method in operations
    ]


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong-key-123"}, {"X-API-Key": ""}])
@pytest.mark.parametrize(("method", "path"), _api_operations())
def test_missing_or_wrong_key_returns_401(
    tmp_path: Path, headers: dict[str, str], method: str, path: str
) -> None:
    with app_client(tmp_path) as client:
        response = client.request(method, path, headers=headers, json=DOC)
        assert_problem(response, 401)
        assert response.headers["www-authenticate"] == "ApiKey"


@pytest.mark.parametrize("path", ["/health", "/health/ready", "/docs", "/redoc", "/openapi.json"])
def test_public_endpoints_need_no_key(tmp_path: Path, path: str) -> None:
    with app_client(tmp_path) as client:
        assert client.get(path).status_code == 200


def test_without_configured_keys_a_key_is_generated_and_auth_stays_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with app_client(tmp_path, api_keys="") as client:
        assert_problem(client.get("/v1/documents"), 401)
        printed = capsys.readouterr().err
        key = printed.split("export KEY=")[1].split()[0]
        assert client.get("/v1/documents", headers={"X-API-Key": key}).status_code == 200
        assert "http://127.0.0.1:8000/v1/documents" in printed  # a URL to paste, not HOST:PORT


def test_behind_a_path_prefix_location_leads_back_to_the_document(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path, root_path="/documents"))
    with TestClient(app, root_path="/documents", headers={"X-API-Key": KEY}) as client:
        created = client.post("/v1/documents", json=DOC)
        location = created.headers["location"]
        assert location == f"/documents/v1/documents/{created.json()['id']}"
        assert client.get(location).json() == created.json()


def test_rate_limit_per_key_returns_429_with_retry_after(tmp_path: Path) -> None:
    with app_client(tmp_path, rate_limit="3/minute") as client:
        alice = {"X-API-Key": KEY}
        responses = [client.get("/v1/documents", headers=alice) for _ in range(3)]
        assert [r.status_code for r in responses] == [200, 200, 200]
        assert [r.headers["x-ratelimit-remaining"] for r in responses] == ["2", "1", "0"]
        assert responses[0].headers["x-ratelimit-limit"] == "3"
        limited = client.get("/v1/documents", headers=alice)
        assert_problem(limited, 429)
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        assert limited.headers["x-ratelimit-remaining"] == "0"
        # bob has a budget of his own; health checks are never limited.
        assert client.get("/v1/documents", headers={"X-API-Key": OTHER_KEY}).status_code == 200
        assert all(client.get("/health").status_code == 200 for _ in range(5))
        assert client.get("/health/ready").status_code == 200


def test_requests_without_a_valid_key_spend_a_budget_per_client_that_keys_never_touch(
    tmp_path: Path,
) -> None:
    with app_client(tmp_path, keyless_rate_limit="3/minute") as client:
        keyed = {"X-API-Key": KEY}
        assert all(client.get("/v1/documents", headers=keyed).status_code == 200 for _ in range(5))
        strangers = [
            client.get("/v1/documents"),
            client.get("/v1/documents", headers={"X-API-Key": "wrong-key-123"}),
            client.get("/openapi.json"),
            client.post("/v1/documents", json=DOC),
        ]
        assert [r.status_code for r in strangers] == [401, 401, 200, 429]
        limited = strangers[-1]
        assert_problem(limited, 429)
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        assert limited.headers["x-ratelimit-limit"] == "3"
        # A valid key from the same address is never refused for it; probes spend no budget,
        # and a scrape of /metrics spends a budget of its own.
        assert client.get("/v1/documents", headers=keyed).status_code == 200
        for probe in ("/health", "/health/ready"):
            assert client.get(probe).status_code == 200
        assert client.get("/metrics").status_code == 200
        assert client.get("/metrics", headers=keyed).status_code == 200
        # And the API's document says so of each route a stranger was refused on.
        paths = client.get("/openapi.json", headers=keyed).json()["paths"]
        for path, method in (("/v1/documents", "post"), ("/metrics", "get")):
            assert "429" in paths[path][method]["responses"], path


def test_the_keyless_budget_is_tens_a_minute_by_default() -> None:
    (budget,) = parse_many(Settings(_env_file=None).keyless_rate_limit)  # type: ignore[call-arg]
    assert 10 <= budget.amount / budget.get_expiry() * 60 < 100


def test_local_rate_limit_storage_drops_ended_windows_as_clients_come_and_go() -> None:
    async def scenario() -> None:
        storage = LocalStorage()
        for n in range(10 * LocalStorage.SWEEP_FROM):
            await storage.incr(f"client-{n}", 0)  # each window ends as it opens
        assert len(storage._windows) <= 2 * LocalStorage.SWEEP_FROM
        await storage.incr("kept", 60)
        for n in range(2 * LocalStorage.SWEEP_FROM):
            await storage.incr(f"other-{n}", 0)
        assert await storage.get("kept") == 1

    anyio.run(scenario)


def test_every_window_of_a_multi_window_rate_limit_is_enforced(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, rate_limit="5/minute;2/hour")
    with TestClient(create_app(settings), headers={"X-API-Key": KEY}) as client:
        statuses = [client.get("/v1/documents").status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        assert client.get("/v1/documents").headers["x-ratelimit-limit"] == "2"


@pytest.mark.parametrize("rate", ["0/minute", "5/minute;0/hour", "-1/second", "5/0minute"])
def test_a_rate_limit_that_can_never_pass_is_refused(tmp_path: Path, rate: str) -> None:
    with pytest.raises(ValidationError, match="rate"):
        make_settings(tmp_path, rate_limit=rate)


def test_several_workers_without_configured_keys_are_refused(tmp_path: Path) -> None:
    # A key generated at start would differ from worker to worker.
    with pytest.raises(ValidationError, match="WORKERS: several workers need API_KEYS"):
        make_settings(tmp_path, api_keys="", workers=2, database_url="mongodb://db/d")


@pytest.mark.parametrize("variable", ["api_keys", "api_key_hashes"])
def test_a_key_with_a_colon_is_refused_without_showing_any_of_it(
    tmp_path: Path, variable: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        make_settings(tmp_path, **{variable: "alice:abcdefgh:Sup3rSecretTail"})
    shown = " ".join(error["msg"] for error in caught.value.errors())  # what a start prints
    assert "the only scope is 'read'" in shown
    assert "Sup3r" not in shown


def test_a_rate_limit_several_workers_cannot_split_is_refused(tmp_path: Path) -> None:
    """Each worker counting in memory allows its share: a share of less than one had been one,
    so RATE_LIMIT=1/minute with two workers let two requests through."""
    with pytest.raises(ValidationError, match="RATE_LIMIT: 1 per 1 minute cannot be split"):
        make_settings(tmp_path, rate_limit="10/second;1/minute", workers=2)
    make_settings(tmp_path, rate_limit="2/minute", workers=2)
    make_settings(tmp_path, rate_limit="1/minute", workers=2, rate_limit_storage_uri="redis://r")


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("api_keys", f"a:{KEY},a:{OTHER_KEY}", "API_KEYS: the name 'a' is used twice"),
        ("api_keys", f"a:{KEY},b:{KEY}", "API_KEYS: the same key is configured twice"),
        ("root_path", "documents", "leading /"),
        # A browser sends its origin exactly: any other spelling never matches.
        ("cors_origins", "https://app.example/", "not an origin"),
        ("cors_origins", "https://a.example,app.example", "'app.example' is not an origin"),
        ("cors_origins", "https://app.example/path", "not an origin"),
        ("cors_origins", "ftp://app.example", "not an origin"),
        ("cors_origins", "https://App.Example", "not an origin"),
        ("cors_origins", "https://app.example:443", "not an origin"),
        ("cors_origins", "https://*.example", "not an origin"),
        ("cors_origins", "https://bücher.example", "not an origin"),
        ("cors_origins", "https://app.example:99999", "not an origin"),
        # An address as a browser writes it: these it writes 127.0.0.1 and [::1].
        ("cors_origins", "http://127.000.000.001", "not an origin"),
        ("cors_origins", "http://2130706433", "not an origin"),
        ("cors_origins", "http://[0:0:0:0:0:0:0:1]", "not an origin"),
        ("forwarded_allow_ips", "10.0.0.1,proxy", "not an IP address"),
        ("database_url", "mongodb://", "at least one hostname"),
        ("database_url", "mongodb://u:p@ss:w@host/db", "escaped"),
        ("rate_limit_storage_uri", "bogus://x", "memory://"),
        ("api_keys", "dev:change-me-to-a-long-random-string", "placeholder"),
        ("rate_limit", "5 per 0 minute", "at least one unit"),
        ("rate_limit_storage_uri", "memory://x", "memory://"),
        ("rate_limit_storage_uri", "redis://u:pw@host:notaport/0", "not a valid Redis URL"),
        ("rate_limit_storage_uri", "redis://:pw@h/0?socket_timeout=pw", "'socket_timeout'"),
        ("rate_limit_storage_uri", "redis://:pw@h/pw", "database number"),
        ("database_url", "mongodb://user:pw@/db", "not a valid MongoDB URL"),
        ("database_url", "mongodb+srv://u:pw@host:27017/db", "without a port"),
        ("database_url", "mongodb://u:pw@h/d?tls=true&tlsCAFile=/nowhere", "not readable"),
        ("data_dir", "", "empty"),
        ("host", "not a host", "IP address or a host name"),
        ("keyless_rate_limit", "0/minute", "a rate of 0"),
        ("max_buffered_body_bytes", "1024", "MAX_BUFFERED_BODY_BYTES: must be at least"),
        ("max_body_bytes", str(1024 * 1024), "MAX_BODY_BYTES: must be at least"),
        ("max_connections", "0", "greater than or equal to 1"),
    ],
)
def test_a_bad_setting_is_refused_naming_what_to_change(
    tmp_path: Path, variable: str, value: str, message: str
) -> None:
    overrides: dict[str, Any] = {"data_dir": tmp_path, variable: value}
    with pytest.raises(ValidationError) as caught:
        make_settings(**overrides)
    assert message in str(caught.value)


READER = "reader-key-0003"


@pytest.mark.parametrize(
    "keys",
    [
        {"api_keys": f"alice:{KEY},reader:{READER}:read"},
        {
            "api_keys": f"alice:{KEY}",
            "api_key_hashes": f"reader:{hashlib.sha256(READER.encode()).hexdigest()}:read",
        },
    ],
    ids=["plain", "hashed"],
)
def test_a_read_only_key_reads_and_every_write_gets_403(
    tmp_path: Path, keys: dict[str, Any]
) -> None:
    with app_client(tmp_path, **keys) as client:
        doc = client.post("/v1/documents", json=DOC, headers={"X-API-Key": KEY}).json()
        reader = {"X-API-Key": READER}
        assert client.get(f"/v1/documents/{doc['id']}", headers=reader).status_code == 200
        assert client.head(f"/v1/documents/{doc['id']}", headers=reader).status_code == 200
        assert client.get("/v1/documents", headers=reader).status_code == 200
        writes = [
            client.post("/v1/documents", json=DOC, headers=reader),
            client.patch(f"/v1/documents/{doc['id']}", json={"title": "x"}, headers=reader),
            client.delete(f"/v1/documents/{doc['id']}", headers=reader),
        ]
        for response in writes:
            assert_problem(response, 403)
        # A method that writes nothing is no write: answered as for any key.
        for method in ("OPTIONS", "TRACE"):
            path = f"/v1/documents/{doc['id']}"
            mine = client.request(method, path, headers=reader)
            assert_problem(mine, 405)
            writer = client.request(method, path, headers={"X-API-Key": KEY})
            assert mine.headers["allow"] == writer.headers["allow"]
        listed = client.get("/v1/documents", headers=reader).json()["items"]
        assert listed == [doc]


def test_the_openapi_document_describes_403_on_every_write(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path, operations in paths.items():
        for method, operation in operations.items():
            if path.startswith("/v1/") and method != "get":
                assert "403" in operation["responses"], (method, path)


@pytest.mark.parametrize("entry", [f"reader:{READER}:admin", f"reader:{READER}:"])
def test_an_unknown_key_scope_is_refused(tmp_path: Path, entry: str) -> None:
    with pytest.raises(ValidationError, match="scope"):
        make_settings(tmp_path, api_keys=entry)


# --- errors and headers -----------------------------------------------------------------------


def test_unknown_route_and_wrong_method_are_problems(client: TestClient) -> None:
    assert_problem(client.get("/nowhere"), 404)
    problem = assert_problem(client.put("/v1/documents", json=DOC), 405)
    assert "PUT" in problem["detail"]


def test_unhandled_error_returns_500_problem_without_internals(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path))

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internal detail")

    with TestClient(app) as client:
        response = client.get("/boom", headers={"X-Request-ID": "trace-500"})
        problem = assert_problem(response, 500)
        assert problem["request_id"] != "trace-500"  # the server's own id, as in the header
        assert "secret internal detail" not in response.text
        assert response.headers["connection"] == "close"  # a body may be left unread


def test_client_request_id_never_becomes_the_request_id(client: TestClient) -> None:
    """Two clients sending one X-Request-ID still get two ids: ids never collide in the logs."""
    for sent in ["abc-123.x:y", "abc-123.x:y", 'has "quotes"', "x" * 129]:
        given = client.get("/health", headers={"X-Request-ID": sent}).headers["x-request-id"]
        assert given != sent
        assert len(given) == 32


def test_generated_request_ids_differ_between_requests_and_apps(tmp_path: Path) -> None:
    ids = set()
    for data_dir in (tmp_path / "a", tmp_path / "b"):
        with app_client(data_dir) as client:
            ids |= {client.get("/health").headers["x-request-id"] for _ in range(20)}
    assert len(ids) == 40


def test_api_responses_carry_security_headers(client: TestClient) -> None:
    response = client.get("/v1/documents")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store"
    assert "server" not in response.headers


# --- health -----------------------------------------------------------------------------------


def test_readiness_is_503_problem_when_the_data_dir_cannot_be_written(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with app_client(data_dir) as client:
        assert client.get("/health/ready").json()["status"] == "ready"
        for child in data_dir.iterdir():
            child.unlink()
        data_dir.rmdir()
        assert_problem(client.get("/health/ready"), 503)
        assert client.get("/health").status_code == 200
        data_dir.mkdir()


# --- persistence ------------------------------------------------------------------------------


def test_documents_survive_an_app_restart_in_one_sqlite_file(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    with TestClient(create_app(settings), headers={"X-API-Key": KEY}) as client:
        kept = create(client)
        gone = create(client)
        client.delete(f"/v1/documents/{gone['id']}")
        client.patch(f"/v1/documents/{kept['id']}", json={"title": "renamed"})
    with sqlite3.connect(tmp_path / "documents.db") as db:
        rows = db.execute("SELECT id, json_extract(body, '$.title'), version FROM documents")
        assert rows.fetchall() == [(kept["id"], "renamed", 2)]
    db.close()
    with TestClient(create_app(settings), headers={"X-API-Key": KEY}) as client:
        assert client.get(f"/v1/documents/{kept['id']}").json()["title"] == "renamed"


# --- security settings ------------------------------------------------------------------------


def test_keys_configured_as_sha256_hashes_authenticate(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"hashed-secret-key").hexdigest()
    settings = make_settings(tmp_path, api_keys="", api_key_hashes=f"ops:{digest}")
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/documents", headers={"X-API-Key": "hashed-secret-key"}).is_success
        assert_problem(client.get("/v1/documents", headers={"X-API-Key": digest}), 401)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"api_key_hashes": "ops:not-hex"}, "64 hex"),
        ({"api_keys": "alice:short"}, r"8\+ chars"),
        ({"api_keys": "alice:long-enough\x01key"}, "no control character"),
        ({"api_keys": "a:aaaaaaaaaa", "api_key_hashes": f"a:{'0' * 64}"}, "unique"),
    ],
)
def test_malformed_key_settings_are_refused(
    tmp_path: Path, overrides: dict[str, str], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        make_settings(tmp_path, **overrides)


def test_a_key_of_any_characters_matches_as_the_utf8_bytes_clients_send(tmp_path: Path) -> None:
    """HTTP carries bytes: a key (or a key's SHA-256) is compared as its UTF-8, what curl and
    browsers send, never as the header's bytes read as Latin-1 and encoded again."""
    key, hashed = "clé-secrète-123", "ключ-доступа-456"
    digest = hashlib.sha256(hashed.encode()).hexdigest()
    settings = make_settings(tmp_path, api_keys=f"carol:{key}", api_key_hashes=f"dave:{digest}")
    with TestClient(create_app(settings)) as client:
        for sent in (key, hashed):
            response = client.get("/v1/documents", headers={b"x-api-key": sent.encode()})
            assert response.status_code == 200, response.text


def test_spaces_around_a_key_s_name_secret_and_scope_are_not_part_of_them(tmp_path: Path) -> None:
    """HTTP drops the spaces around a header's value: a key configured with them had never
    matched, and the service had started as if all was well."""
    digest = hashlib.sha256(b"carol-secret-3").hexdigest()
    keys, hashes = " alice : alice-secret-1 , bob : bob-secret-2 : read ", f" carol : {digest} "
    settings = make_settings(tmp_path, api_keys=keys, api_key_hashes=hashes)
    with TestClient(create_app(settings)) as client:
        for key in ("alice-secret-1", "bob-secret-2", "carol-secret-3"):
            assert client.get("/v1/documents", headers={"X-API-Key": key}).is_success, key
        refused = client.post("/v1/documents", json=DOC, headers={"X-API-Key": "bob-secret-2"})
        assert_problem(refused, 403)


def test_cors_is_off_unless_origins_are_configured(tmp_path: Path) -> None:
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "X-API-Key, Content-Type",
    }
    with app_client(tmp_path / "a") as client:
        response = client.options("/v1/documents", headers=preflight)
        assert "access-control-allow-origin" not in response.headers
    settings = make_settings(tmp_path / "b", cors_origins="https://app.example")
    with TestClient(create_app(settings)) as client:
        response = client.options("/v1/documents", headers=preflight)
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        other = client.options(
            "/v1/documents", headers={**preflight, "Origin": "https://evil.example"}
        )
        assert "access-control-allow-origin" not in other.headers
        assert "origin" in assert_problem(other, 400)["detail"].lower()
        # A refusal carries the CORS headers too, so a browser's script can read it.
        refused = client.get("/v1/documents", headers={"Origin": "https://app.example"})
        assert_problem(refused, 401)
        assert refused.headers["access-control-allow-origin"] == "https://app.example"
    # Each origin as a browser sends it is taken (a wrong spelling is refused at start).
    make_settings(
        tmp_path / "c",
        cors_origins="http://localhost:3000, http://[::1]:8080, https://xn--bcher-kva.example,"
        "http://127.0.0.1, https://a_b.example, *",
    )


def test_preflights_spend_the_keyless_budget(tmp_path: Path) -> None:
    """A preflight carries no key: like any request without one, it spends its address's
    budget, so a flood of them gets cheap 429s and logs one line a window, not one each."""
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    settings = make_settings(
        tmp_path, cors_origins="https://app.example", keyless_rate_limit="3/minute"
    )
    with TestClient(create_app(settings)) as client:
        answers = [client.options("/v1/documents", headers=preflight) for _ in range(5)]
        assert [r.status_code for r in answers] == [200, 200, 200, 429, 429]
        assert answers[0].headers["x-ratelimit-remaining"] == "2"
        assert_problem(client.get("/v1/documents"), 429)  # the same budget


def test_replay_after_the_original_was_deleted_returns_409(client: TestClient) -> None:
    first = create(client, DOC, **{"Idempotency-Key": "req-9"})
    client.delete(f"/v1/documents/{first['id']}")
    again = client.post("/v1/documents", json=DOC, headers={"Idempotency-Key": "req-9"})
    assert "deleted" in assert_problem(again, 409)["detail"]


def test_local_rate_limit_storage_counts_per_window_and_key() -> None:
    async def scenario() -> None:
        storage = LocalStorage()
        assert [await storage.incr("alice", 60) for _ in range(3)] == [1, 2, 3]
        assert await storage.get("alice") == 3
        assert await storage.get("bob") == 0
        assert await storage.get_expiry("alice") > time.time()
        assert await storage.incr("bob", 0) == 1  # a zero-length window is over at once:
        assert await storage.incr("bob", 0) == 1  # each hit opens a new one
        await storage.clear("alice")
        assert await storage.get("alice") == 0
        assert storage_from_string("async+local://").__class__ is LocalStorage

    anyio.run(scenario)


def test_spending_a_budget_agrees_with_limits_fixed_window() -> None:
    async def scenario() -> None:
        ours, theirs = LocalStorage(), FixedWindowRateLimiter(LocalStorage())
        item = parse("3/minute")
        for _ in range(5):
            [budget] = await spend(ours, [item], "alice")
            allowed = await theirs.hit(item, "alice")
            reset_at, remaining = await theirs.get_window_stats(item, "alice")
            assert (budget.allowed, budget.remaining) == (allowed, remaining)
            assert budget.reset_at == pytest.approx(reset_at, abs=1)
        spent = [(await spend(ours, [item], "bob"))[0].allowed for _ in range(4)]
        assert spent == [True, True, True, False]

    anyio.run(scenario)


def test_a_page_of_large_documents_stops_short_of_a_mebibyte_and_the_walk_misses_none(
    client: TestClient,
) -> None:
    """Six documents of about 200 KB each: no page's response passes about 1 MiB, and
    following the cursors still visits each exactly once."""
    created = [
        client.post("/v1/documents", json={"title": f"big {n}", "content": "é" * 100_000})
        for n in range(6)
    ]
    assert all(response.status_code == 201 for response in created)
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 100, **({"cursor": cursor} if cursor else {})}
        response = client.get("/v1/documents", params=params)
        assert response.status_code == 200
        assert len(response.content) < 1024 * 1024 + 4096
        page = response.json()
        seen += [doc["id"] for doc in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(r.json()["id"] for r in created)
    assert len(seen) == 6


def test_a_running_service_hands_the_interpreter_lock_over_within_a_millisecond(
    client: TestClient,
) -> None:
    """A thread finding the words of a long text holds the lock between its C calls; the event
    loop and the SQLite writer, which take it back several times a request, each wait up to the
    switch interval. At Python's default of 5 ms, small writes waited 20-85 ms behind a large
    document's."""
    assert client.get("/health").status_code == 200
    assert sys.getswitchinterval() == pytest.approx(0.001)
