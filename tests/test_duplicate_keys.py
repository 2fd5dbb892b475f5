"""A body whose objects repeat a key (``{"user_id": "a", ..., "user_id": "b"}``) is a 422
naming the key's path, on every route that reads JSON, with the native codec and
without it (``CTR_NATIVE_JSON=off``); the C walk (``ctr_duplicate_key``), its Python twin
(``service.validate.first_duplicate``) and a reference built on ``json`` agree."""

from __future__ import annotations

import ctypes
import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service import codec, validate
from service.app import create_app
from service.errors import BadRequest
from service.validate import _no_repeats, exact_json, first_duplicate, score_input
from tests.helpers import Built, build_bundle, settings_for

KEY = {"X-API-Key": "k"}
JSON = {"Content-Type": "application/json", **KEY}


@pytest.fixture(scope="module")
def enc(lib: Any) -> codec.NativeCodec:
    return codec.NativeCodec(str(lib.path))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_bundle(tmp_path_factory.mktemp("dupkeys"), "din")


@pytest.fixture(scope="module")
def clients(built: Built, lib: Any) -> Iterator[tuple[TestClient, TestClient]]:
    """The service with the native codec, and with ``CTR_NATIVE_JSON=off``."""
    native = create_app(settings_for(built, ops_library=str(lib.path), api_key="k"))
    plain = create_app(settings_for(built, native_json="off", api_key="k"))
    with TestClient(native) as a, TestClient(plain) as b:
        assert a.app.state.ctr.codec is not None  # type: ignore[attr-defined]
        assert b.app.state.ctr.codec is None  # type: ignore[attr-defined]
        yield a, b


def post_both(clients: tuple[TestClient, TestClient], path: str, body: bytes) -> list[Any]:
    """``body`` posted to both services; their answers, which must be the same."""
    got = [c.post(path, content=body, headers=JSON) for c in clients]
    a, b = got
    assert a.status_code == b.status_code, (a.text, b.text)
    if a.status_code >= 400:  # the same error, each with its own request's ID
        assert a.json().pop("request_id") != b.json().pop("request_id")
        assert {**a.json(), "request_id": None} == {**b.json(), "request_id": None}
    return got


def refused(r: Any, field: str) -> None:
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "bad_request" and body["field"] == field, body
    assert body["detail"] == f"duplicate key {field!r}"


SCORE_DUPLICATES = [
    # the plain candidate list (the native scan's case) around a repeated top-level key
    ('{"user_id":"a","candidates":[{"item_id":"i1"}],"user_id":"b"}', "user_id"),
    # before the type check
    ('{"user_id":1,"user_id":"a","candidates":[{"item_id":"i1"}]}', "user_id"),
    ('{"candidates":[{"item_id":"i1"}],"top_k":1,"user_id":"u","top_k":2}', "top_k"),
    ('{"user_id":"u","candidates":[{"item_id":"i1"}],"context":{"age":1,"age":2}}', "context.age"),
    ('{"user_id":"u","candidates":[{"item_id":"i1"},{"item_id":"x","item_id":"y"}]}',
     "candidates[1].item_id"),
    ('{"user_id":"u","candidates":[{"item_id":"x","features":{"price":1.5,"cat":"c",'
     '"price":2}}]}', "candidates[0].features.price"),
    ('{"user_id":"u","candidates":[{"item_id":"x","features":{}},{"item_id":"y",'
     '"features":{"a":1},"features":{"a":1}}]}', "candidates[1].features"),
    # the same key escaped: compared by its decoded text
    ('{"user_id":"a","user\\u005fid":"b","candidates":[{"item_id":"i1"}]}', "user_id"),
    ('{"user_id":"u","candidates":[{"item_id":"i1"}],"context":{"\\u00e9t\\u00e9":1,"été":2}}',
     "context.été"),
    # any depth, in values the field checks would refuse anyway: this answer comes first
    ('{"user_id":"u","candidates":[{"item_id":"i1"}],"context":{"k":[0,{"a":1,"a":2}]}}',
     "context.k[1].a"),
    ('{"":1,"":2}', '""'),
]  # fmt: skip


@pytest.mark.parametrize(("body", "field"), SCORE_DUPLICATES)
def test_score_refuses_a_repeated_key(
    clients: tuple[TestClient, TestClient], body: str, field: str
) -> None:
    for r in post_both(clients, "/v1/score", body.encode()):
        refused(r, field)


