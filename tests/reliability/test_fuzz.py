"""B1-B4 (issue #12): a live server fuzzed at its edges. Every answer must be a 2xx, or a 4xx
in OpenAI's error shape; never a 5xx; and /health, probed concurrently, must keep answering.

B1 schemathesis over /openapi.json, B2 hypothesis over the sampling fields and over
safetensors headers, B3 atheris over the adapter parser (fuzz_adapter.py, its own process),
B4 a table of giant or malformed values for every field and header. Each test collects every
broken case, then fails listing them (the request and the response).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from .conftest import ADMIN, LONG, ServerProcess, scale

HEALTH_STALL_S = 1.0  # one /health answer slower than this is a stall
FUZZER = Path(__file__).with_name("fuzz_adapter.py")


def _settings(examples: int):
    # No example database (nothing written into the checkout); fixed seeds in CI.
    return settings(max_examples=examples, deadline=None, database=None, derandomize=not LONG,
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=list(HealthCheck))


# ---- the server, the /health probe, the contract ------------------------------------------

@pytest.fixture(scope="module")
def server(embedded_dir, tenant_file, tmp_path_factory):
    """One server for the module (a start is ~15 s). --max-model-len 512 bounds what a
    generated request may ask for; every test checks it is still alive when it ends."""
    workdir = tmp_path_factory.mktemp("fuzz")
    proc = ServerProcess([str(embedded_dir), "--admin-key", ADMIN, "--tenant-keys",
                          str(tenant_file), "--adapter-store", str(workdir / "store"),
                          "--num-kv-blocks", "512", "--max-model-len", "512"], workdir)
    proc.start()
    yield proc
    proc.kill()


@pytest.fixture
def live(server):
    if server.proc.poll() is not None:  # an earlier test killed it: start it again
        server.start()
    yield server
    assert server.proc.poll() is None, "the server died:\n" + server.log.read_text()[-3000:]


class HealthProbe:
    """GET /health every 50 ms on its own connection while the block runs."""

    def __init__(self, url: str):
        self.url = f"{url}/health"
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    status = client.get(self.url).status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                self.latencies.append(time.monotonic() - t0)
                if status != 200:
                    self.errors.append(str(status))
                self._stop.wait(0.05)

    @property
    def p99_ms(self) -> float:
        if len(self.latencies) < 2:
            return 1000 * max(self.latencies, default=0.0)
        return 1000 * statistics.quantiles(self.latencies, n=100)[98]

    @property
    def max_ms(self) -> float:
        return 1000 * max(self.latencies, default=0.0)

    def record(self, figures, case: str) -> None:
        figures.record(case, "/health p99 during the run", round(self.p99_ms, 1), "ms",
                       f"max {self.max_ms:.0f} ms over {len(self.latencies)} probes")


def shape_problem(status: int, body: bytes) -> str | None:
    """Why an answer breaks the contract: a 5xx, or a 4xx not in OpenAI's error shape."""
    if status >= 500:
        return f"{status}: a server error"
    if status < 400:
        return None
    try:
        error = json.loads(body)["error"]
        ok = (isinstance(error["message"], str) and isinstance(error["type"], str)
              and all(error[k] is None or isinstance(error[k], str) for k in ("param", "code")))
    except (ValueError, KeyError, TypeError):
        ok = False
    return None if ok else f"{status} not in OpenAI's error shape"


