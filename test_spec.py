"""The OpenAPI document and the service agree: what the document calls valid is accepted, what it
calls invalid is refused, and what is stored is itself valid input. Plus the service's own
bounds where JSON Schema cannot speak: body nesting and the word index."""

from __future__ import annotations

import json
import sys
import threading
import time
import unicodedata
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import jsonschema
import jsonschema_rs
import pytest
from fastapi.testclient import TestClient

import models
from bodies import MAX_NESTING
from conftest import KEY, app_client, assert_problem
from models import (
    INDEXED_FOLDED_CHARS_MAX,
    INDEXED_WORD_MAX_CHARS,
    INDEXED_WORDS_MAX,
    METADATA_KEY_MAX_CHARS,
    METADATA_MAX_KEYS,
    document_words,
)


def _body_schema(client: TestClient, name: str) -> Any:
    """The document's schema of a request body, as a validator reading it as JSON Schema does
    (ECMA 262 patterns, as schemathesis reads them too)."""
    schema = client.get("/openapi.json").json()["components"]["schemas"][name]
    return jsonschema_rs.validator_for(schema)


def _parameter_schema(client: TestClient, name: str) -> Any:
    operation = client.get("/openapi.json").json()["paths"]["/v1/documents"]["get"]
    (parameter,) = [p for p in operation["parameters"] if p["name"] == name]
    return jsonschema_rs.validator_for(parameter["schema"])


PADDED_TITLE = " " * 5 + "t" * 200 + " " * 5  # 210 characters, 200 once trimmed
VALID = {"title": "t", "content": "x"}


@pytest.mark.parametrize(
    ("fields", "valid"),
    [
        ({"title": "a\x00b"}, False),
        ({"title": "line\nbreak"}, False),
        ({"title": "   "}, False),
        ({"title": "\u3000\u00a0"}, False),
        ({"title": PADDED_TITLE}, False),
        ({"title": " t" + "x" * 198}, True),
        ({"title": "  Crème brûlée  "}, True),
        ({"title": "\ufeff"}, True),  # not white space to str.strip (nor to JSON Schema's class)
        ({"tags": ["a\tb"]}, False),
        ({"tags": ["a\x85"]}, False),
        ({"tags": [" "]}, False),
        ({"tags": ["x" * 51]}, False),
        ({"tags": ["\u0130" * 50]}, True),
        ({"tags": [" Finance "]}, True),
        # A number is within the 64-bit integers' range however it is written (1e20 and
        # 100000000000000000000 are one number to JSON Schema).
        ({"metadata": {"n": 2**63}}, False),
        ({"metadata": {"n": -(2**63) - 1}}, False),
        ({"metadata": {"n": 10**20}}, False),
        ({"metadata": {"n": 1e20}}, False),
        ({"metadata": {"n": -1e20}}, False),
        ({"metadata": {"n": 9.3e18}}, False),
        ({"metadata": {"n": 2.0**63}}, False),
        ({"metadata": {"n": 1e300}}, False),
        ({"metadata": {"n": -sys.float_info.max}}, False),
        ({"metadata": {"n": {"nested": 1}}}, False),
        ({"metadata": {"n": 2**63 - 1}}, True),
        ({"metadata": {"n": -(2**63)}}, True),
        ({"metadata": {"n": 2.0**63 - 1024}}, True),  # the largest float below 2**63
        ({"metadata": {"n": 1.5}}, True),
        ({"metadata": {"n": 12.5}}, True),
        ({"metadata": {f"k{i}": i for i in range(51)}}, False),
        ({"metadata": {f"k{i}": i for i in range(50)}}, True),
        ({"content": "x" * 11}, False),  # MAX_CONTENT_CHARS is 10 here
        ({"content": "x" * 10}, True),
    ],
)
def test_document_and_service_agree_on_what_a_create_body_is(
    tmp_path: Path, fields: dict[str, Any], valid: bool
) -> None:
    body = {**VALID, **fields}
    with app_client(tmp_path, headers={"X-API-Key": KEY}, max_content_chars=10) as client:
        assert _body_schema(client, "DocumentCreate").is_valid(body) is valid
        response = client.post("/v1/documents", json=body)
    if valid:
        assert response.status_code == 201, response.text
    else:
        assert_problem(response, 422)