SCORE_ACCEPTED = [
    # one key name in several objects is no repeat
    '{"user_id":"u","candidates":[{"item_id":"a","features":{"price":1}},'
    '{"item_id":"b","features":{"price":2}}],"context":{"price":3}}',
    # a key's text inside a string value, with escaped quotes and colons around it
    '{"user_id":"\\"user_id\\"","candidates":[{"item_id":"user_id:\\"x\\""}]}',
    '{"user_id":"u:1","candidates":[{"item_id":"a:b"},{"item_id":"c"}],'
    '"context":{"note":"\\"note\\":1,\\"note\\":2"}}',
    # keys that differ only after decoding
    '{"user_id":"u","candidates":[{"item_id":"a","features":{"\\u00e9":1,"e":2,"é\\u0301":3}}]}',
]


@pytest.mark.parametrize("body", SCORE_ACCEPTED)
def test_score_accepts_names_repeated_across_objects(
    clients: tuple[TestClient, TestClient], body: str
) -> None:
    for r in post_both(clients, "/v1/score", body.encode()):
        assert r.status_code == 200, r.text


def test_an_object_of_50k_keys_is_checked(clients: tuple[TestClient, TestClient]) -> None:
    """Past the linear compare's few keys the C walk uses a table, and the Python check
    proves such a body free of repeats by counting: it answers (no timing asserted).
    Since session 47 an object of more than 256 keys is refused for its size, after the
    check for repeats: the repeat is named, else the object."""
    keys = ",".join(f'"k{i}":{i}' for i in range(50_000))
    head = '{"user_id":"u","candidates":[{"item_id":"i1"}],"context":{' + keys
    for r in post_both(clients, "/v1/score", (head + "}}").encode()):
        assert r.status_code == 422 and r.json()["field"] == "context", r.text
        assert r.json()["detail"] == "context has 50000 keys; the most it may have is 256"
    for r in post_both(clients, "/v1/score", (head + ',"k49999":0}}').encode()):
        refused(r, "context.k49999")


def test_events_refuse_a_repeated_key(clients: tuple[TestClient, TestClient]) -> None:
    event = '{"user_id":"u","event_id":"e1","item_id":"i1","timestamp":1700000000'
    for extra, field in ((',"item_id":"i2"', "item_id"),
                         (',"features":{"x":1,"y":2,"x":3}', "features.x")):  # fmt: skip
        for r in post_both(clients, "/v1/events", (event + extra + "}").encode()):
            refused(r, field)


def test_reload_refuses_a_repeated_key(clients: tuple[TestClient, TestClient]) -> None:
    for r in post_both(clients, "/admin/reload", b'{"version":"latest","version":1}'):
        refused(r, "version")