@dataclass
class Findings:
    """Broken cases, one line each (deduplicated by `key`), and the counts of the run."""

    name: str
    cases: int = 0
    server_errors: int = 0
    lines: dict[str, str] = field(default_factory=dict)
    statuses: Counter = field(default_factory=Counter)

    def answered(self, status: int | None) -> None:
        self.cases += 1
        self.statuses[str(status)] += 1
        self.server_errors += status is not None and status >= 500

    def add(self, key: str, line: str) -> None:
        self.lines.setdefault(re.sub(r"\d+", "N", key), line)

    def finish(self, figures, probe: HealthProbe | None = None) -> None:
        figures.record(self.name, "cases run", self.cases,
                       note=" ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items())))
        if self.statuses:  # HTTP answers
            figures.record(self.name, "5xx answers", self.server_errors)
        if probe is not None:
            probe.record(figures, self.name)
            if probe.max_ms > 1000 * HEALTH_STALL_S or probe.errors:
                self.add("health", f"/health stalled or failed meanwhile: max {probe.max_ms:.0f}"
                         f" ms, p99 {probe.p99_ms:.0f} ms, errors {probe.errors[:5]}")
        if self.lines:
            pytest.fail(f"{self.name}: {len(self.lines)} broken case(s):\n" + "\n".join(
                f"- {line}" for line in self.lines.values()), pytrace=False)


def excerpt(data: bytes | str, limit: int = 300) -> str:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


# ---- hostile JSON ------------------------------------------------------------------------

@dataclass(frozen=True)
class Raw:
    """JSON text sent as it is: what json.dumps will not write (NaN spelled as JavaScript
    does, 5,000-digit integers, 100,000-deep arrays)."""

    text: str
    label: str = ""

    def __repr__(self) -> str:
        return self.label or excerpt(self.text, 40)


def dumps(body) -> bytes:
    raws: list[Raw] = []

    def placeholder(o):
        assert isinstance(o, Raw), o
        raws.append(o)
        return f"\x00raw{len(raws) - 1}\x00"

    text = json.dumps(body, default=placeholder)
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\x00raw{i}\x00"), raw.text, 1)
    return text.encode()


DEEP = Raw("[" * 100_000 + "]" * 100_000, "100,000-deep array")
HUGE_INT = Raw("9" * 5000, "5,000-digit int")
HOSTILE = {  # name -> value; the fields that accept a value list its name
    "null": None, "1 MB string": "x" * 2**20, "5,000-digit int": HUGE_INT,
    "-5,000-digit int": Raw("-" + "9" * 5000, "-5,000-digit int"), "1e308": Raw("1e308"),
    "-1e308": Raw("-1e308"), "1e309": Raw("1e309"), "NaN": Raw("NaN"),
    "Infinity": Raw("Infinity"), "-Infinity": Raw("-Infinity"), "deep array": DEEP,
    "string": "x", "true": True, "object": {"a": 1}, "int array": [1], "0.5": 0.5, "-1": -1,
    "2^63": 2**63,
}
# (field, routes, the HOSTILE names it accepts, extra body); "either:NAME": 2xx or 4xx.
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
BOTH = (COMPLETIONS, CHAT)
FIELDS: list[tuple[str, tuple[str, ...], set[str], dict]] = [
    ("model", BOTH, {"null"}, {}),
    ("temperature", BOTH, {"null", "0.5"}, {}),
    ("top_p", BOTH, {"null", "0.5"}, {}),
    ("top_k", BOTH, {"null", "-1"}, {}),
    ("seed", BOTH, {"null", "-1", "2^63"}, {}),  # torch takes seeds up to 2^64 - 1
    ("max_tokens", (COMPLETIONS,), {"null"}, {}),
    ("max_completion_tokens", (CHAT,), {"null"}, {}),
    ("n", BOTH, {"null"}, {}),
    ("stop", BOTH, {"null", "string"}, {}),
    ("stop_token_ids", BOTH, {"null", "int array"}, {}),
    ("ignore_eos", BOTH, {"null", "true"}, {}),
    ("stream", BOTH, {"null", "true"}, {}),
    ("stream_options", BOTH, {"null", "either:object"}, {"stream": True}),
    ("presence_penalty", BOTH, {"null"}, {}),
    ("frequency_penalty", BOTH, {"null"}, {}),
    ("repetition_penalty", BOTH, {"null"}, {}),
    ("logprobs", (COMPLETIONS,), {"null"}, {}),
    ("logprobs", (CHAT,), {"null", "true"}, {}),
    ("top_logprobs", (CHAT,), {"null"}, {"logprobs": True}),
    ("prompt", (COMPLETIONS,), {"string", "int array"}, {}),
    ("messages", (CHAT,), set(), {}),
    ("response_format", (CHAT,), {"null", "either:object"}, {}),
    *((f, BOTH, {"null"}, {}) for f in ("logit_bias", "suffix", "tools", "functions",
                                        "best_of")),
    ("echo", (COMPLETIONS,), {"null"}, {}),
]
BASE = {COMPLETIONS: {"prompt": "Hello", "max_tokens": 2},
        CHAT: {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}}
# Values of one field that only a table can name: (route, field, label, value, valid).
SPECIFIC = [
    (COMPLETIONS, "prompt", "65 prompts", ["a"] * 65, False),
    (COMPLETIONS, "prompt", "empty string", "", False),
    (COMPLETIONS, "prompt", "token id -1", [-1], False),
    (COMPLETIONS, "prompt", "token id 2^70", [2**70], False),
    (COMPLETIONS, "prompt", "an empty token array", [[1], []], False),
    (COMPLETIONS, "prompt", "mixed strings and ids", ["a", 1], False),
    (COMPLETIONS, "prompt", "a 5,000-digit token id", [HUGE_INT], False),
    (COMPLETIONS, "stop", "17 stop strings", ["s"] * 17, False),
    (COMPLETIONS, "stop", "an empty stop string", [""], False),
    (COMPLETIONS, "stop", "a 257-character stop string", "s" * 257, False),
    (COMPLETIONS, "stop_token_ids", "65 stop token ids", [1] * 65, False),
    (COMPLETIONS, "stop_token_ids", "a negative stop token id", [-1], False),
    (COMPLETIONS, "temperature", "2.0001", 2.0001, False),
    (COMPLETIONS, "top_p", "0", 0, False),
    (COMPLETIONS, "n", "17", 17, False),
    (COMPLETIONS, "logprobs", "21", 21, False),
    (COMPLETIONS, "seed", "-2^63", -(2**63), True),
    (COMPLETIONS, "seed", "2^64 - 1", 2**64 - 1, True),
    (COMPLETIONS, "seed", "2^64", 2**64, False),
    (COMPLETIONS, "seed", "-2^63 - 1", -(2**63) - 1, False),
    (COMPLETIONS, "top_k", "2^63 - 1", 2**63 - 1, True),
    (COMPLETIONS, "stop_token_ids", "token id 2^31", [2**31], False),
    (COMPLETIONS, "max_tokens", "10^6 (past the context)", 10**6, False),
    (CHAT, "top_logprobs", "21", 21, False),
    (CHAT, "messages", "role 'hacker'", [{"role": "hacker", "content": "x"}], False),
    (CHAT, "messages", "content null", [{"role": "user", "content": None}], False),
    (CHAT, "messages", "an image part", [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}], False),
    (CHAT, "messages", "a text part whose text is 5", [{"role": "user", "content": [
        {"type": "text", "text": 5}]}], False),
    (CHAT, "messages", "content of 1 MB", [{"role": "user", "content": "x" * 2**20}], False),
    (CHAT, "messages", "a deep array as content", [{"role": "user", "content": DEEP}], False),
    (CHAT, "messages", "an empty array", [], False),
    (CHAT, "stream_options", "without stream", {"include_usage": True}, False),
]