@pytest.mark.parametrize(
    "number",
    [
        "-9223372036854775809.0",
        "-9.2233720368547758081e18",
        "-9223372036854775808.0",
        "9223372036854775807.0",
        "9.2233720368547758075e18",
        "9223372036854775808.0",
    ],
)
def test_a_number_written_beside_a_bound_of_the_range_is_judged_as_written(
    client: TestClient, number: str
) -> None:
    """Each of these reads as the float of a bound itself, ±2**63; the document's validators
    compare the number written, exactly, and so does the service."""
    body = '{"title": "t", "content": "x", "metadata": {"n": ' + number + "}}"
    document = client.get("/openapi.json").json()
    exact = jsonschema.Draft202012Validator(
        {"$ref": "#/components/schemas/DocumentCreate", "components": document["components"]}
    )
    valid = exact.is_valid(json.loads(body, parse_float=Decimal))
    headers = {"Content-Type": "application/json"}
    response = client.post("/v1/documents", content=body, headers=headers)
    assert response.status_code == (201 if valid else 422), response.text
    if valid:  # what is stored is written back as a number the document calls valid
        stored = json.loads(response.content, parse_float=Decimal)
        assert exact.is_valid({k: stored[k] for k in ("title", "content", "metadata")})


def test_title_is_stored_trimmed_within_the_declared_length(client: TestClient) -> None:
    created = client.post("/v1/documents", json={**VALID, "title": "  Hello  "}).json()
    assert created["title"] == "Hello"


def test_a_stored_tag_is_itself_a_valid_tag_to_patch_and_filter_with(client: TestClient) -> None:
    """Lower-casing never lengthens a tag (İ, whose lower case is two characters, becomes i):
    what the service returns can be sent back as it is."""
    sent = "\u0130" * 50
    doc = client.post("/v1/documents", json={**VALID, "tags": [sent, "Q3"]}).json()
    assert doc["tags"] == ["i" * 50, "q3"]
    assert _body_schema(client, "DocumentUpdate").is_valid({"tags": doc["tags"]})
    patched = client.patch(f"/v1/documents/{doc['id']}", json={"tags": doc["tags"]})
    assert patched.status_code == 200, patched.text
    for tag in (doc["tags"][0], sent):
        assert _parameter_schema(client, "tag").is_valid([tag])
        found = client.get("/v1/documents", params={"tag": tag})
        assert found.status_code == 200, found.text
        assert [d["id"] for d in found.json()["items"]] == [doc["id"]]


def test_a_valid_patch_the_stored_document_cannot_take_is_a_409_not_a_422(
    client: TestClient,
) -> None:
    """No schema can say that 2 new keys overflow 50 stored ones: the refusal is a conflict with
    the document's state (409, declared for PATCH), so a 422 always means the document refuses."""
    full = {f"k{i}": i for i in range(METADATA_MAX_KEYS)}
    doc = client.post("/v1/documents", json={**VALID, "metadata": full}).json()
    patch = {"metadata": {"new1": 1, "new2": 2}}
    assert _body_schema(client, "DocumentUpdate").is_valid(patch)
    operation = client.get("/openapi.json").json()["paths"]["/v1/documents/{document_id}"]
    assert "409" in operation["patch"]["responses"]
    body = assert_problem(client.patch(f"/v1/documents/{doc['id']}", json=patch), 409)
    assert "52 keys" in body["detail"]
    assert body["errors"][0]["loc"] == ["body", "metadata"]
    assert client.get(f"/v1/documents/{doc['id']}").json()["metadata"] == full


@pytest.mark.parametrize("length", [METADATA_KEY_MAX_CHARS, METADATA_KEY_MAX_CHARS + 1, 5_000])
def test_a_metadata_filter_on_a_key_of_any_length_is_answered(
    client: TestClient, length: int
) -> None:
    """The document cannot bound part of a parameter's name: a key no document can hold finds
    nothing, as the parameter's description says."""
    key = "k" * length
    stored = key[:METADATA_KEY_MAX_CHARS]
    doc = client.post("/v1/documents", json={**VALID, "metadata": {stored: "v"}}).json()
    response = client.get("/v1/documents", params={f"metadata.{key}": "v"})
    assert response.status_code == 200, response.text
    expected = [doc["id"]] if key == stored else []
    assert [d["id"] for d in response.json()["items"]] == expected
    described = _metadata_filter(client)
    assert f"({METADATA_KEY_MAX_CHARS} characters) finds none" in described
    assert f"At most {METADATA_MAX_KEYS} keys." in described  # more are a 422 (test_main)