@pytest.mark.parametrize("path", ["/v1/score", "/v1/events", "/admin/reload"])
def test_every_route_looks_in_c_where_the_codec_is_loaded(
    clients: tuple[TestClient, TestClient], path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Python walk (about 0.3 ms a KB) runs only without the codec: a crafted body of
    a megabyte would otherwise cost the event loop a third of a second."""
    walks: list[bytes] = []
    real = validate.first_duplicate

    def spy(body: bytes) -> str:
        walks.append(body)
        return real(body)

    monkeypatch.setattr(validate, "first_duplicate", spy)
    body = b'{"x":[' + b"{}," * 1000 + b'{}],"x":1}'
    native, plain = post_both(clients, path, body)
    refused(native, "x")
    refused(plain, "x")
    assert walks == [body]  # the plain service's, only


def test_a_long_repeated_key_is_not_sent_back_whole(
    clients: tuple[TestClient, TestClient],
) -> None:
    key = "k" * 5000
    body = f'{{"user_id":"u","candidates":[{{"item_id":"i"}}],"{key}":1,"{key}":2}}'
    for r in post_both(clients, "/v1/score", body.encode()):
        field = r.json()["field"]
        assert r.status_code == 422 and field == "k" * validate.MAX_FIELD + "…"
        assert len(r.text) < 1000


def test_a_long_key_is_not_sent_back_whole_wherever_it_is_refused(
    clients: tuple[TestClient, TestClient],
) -> None:
    """An unknown key, a candidate's unknown key, a bad value under a long feature or
    context key: the answer names the field cut to MAX_FIELD characters, never the whole
    key (a 500 KB key answered with 1 MB)."""
    key = "k" * 500_000
    cut = "k" * validate.MAX_FIELD + "…"
    cases = {
        f'{{"user_id":"u","candidates":[{{"item_id":"i"}}],"{key}":1}}': cut,
        f'{{"user_id":"u","candidates":[{{"item_id":"i","{key}":1}}]}}': "candidates[0]." + cut,
        f'{{"user_id":"u","candidates":[{{"item_id":"i","features":{{"{key}":[1]}}}}]}}': (
            "candidates[0].features." + cut
        ),
        f'{{"user_id":"u","candidates":[{{"item_id":"i"}}],"context":{{"{key}":[1]}}}}': (
            "context." + cut
        ),
    }
    for body, field in cases.items():
        for r in post_both(clients, "/v1/score", body.encode()):
            got = r.json()
            assert r.status_code == 422 and len(r.content) < 2000, (r.status_code, len(r.content))
            assert got["field"] == field[: validate.MAX_FIELD] + "…"
            assert len(got["detail"]) <= validate.MAX_DETAIL + 1


def test_malformed_json_stays_a_400(clients: tuple[TestClient, TestClient]) -> None:
    for r in post_both(clients, "/v1/score", b'{"user_id":"a","user_id":"b",'):
        assert r.status_code == 400 and r.json()["error"] == "malformed_json"


def test_a_library_without_the_function_checks_in_python(lib: Any) -> None:
    """A cached library older than ``ctr_duplicate_key`` still loads; its answers are
    the Python check's."""
    old = codec.NativeCodec(str(lib.path))
    old._dup = None
    assert old.duplicate_key(b'{"a":1,"a":2}') is None
    assert codec.self_check(old) is None
    for body, field in SCORE_DUPLICATES:
        with pytest.raises(BadRequest) as caught:
            score_input(body.encode(), 10, 16, old)
        assert caught.value.field == field


@pytest.mark.parametrize(
    ("body", "path"),
    [
        (b'{"a":1,"b":2}', ""),
        (b'[{"a":1},{"a":1}]', ""),
        (b'{"a":1,"a":2}', "a"),
        (b'[[1,{"b":[0,0,{"c":1,"c":2}]}]]', "[0][1].b[2].c"),
        (b'{"x":[[],[{"y":{"z":[{},{"q":0,"q":0}]}}]]}', "x[1][0].y.z[1].q"),
        (b' { "a" : [ ] , "b" : { } , "a" : null } ', "a"),
        # the first repeat in document order: the outer one here, the inner one there
        (b'{"a":1,"a":{"x":1,"x":2}}', "a"),
        (b'{"a":{"x":1,"x":2},"a":1}', "a.x"),
        # escapes decoded as json decodes them: a pair is one code point, a lone
        # surrogate its own (UTF-8 "surrogatepass" bytes)
        (b'{"a\\u0062":1,"ab":2}', "ab"),
        (b'{"\\"":1,"\\u0022":2}', '"'),
        (b'{"\\ud83d\\ude00":1,"\xf0\x9f\x98\x80":2}', "\U0001f600"),
        (b'{"\\ud800":1,"\xed\xa0\x80":2}', "\ud800"),
        (b'{"\\ud83d\\u0041":1,"\xed\xa0\xbdA":2}', "\ud83dA"),
        (b'{"\\ud83d\\ude00":1,"\xed\xa0\xbd\xed\xb8\x80":2}', ""),  # 1 code point, 2 units
        # strings that look like keys are values
        (b'{"a":"\\"a\\":1","b":["a","a"],"c":"{\\"a\\":1,\\"a\\":2}"}', ""),
        (b'{"":{"":1,"":2}}', "."),
        (b'{"":1,"":2}', '""'),
        (b'{"n":NaN,"i":-Infinity,"n":1e999}', "n"),  # literals json reads
    ],
)
def test_the_c_walk_and_its_python_twin(enc: codec.NativeCodec, body: bytes, path: str) -> None:
    assert enc.duplicate_key(body) == path
    assert first_duplicate(body) == path
    assert reference(body) == path


@pytest.mark.parametrize(
    "body",
    [
        b'{"a":1,"b":2',  # not JSON (before any repeat): the walk does not tell
        b'{"a":1}}',
        b'{"a" 1}',
        b'{"a\\x":1}',  # an escape JSON does not have
        b'{"a\\u00":1}',
        b"[" * 3000 + b"]" * 3000,  # past its depth bound
    ],
)
def test_the_c_walk_says_when_it_cannot_tell(enc: codec.NativeCodec, body: bytes) -> None:
    assert enc.duplicate_key(body) is None


def test_the_c_walk_needs_room_for_the_path(enc: codec.NativeCodec) -> None:
    body = b'{"abc":{"abc":1,"abc":2}}'
    out = ctypes.create_string_buffer(64)
    assert enc._dup(body, len(body), out, 64) == 7 and out.raw[:7] == b"abc.abc"
    assert enc._dup(body, len(body), out, 6) == -1
    assert enc._dup(body, len(body), out, 0) == -1


def test_large_objects_take_the_table(enc: codec.NativeCodec) -> None:
    """Objects past the linear compare's 16 keys, nested in each other and closing in
    between (the table drops a closed object's keys when it grows)."""
    keys = [f'"k{i}":{i}' for i in range(40_000)]
    flat = ("{" + ",".join(keys) + "}").encode()
    assert enc.duplicate_key(flat) == first_duplicate(flat) == ""
    again = ("{" + ",".join([*keys, '"k39999":0']) + "}").encode()
    assert enc.duplicate_key(again) == first_duplicate(again) == "k39999"
    inner = "{" + ",".join(keys[:100]) + "}"
    nested = ("{" + ",".join(f'"o{j}":{inner}' for j in range(300)) + ',"o7":1}').encode()
    assert enc.duplicate_key(nested) == first_duplicate(nested) == "o7"
    deep = '{"a":{"b":[' + inner + ",{" + ",".join(keys[:50]) + ',"k3":0}]}}'
    assert enc.duplicate_key(deep.encode()) == first_duplicate(deep.encode()) == "a.b[1].k3"


class Pairs(list):  # an object's members, as json read them in order
    pass


def reference(body: bytes) -> str:
    """The first repeated key's path by ``json`` (``object_pairs_hook``), recursively."""

    def walk(v: Any, path: list[str]) -> str | None:
        if isinstance(v, Pairs):
            seen: set[str] = set()
            for k, x in v:
                here = [*path, f".{k}" if path else k]
                if k in seen:
                    return "".join(here) or '""'
                seen.add(k)
                if (found := walk(x, here)) is not None:
                    return found
        elif isinstance(v, list):
            for i, x in enumerate(v):
                if (found := walk(x, [*path, f"[{i}]"])) is not None:
                    return found
        return None

    text = body.decode("utf-8", "surrogatepass")
    return walk(json.loads(text, object_pairs_hook=Pairs), []) or ""


# keys from a small alphabet (so that they repeat), lone surrogates and astral included
_key = st.text(
    st.sampled_from(["a", "b", "é", "\U0001f600", "\ud83d", "\ude00", '"', "\\", ":", " "]),
    max_size=3,
)
_scalar = st.one_of(st.none(), st.integers(-5, 5), st.sampled_from(["a", 'x":1', "\\", ":"]))
_tree = st.recursive(
    _scalar,
    lambda inner: (
        st.lists(inner, max_size=4) | st.builds(Pairs, st.lists(st.tuples(_key, inner), max_size=5))
    ),
    max_leaves=20,
)


def _dump(v: Any, data: st.DataObject, ws: str) -> str:
    """``v`` as JSON text; each key character written as is or ``\\u``-escaped at random."""
    if isinstance(v, Pairs):
        members = [f"{_key_text(k, data)}{ws}:{ws}{_dump(x, data, ws)}" for k, x in v]
        return "{" + f",{ws}".join(members) + "}"
    if isinstance(v, list):
        return "[" + f",{ws}".join(_dump(x, data, ws) for x in v) + "]"
    return json.dumps(v, ensure_ascii=False)


def _key_text(k: str, data: st.DataObject) -> str:
    out = []
    for ch in k:
        how = data.draw(st.sampled_from(["raw", "json", "u"]))
        if how == "raw":
            out.append(json.dumps(ch, ensure_ascii=False)[1:-1])
        elif how == "json":
            out.append(json.dumps(ch)[1:-1])  # \\, \", or \\uXXXX (a pair for astral)
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04X}")
        else:
            c = ord(ch) - 0x10000
            out.append(f"\\u{0xD800 + (c >> 10):04x}\\u{0xDC00 + (c & 0x3FF):04x}")
    return '"' + "".join(out) + '"'