# Not JSON (NaN, Infinity) or past what the parser takes: the whole body is refused, so the
# 400 may name no field.
BODY_LEVEL = {"5,000-digit int", "-5,000-digit int", "NaN", "Infinity", "-Infinity",
              "deep array", "a 5,000-digit token id", "a deep array as content"}


def _field_cases():
    """(route, field, label, value, expected: '2xx', '400' or 'either', extra body)."""
    for name, routes, accepts, extra in FIELDS:
        for route in routes:
            for label, value in HOSTILE.items():
                expect = ("2xx" if label in accepts
                          else "either" if f"either:{label}" in accepts else "400")
                yield route, name, label, value, expect, extra
    for route, name, label, value, valid in SPECIFIC:
        yield route, name, label, value, "2xx" if valid else "400", {}


# ---- B1: schemathesis over the document -------------------------------------------------

def fuzz_document(document: dict) -> dict:
    """A test-only copy of the document whose requests stay cheap to serve: max_tokens 1-4
    and required, n at most 2, arrays of at most 3 items, strings of at most 64 characters,
    token ids below 1000. Every request valid here is valid in the real document. (Hence no
    `negative_data_rejection` check: a request invalid here, 5 prompts say, may be valid.)"""
    doc = copy.deepcopy(document)

    def shrink(schema):
        if isinstance(schema, dict):
            if "array" in str(schema.get("type")):
                schema["maxItems"] = min(schema.get("maxItems", 3), 3)
            if "string" in str(schema.get("type")):
                schema["maxLength"] = min(schema.get("maxLength", 64), 64)
            if schema.get("type") == "integer" and schema.get("minimum") == 0 \
                    and "maximum" not in schema:
                schema["maximum"] = 999
            for value in schema.values():
                shrink(value)
        elif isinstance(schema, list):
            for value in schema:
                shrink(value)

    schemas = doc["components"]["schemas"]
    for name in ("CompletionRequest", "ChatRequest"):
        shrink(schemas[name])
        props = schemas[name]["properties"]
        props["max_tokens"] = {"type": "integer", "minimum": 1, "maximum": 4}
        props["n"] = {"type": ["integer", "null"], "minimum": 1, "maximum": 2}
        schemas[name]["required"].append("max_tokens")
    schemas["ChatRequest"]["properties"]["max_completion_tokens"] = {
        "type": ["integer", "null"], "minimum": 1, "maximum": 4}
    return doc