def _metadata_filter(client: TestClient) -> str:
    operation = client.get("/openapi.json").json()["paths"]["/v1/documents"]["get"]
    (parameter,) = [p for p in operation["parameters"] if p["name"] == "metadata.{key}"]
    description: str = parameter["description"]
    return description


@pytest.mark.parametrize("tag", ["a\x00", "a\nb", "\x85", " "])
def test_a_tag_filter_the_document_refuses_is_refused(client: TestClient, tag: str) -> None:
    assert not _parameter_schema(client, "tag").is_valid([tag])
    body = assert_problem(client.get("/v1/documents", params={"tag": tag}), 422)
    assert body["errors"][0]["loc"][:2] == ["query", "tag"]


@pytest.mark.parametrize("limit", ["5_0", "5.0", "+5", " 5", "5 ", "05", "0x5", "\uff15"])
def test_limit_must_be_a_plain_integer(client: TestClient, limit: str) -> None:
    body = assert_problem(client.get("/v1/documents", params={"limit": limit}), 422)
    assert body["errors"][0]["loc"] == ["query", "limit"]


def test_limit_as_the_document_spells_it_is_taken(client: TestClient) -> None:
    for n in range(3):
        client.post("/v1/documents", json={**VALID, "title": f"t{n}"})
    response = client.get("/v1/documents", params={"limit": "2"})
    assert response.status_code == 200, response.text
    assert len(response.json()["items"]) == 2


@pytest.mark.parametrize("q", ["!!!", "a b c d e f g h i j k l", "x" * 200])
def test_any_q_the_document_allows_is_answered(client: TestClient, q: str) -> None:
    """`q` is 1-200 characters to the document; a q without words constrains nothing."""
    doc = client.post("/v1/documents", json={**VALID, "content": "a b c d e f g h i j k l"})
    assert _parameter_schema(client, "q").is_valid(q)
    response = client.get("/v1/documents", params={"q": q})
    assert response.status_code == 200, response.text
    expected = [] if q.startswith("x") else [doc.json()["id"]]
    assert [d["id"] for d in response.json()["items"]] == expected


# --- nesting depth ------------------------------------------------------------------------------


def _nested(depth: int) -> bytes:
    """A create body whose metadata nests arrays until the whole body is `depth` deep."""
    inner = depth - 1
    return b'{"title": "t", "content": "x", "metadata": ' + b"[" * inner + b"]" * inner + b"}"


@pytest.mark.parametrize("depth", [MAX_NESTING + 1, 1_000, 100_000])
def test_a_body_nested_deeper_than_the_bound_is_malformed_on_every_python(
    client: TestClient, depth: int
) -> None:
    response = client.post(
        "/v1/documents", content=_nested(depth), headers={"Content-Type": "application/json"}
    )
    body = assert_problem(response, 400)
    assert f"more than {MAX_NESTING} deep" in body["detail"]


def test_a_body_at_the_bound_reaches_validation(client: TestClient) -> None:
    response = client.post(
        "/v1/documents",
        content=_nested(MAX_NESTING),
        headers={"Content-Type": "application/json"},
    )
    assert_problem(response, 422)  # metadata must be an object: parsed, then validated


def test_brackets_inside_strings_are_text_not_nesting(client: TestClient) -> None:
    content = '[{"\\"' * 200 + "]}" * 200
    response = client.post("/v1/documents", json={**VALID, "content": content})
    assert response.status_code == 201, response.text
    assert response.json()["content"] == content


# --- the word index -----------------------------------------------------------------------------


def test_a_documents_indexed_words_are_bounded() -> None:
    text = " ".join(f"w{n}" for n in range(INDEXED_WORDS_MAX + 500))
    indexed = document_words("title", text)
    assert len(indexed) == INDEXED_WORDS_MAX
    assert "title" in indexed  # the title's words come first
    long_word = "a" * (INDEXED_WORD_MAX_CHARS + 1)
    assert document_words("a" * INDEXED_WORD_MAX_CHARS, long_word) == {"a" * 64}