@given(tree=_tree, data=st.data(), ws=st.sampled_from(["", " ", "\n\t"]))
@settings(max_examples=800, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_walks_agree_with_json(
    enc: codec.NativeCodec, tree: Any, data: st.DataObject, ws: str
) -> None:
    """Generated bodies with repeated keys anywhere, keys escaped at random: the C walk,
    the Python walk and ``json`` name the same key; the counting check never clears a
    body with a repeat."""
    body = _dump(tree, data, ws).encode("utf-8", "surrogatepass")
    want = reference(body)
    assert enc.duplicate_key(body) == want, body
    assert first_duplicate(body) == want, body
    if want:
        assert not _no_repeats(body, exact_json(body)), body


@given(tree=st.builds(Pairs, st.lists(st.tuples(_key, _tree), min_size=1, max_size=5)),
       data=st.data())  # fmt: skip
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
def test_scoring_answers_the_same_with_and_without_the_codec(
    enc: codec.NativeCodec, tree: Pairs, data: st.DataObject
) -> None:
    """A scoring body with a repeat anywhere: the answer with the C walk (and the scan)
    is the one without them."""
    members = [("user_id", "u"), ("candidates", [Pairs([("item_id", "i1")])]), *tree]
    order = data.draw(st.permutations(members))
    body = _dump(Pairs(order), data, "").encode("utf-8", "surrogatepass")

    def outcome(scanner: codec.NativeCodec | None) -> object:
        try:
            return score_input(body, 10, 16, scanner)
        except BadRequest as exc:
            return type(exc).__name__, exc.message, exc.field

    assert outcome(enc) == outcome(None), body