def test_openapi_served(live):
    """The live document is server/openapi.py's, served without a key."""
    from loraplex.server.openapi import document

    response = httpx.get(f"{live.url}/openapi.json", timeout=10)
    assert response.status_code == 200, (
        f"GET /openapi.json answered {response.status_code} {excerpt(response.content)}: mount "
        "loraplex.server.openapi.routes in app.py and add /openapi.json to auth.OPEN_PATHS")
    assert response.json() == json.loads(json.dumps(document()))


def test_b1_schemathesis(live, figures):
    """Every operation of the served document (the in-process one until it is mounted), valid
    and invalid requests, each sent with the admin key and with none: no 5xx, documented
    status codes and media types, bodies (SSE events too) that match their schemas."""
    import requests
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance,
                                                   response_schema_conformance,
                                                   status_code_conformance)
    from loraplex.server.openapi import document

    served = httpx.get(f"{live.url}/openapi.json", timeout=10)
    source = served.json() if served.status_code == 200 else document()
    figures.record("B1", "document", "served" if served.status_code == 200 else "in-process",
                   note="" if served.status_code == 200 else "/openapi.json not mounted yet")
    schema = schemathesis.openapi.from_dict(fuzz_document(source))
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]
    findings, session = Findings("B1"), requests.Session()
    keys = {"admin key": {"Authorization": f"Bearer {ADMIN}"}, "no key": {}}

    def exercise(case) -> None:
        for who, headers in keys.items():
            try:
                response = case.call(base_url=live.url, session=session, headers=headers,
                                     timeout=120)
            except requests.RequestException as e:
                findings.answered(None)
                findings.add(f"{case.operation.label} {type(e).__name__}",
                             f"{case.operation.label} ({who}): {type(e).__name__}: {e}")
                continue
            findings.answered(response.status_code)
            problems = []
            shape = shape_problem(response.status_code, response.content)
            if shape:
                problems.append(("shape", shape))
            try:
                case.validate_response(response, checks=checks, headers=headers)
            except BaseExceptionGroup as group:
                problems += [(f.title, f"{f.title}: {excerpt(f.message, 300)}")
                             for f in group.exceptions]
            for title, what in problems:
                findings.add(f"{case.operation.label} {response.status_code} {title}",
                             f"{case.operation.label} ({who}) -> {response.status_code} "
                             f"{excerpt(response.content, 200)}: {what}\n  "
                             f"{excerpt(case.as_curl_command(headers=headers), 600)}")

    examples = scale(15, 300)
    with HealthProbe(live.url) as probe:
        for result in schema.get_all_operations():
            operation = result.ok()
            for mode in (schemathesis.GenerationMode.POSITIVE,
                         schemathesis.GenerationMode.NEGATIVE):
                try:
                    _settings(examples)(given(operation.as_strategy(generation_mode=mode))(
                        exercise))()
                except Unsatisfiable:  # nothing to make invalid (no body, no parameters)
                    assert mode == schemathesis.GenerationMode.NEGATIVE, operation.label
    findings.finish(figures, probe)