def test_the_tokenizer_works_in_bounded_pieces_and_finds_the_words_of_the_whole_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each Unicode step is one C call that holds the interpreter lock for as long as its input:
    in pieces, the event loop runs between them while a thread tokenizes a large document, and
    the lock is let go between pieces (beside back-to-back writes of 100 000 characters of `é`,
    other clients' GETs had waited twice as long for it)."""
    sizes: list[int] = []
    yields: list[float] = []
    normalize, sleep, this = unicodedata.normalize, time.sleep, threading.get_ident()

    # Only this thread's calls: another's (a driver's monitor sleeping) would count, and spin.
    def recorded(form: str, text: str) -> str:
        if threading.get_ident() == this:
            sizes.append(len(text))
        return normalize(form, text)  # type: ignore[arg-type]

    def slept(seconds: float) -> None:
        if threading.get_ident() == this:
            yields.append(seconds)
        else:
            sleep(seconds)

    text = "Crème brûlée Ⅻ ﬃ " * 10_000
    models.words(text[:2_000])  # each character is folded alone once, where a piece may end
    monkeypatch.setattr(unicodedata, "normalize", recorded)
    monkeypatch.setattr(time, "sleep", slept)
    assert models.words(text) == ["creme", "brulee", "xii", "ffi"] * 10_000
    pieces = sizes[::2]  # each piece is normalized twice: as cut, then after casefold
    assert len(pieces) > 1
    assert max(pieces) <= models.WORDS_PIECE_CHARS
    assert yields == [0] * (len(pieces) - 1)
    yields.clear()
    assert models.words("Crème") == ["creme"]  # one piece, tokenized where it is written
    assert yields == []


def _separated(between: str) -> str:
    return between.join(f"wé{n}" for n in range(2_000))


def _joined(within: str) -> str:
    return " ".join(f"wé{n}{within}{n}" for n in range(2_000))


@pytest.mark.parametrize(
    "text",
    [
        *map(_separated, [" ", "\U0001f600", "+", "\u200b", "_", "\u00b4", "\u2474"]),
        *map(_separated, ["\u037a", "\u0140"]),
        *map(_joined, ["\u2122", "\u0301", "\u2460"]),
        " ".join("e\u0301" * 40 + str(n) for n in range(300)),  # 40 letters, 80 characters
        " ".join(f"{'l' * 124}tail{n}é" for n in range(100)),  # too long for the index
    ],
    ids=[
        *["space", "emoji", "plus", "zero-width space", "underscore", "acute", "⑴"],
        *["ypogegrammeni", "l with middle dot"],
        *["TM", "mark", "①"],
        *["words of many marks", "words too long to index"],
    ],
)
def test_the_words_of_a_text_in_pieces_are_those_of_the_whole(text: str) -> None:
    """A piece had ended only after a space or punctuation: at a symbol (an emoji, `+`) or a
    format character the cut fell inside the next word, and `q` found its halves, not it; nor
    after a digit between brackets (`⑴`), nor next to a letter folding into one beside a space
    or a dot (U+037A: a space and an iota; `ŀ` is `l·`), and the word the cut fell in went.
    Some characters fold into letters (TM, a circled digit) and a mark into nothing: they join
    the characters around them into one word, so no piece ends after one."""
    folded = models._fold(text.translate(models._UNMARK)).translate(models._MARKS)
    assert models.words(text) == models._WORD.findall(folded)


@pytest.mark.parametrize("joint", ["½", "\u3310"])
def test_a_run_with_nowhere_to_cut_leaves_no_part_of_a_word(joint: str) -> None:
    """A run of word characters with no separator for SEPARATOR_SEARCH_CHARS (`½` folds into
    a 1, a fraction slash and a 2, and joins its neighbours; `㌐` into kana and their voicing
    marks, which go) is cut where it must be: the words the cut falls in go, and none of their
    parts is taken for a word (`2w20` and `31` had been, and `aキカ` of `aキカxyz`)."""
    text = "é " + joint.join(f"w{n:03d}" for n in range(300))
    folded = models._fold(text.translate(models._UNMARK)).translate(models._MARKS)
    whole = models._WORD.findall(folded)
    found = models.words(text)
    assert set(found) <= set(whole)
    assert len(whole) - len(found) <= 2 * (len(text) // models.WORDS_PIECE_CHARS)


def test_normalization_has_no_marks_to_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    """Normalization sorts a run of combining marks by class in time quadratic in its length:
    1 024 marks in reverse order held the interpreter lock for 2.4 ms a piece, as did U+0345
    (a mark) before U+FF9E (a letter that decomposes into a mark). Marks are dropped before it,
    U+0345 made the letter it folds to, and the words are the same."""
    inversions: list[int] = []
    fold = models._fold

    def recorded(text: str) -> str:
        # Pairs that normalization must swap: in a run of marks, one before a lower class.
        swaps, run = 0, Counter[int]()
        for char in text:
            for mark_class in map(unicodedata.combining, unicodedata.normalize("NFKD", char)):
                if not mark_class:
                    run.clear()
                swaps += sum(n for c, n in run.items() if c > mark_class)
                run[mark_class] += bool(mark_class)
        inversions.append(swaps)
        return fold(text)

    monkeypatch.setattr(models, "_fold", recorded)
    marks = sorted(map(chr, range(0x300, 0x345)), key=unicodedata.combining, reverse=True)
    assert models.words("a" + "".join(marks) * 10 + "b") == ["ab"]  # 690 marks in one piece
    assert models.words(" ".join(["\u0345" * 500 + "\uff9e" * 500] * 2)) == ["\u03b9" * 500] * 2
    assert max(inversions) == 0
    assert models.words("\u1fb3") == models.words("\u03b1\u0345") == ["\u03b1\u03b9"]


def test_text_past_the_folded_bound_is_not_indexed() -> None:
    """Folding is where tokenizing costs, and a character may fold into 18 (U+FDFA): words are
    found until the folded text passes the bound, which ordinary text of the longest content
    (an accented letter folds into two) does not reach. The title's words always count."""
    assert "needle" in document_words("title", "é" * 90_000 + " needle")
    folding = "\ufdfa" * 20_000
    assert document_words("title", f"{folding} needle") == document_words("title", folding)
    assert "title" in document_words("title", folding)
    assert INDEXED_FOLDED_CHARS_MAX < 20_000 * 18
    # A word within the bound is found, though the piece it ends passes it (that piece's words
    # had all gone); one the bound cuts is not, nor its first part.
    just_within = (INDEXED_FOLDED_CHARS_MAX - 6 - len("title\n")) // 19
    before = "\ufdfa " * just_within
    assert "needle" in document_words("title", before + "needle" + " z" * 200)
    cut = document_words("title", before + "x" * 20 + " z" * 200)
    assert not any(word.startswith("x") for word in cut)
    # ASCII text, folded as it is, had no bound at all (a larger MAX_CONTENT_CHARS reaches it).
    ascii_text = "x " * (INDEXED_FOLDED_CHARS_MAX // 2)
    assert "needle" not in document_words("title", ascii_text + "needle")
    assert "needle" in document_words("title", ascii_text[: -len("title\n") - 8] + "needle")
    assert "needl" not in document_words("title", ascii_text[: -len("title\n") - 2] + "needle")


@pytest.mark.parametrize("backend", ["sqlite", "mongodb"])
def test_words_past_the_bound_are_not_found(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    extra = {"database_url": request.getfixturevalue("mongo_url")} if backend == "mongodb" else {}
    content = " ".join(f"w{n}" for n in range(INDEXED_WORDS_MAX + 10))
    with app_client(tmp_path, headers={"X-API-Key": KEY}, **extra) as client:
        doc = client.post("/v1/documents", json={"title": "many", "content": content}).json()

        def found(q: str) -> list[str]:
            page = client.get("/v1/documents", params={"q": q}).json()
            return [d["id"] for d in page["items"]]

        assert found(f"w{INDEXED_WORDS_MAX - 2}") == [doc["id"]]  # "many" is the first word
        assert found(f"w{INDEXED_WORDS_MAX}") == []


def test_the_mark_table_holds_every_mark() -> None:
    """Built at import from the planes that hold marks; it must not miss one elsewhere."""
    every = {c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c))[0] == "M"}
    assert set(models._MARKS) == every