# ---- B2: hypothesis over the sampling fields and over safetensors headers ---------------

TEXT = st.text(max_size=12)
NASTY = st.one_of(
    st.sampled_from([v for k, v in HOSTILE.items() if k not in ("1 MB string", "deep array")]),
    st.sampled_from([Raw("[" * d + "]" * d, f"{d}-deep array") for d in (100, 2000, 100_000)]),
    st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.booleans(), TEXT,
    st.lists(st.integers(-3, 10**6), max_size=5), st.dictionaries(TEXT, st.integers(),
                                                                  max_size=2))
VALID = {
    "model": st.sampled_from([None, "", "nope", "acme/x"]),
    "temperature": st.floats(0, 2), "top_p": st.floats(0, 1, exclude_min=True),
    "top_k": st.integers(-1, 100), "seed": st.integers(-(2**63), 2**64 - 1),
    "max_tokens": st.integers(1, 4), "n": st.integers(1, 2),
    "stop": st.text(min_size=1, max_size=8) | st.lists(st.text(min_size=1, max_size=8),
                                                       max_size=16),
    "stop_token_ids": st.lists(st.integers(0, 49151), max_size=64),
    "ignore_eos": st.booleans(), "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "presence_penalty": st.just(0), "frequency_penalty": st.just(0),
    "repetition_penalty": st.just(1), "logprobs": st.integers(0, 20),
}
CHAT_VALID = {"logprobs": st.booleans(), "top_logprobs": st.integers(0, 20),
              "max_completion_tokens": st.integers(1, 4)}


@st.composite
def sampling_bodies(draw):
    route = draw(st.sampled_from(BOTH))
    valid = {**VALID, **(CHAT_VALID if route == CHAT else {})}
    body = dict(BASE[route])
    for name in draw(st.lists(st.sampled_from(sorted(valid)), unique=True, max_size=6)):
        body[name] = draw(valid[name] | NASTY if draw(st.booleans()) else valid[name])
    return route, body


def post(client: httpx.Client, url: str, body, findings: Findings, what: str,
         headers: dict | None = None) -> httpx.Response | None:
    """POST a JSON body; records a 5xx, a 4xx out of shape, or no answer, as a finding."""
    content = body if isinstance(body, bytes) else dumps(body)
    try:
        response = client.post(url, content=content, headers={
            "Content-Type": "application/json", **(headers or {})})
    except httpx.HTTPError as e:
        findings.answered(None)
        findings.add(f"{what} {type(e).__name__}", f"{what}: no answer ({type(e).__name__})")
        return None
    findings.answered(response.status_code)
    problem = shape_problem(response.status_code, response.content)
    if problem:  # one line per route, status and message
        findings.add(f"{url} {problem} {excerpt(response.content, 100)}",
                     f"{what} -> {problem}: {excerpt(response.content, 200)}")
    return response


def test_b2_sampling_fields(live, figures):
    """Up to six sampling fields at once, each valid or hostile: a 2xx or a 4xx in shape."""
    findings = Findings("B2 sampling")
    with HealthProbe(live.url) as probe, httpx.Client(timeout=120) as client:
        @given(sampling_bodies())
        @_settings(scale(150, 5000))
        def run(case):
            route, body = case
            post(client, live.url + route, body, findings,
                 f"POST {route} {excerpt(repr(body), 300)}",
                 headers={"Authorization": f"Bearer {ADMIN}"})
        run()
    findings.finish(figures, probe)


def mostly(good, bad):
    """`good` nine times in ten: enough headers pass the check to reach safetensors."""
    return st.integers(0, 9).flatmap(lambda k: good if k else bad)


DIMS = mostly(st.integers(0, 16), st.integers(-4, -1) | st.integers(2**63, 2**70)
              | st.floats(-2, 64) | st.booleans() | st.text(max_size=2) | st.none())
DTYPES = mostly(st.sampled_from(["F16", "BF16", "F32"]),
                st.sampled_from(["F64", "I8", "BOOL", "f32", ""]) | NASTY)


@st.composite
def safetensors_files(draw) -> bytes:
    """A header that may lie in every field; offsets tile the data when they can, then
    perhaps shifted; a header length that may lie too."""
    header, position = {}, 0
    if draw(st.booleans()):
        header["__metadata__"] = draw(mostly(st.dictionaries(TEXT, TEXT, max_size=2),
                                             st.dictionaries(TEXT, NASTY, max_size=2) | NASTY))
    for i in range(draw(st.integers(0, 4))):
        entry = {"dtype": draw(DTYPES), "shape": draw(mostly(st.lists(DIMS, max_size=3), NASTY))}
        try:
            size = math.prod(entry["shape"]) * {"F16": 2, "BF16": 2, "F32": 4}[entry["dtype"]]
            size = int(size) if 0 <= size < 4096 else None
        except (TypeError, KeyError, ValueError, OverflowError, MemoryError):
            size = None
        if size is not None and draw(st.integers(0, 4)):
            entry["data_offsets"] = [position, position + size]
            position += size
        else:
            entry["data_offsets"] = draw(st.lists(st.integers(-2, 4096) | NASTY, max_size=3)
                                         | NASTY)
        if draw(st.integers(0, 9)) == 0:
            del entry[draw(st.sampled_from(sorted(entry)))]
        header[draw(st.text(max_size=8) if draw(st.booleans()) else st.just(f"t{i}"))] = \
            entry if draw(st.integers(0, 9)) else draw(NASTY)
    raw = dumps(header)
    if draw(st.integers(0, 9)) == 0:  # a key twice: Python keeps the last; safetensors?
        raw = raw[:-1] + b', "t0": ' + dumps(draw(NASTY)) + b"}" if len(raw) > 2 else raw
    length = len(raw) + draw(st.sampled_from([0] * 8 + [-1, 1, 2**40, 2**64 - 1 - len(raw)]))
    data = bytes(position + draw(st.sampled_from([0] * 8 + [-1, 1, 4])) if position else
                 draw(st.integers(0, 8)))
    return struct.pack("<Q", length % 2**64) + raw + data


def test_b2_safetensors_headers(tmp_path, figures):
    """check_safetensors accepts or raises AdapterError; what it accepts, safetensors loads."""
    from safetensors import safe_open

    from loraplex.adapters.peft_format import AdapterError
    from loraplex.adapters.validate import Limits, check_safetensors

    path, limits = tmp_path / "adapter_model.safetensors", Limits()
    findings, accepted = Findings("B2 safetensors"), [0]

    @given(safetensors_files())
    @_settings(scale(1000, 50000))
    def run(data):
        findings.cases += 1
        path.write_bytes(data)
        what = f"header {excerpt(data[8:], 200)!r}"
        try:
            check_safetensors(path, limits)
        except AdapterError:
            return
        except Exception as e:  # noqa: BLE001 - what the test looks for
            findings.add(f"check {type(e).__name__} {str(e)[:30]}",
                         f"check_safetensors raised {type(e).__name__}: {e} on {what}")
            return
        accepted[0] += 1
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    f.get_tensor(key)
        except Exception as e:  # noqa: BLE001
            findings.add(f"load {str(e)[:60]}", f"check_safetensors accepted what safetensors "
                                                f"refuses ({excerpt(str(e), 120)}): {what}")
    run()
    figures.record("B2 safetensors", "headers accepted", accepted[0])
    findings.finish(figures)


# ---- B3: atheris over the adapter parser ------------------------------------------------

def test_b3_atheris_adapter_parser(tmp_path, figures):
    """fuzz_adapter.py in its own process (atheris owns it): no exception but AdapterError."""
    pytest.importorskip("atheris")
    runs = scale(2000, 200_000)
    args = [sys.executable, str(FUZZER), f"-runs={runs}", f"-artifact_prefix={tmp_path}/",
            "-print_final_stats=1", str(tmp_path / "corpus")]
    if not LONG:
        args.insert(3, "-seed=1")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    out = proc.stdout + proc.stderr
    done = re.search(r"Done (\d+) runs", out)
    execs = re.search(r"stat::number_of_executed_units:\s*(\d+)", out)
    crashes = sorted(tmp_path.glob("crash-*"))
    figures.record("B3", "execs", int(execs.group(1)) if execs else int(done.group(1))
                   if done else 0)
    figures.record("B3", "crashes", len(crashes))
    if proc.returncode or crashes:
        crash = re.search(r"=== Uncaught Python exception.*?(?=\n==\d+== ERROR)", out, re.S)
        pytest.fail(f"the fuzzer exited {proc.returncode}; reproduce with `{sys.executable} "
                    f"{FUZZER} {crashes[0] if crashes else ''}`:\n"
                    f"{crash.group(0) if crash else out[-4000:]}", pytrace=False)


# ---- B4: giant and malformed values of every field and header ---------------------------

def raw_http(url: str, request: bytes, half_close: bool = False,
             timeout: float = 30) -> tuple[int | None, bytes]:
    """Send bytes as they are; the status and body of the first answer (None: none came)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        data = b""
        try:
            s.sendall(request)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except (ConnectionResetError, BrokenPipeError):
            pass  # a server that answers early may close before it is all sent
        try:
            while b"\r\n\r\n" not in data or len(data) < _expected_length(data):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (TimeoutError, ConnectionResetError, BrokenPipeError):
            pass
    match = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return (int(match.group(1)) if match else None), data.partition(b"\r\n\r\n")[2]


def _expected_length(data: bytes) -> int:
    head, _, _ = data.partition(b"\r\n\r\n")
    match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    return len(head) + 4 + int(match.group(1)) if match else 1 << 62


def request_bytes(path: str, body: bytes, headers: dict[str, str] | list[tuple[str, str]]
                  | None = None, content_length: str | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close",
             f"Content-Length: {len(body) if content_length is None else content_length}"]
    items = headers.items() if isinstance(headers, dict) else headers or []
    lines += [f"{k}: {v}" for k, v in items]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def header_cases():
    """(label, raw request, expected): expected '2xx', '4xx', 'either' (2xx or 4xx), a
    status code, or 'none-or-4xx' for a request that ends early (the client half-closes)."""
    body = dumps(BASE[COMPLETIONS])
    admin = {"Authorization": f"Bearer {ADMIN}"}
    json_ct = {"Content-Type": "application/json", **admin}
    yield "64 KB Authorization", request_bytes(COMPLETIONS, body, {
        "Content-Type": "application/json", "Authorization": "Bearer " + "k" * 65536}), "4xx"
    for scheme in ("bearer", "BEARER"):
        yield f"'{scheme}' scheme", request_bytes(COMPLETIONS, body, {
            "Content-Type": "application/json", "Authorization": f"{scheme} {ADMIN}"}), "2xx"
    yield "1,000 headers", request_bytes(COMPLETIONS, body, [*json_ct.items(), *(
        (f"X-Fuzz-{i}", "v") for i in range(1000))]), "2xx"
    for ct, expect in (("", 415), ("text/plain", 415), ("application/x-www-form-urlencoded", 415),
                       ("multipart/form-data; boundary=x", 415), ("application/jsonx", 415),
                       ("application/json; charset=utf-8", "2xx"),
                       ("Application/JSON", "either")):
        yield (f"Content-Type {ct!r}", request_bytes(COMPLETIONS, body, {
            **({"Content-Type": ct} if ct else {}), **admin}), expect)
    yield "Content-Length shorter than the body", request_bytes(
        COMPLETIONS, body, json_ct, content_length="5"), "4xx"
    yield "Content-Length longer than the body", request_bytes(
        COMPLETIONS, body, json_ct, content_length=str(len(body) + 100)), "none-or-4xx"
    yield "Content-Length not a number", request_bytes(COMPLETIONS, body, json_ct,
                                                       content_length="abc"), "4xx"
    yield "Content-Length 10^30", request_bytes(COMPLETIONS, body, json_ct,
                                                content_length=str(10**30)), "4xx"
    big = b'{"prompt": "' + b"x" * (8 * 2**20) + b'"}'
    yield "a 8 MiB + 14 B body", request_bytes(COMPLETIONS, big, json_ct), 413
    chunked = (f"POST {COMPLETIONS} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
               f"Content-Type: application/json\r\nAuthorization: Bearer {ADMIN}\r\n"
               "Transfer-Encoding: chunked\r\n\r\n").encode()
    chunk = b"x" * 2**20
    yield "a chunked body past 8 MiB", chunked + b'c\r\n{"prompt": "\r\n' + (
        f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n") * 9 + b'2\r\n"}\r\n0\r\n\r\n', 413


def _verdict(status: int | None, expect) -> bool:
    if expect == "none-or-4xx":
        return status is None or 400 <= status < 500
    if status is None:
        return False
    if expect == "either":
        return status < 500
    if expect == "2xx":
        return 200 <= status < 300
    if expect == "4xx":
        return 400 <= status < 500
    return status == expect


def test_b4_giant_and_malformed(live, figures):
    """Each field with each hostile value (a 400 naming it, or the 2xx a valid value gets),
    then each malformed header; /health probed throughout."""
    findings = Findings("B4")
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with HealthProbe(live.url) as probe, httpx.Client(timeout=120) as client:
        for route, name, label, value, expect, extra in _field_cases():
            body = {**BASE[route], **extra, name: value}
            what = f"POST {route} {name}={label}"
            response = post(client, live.url + route, body, findings, what, admin)
            if response is None or response.status_code >= 500:
                continue
            status, answer = response.status_code, excerpt(response.content, 200)
            if expect == "2xx" and status >= 300:
                findings.add(what, f"{what} -> {status}, expected 2xx: {answer}")
            elif expect == "400" and status < 400:
                findings.add(what, f"{what} -> {status}: an invalid value accepted")
            elif expect == "400" and status == 400 and name != "model":
                param = response.json()["error"]["param"]
                if param != name and not (param is None and label in BODY_LEVEL):
                    findings.add(what, f"{what} -> 400 naming param {param!r}, not {name!r}: "
                                       f"{answer}")
        for label, request, expect in header_cases():
            status, answer = raw_http(live.url, request, half_close=expect == "none-or-4xx")
            findings.answered(status)
            problem = None if status is None else shape_problem(status, answer)
            if problem or not _verdict(status, expect):
                findings.add(label, f"{label} -> {status}, expected {expect}"
                                    f"{f' ({problem})' if problem else ''}: {excerpt(answer, 200)}")
    findings.finish(figures, probe)
