"""The service tried as a hostile client would, on a real `bentoml serve`: every cause of a 5xx, a
hang or a multi-MB answer the fuzzer found (issue 12) is a regression test here, and each answer has
the one error shape. No test depends on timing."""

from __future__ import annotations

import copy
import json
import random
import re
import socket
import urllib.request
from pathlib import Path

import pytest
from openapi_spec_validator import validate

from sofare.serving import bento
from tests.serving.conftest import candles_needed, window_payload

KNOWN_ENDPOINTS = {
    "/predict",
    "/predict_batch",
    "/predict_latest",
    "/explain",
    "/model_info",
    "/docs.json",
    "/",
    "/metrics",
    "/static_content",
    "/livez",
    "/readyz",
    "/healthz",
    "other",
}


def raw_request(url: str, request: bytes, read_limit: int = 1 << 20) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (no client-side fixing of headers) and parse the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before it read everything: that is the point
        data = b""
        while b"\r\n\r\n" not in data or len(data) < _expected(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            if len(data) > read_limit:
                break
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _expected(data: bytes) -> int:
    head, _, _ = data.partition(b"\r\n\r\n")
    match = re.search(rb"content-length:\s*(\d+)", head, re.IGNORECASE)
    return len(head) + 4 + int(match[1]) if match else 1 << 62


def post(
    url: str, path: str, body: bytes, content_type: str | None = "application/json", extra: str = ""
) -> tuple[int, dict[str, str], bytes]:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\nConnection: close\r\n{extra}"
    if content_type is not None:
        head += f"Content-Type: {content_type}\r\n"
    return raw_request(url, head.encode() + b"\r\n" + body)


def assert_error_shape(status: int, body: bytes, expected_status: int | None = None) -> dict:
    assert 400 <= status < 500, (status, body[:500])
    if expected_status is not None:
        assert status == expected_status, (status, body[:500])
    assert len(body) <= 8192, len(body)
    error = json.loads(body)["error"]
    assert set(error) == {"code", "message", "details", "truncated"}
    assert isinstance(error["message"], str) and error["message"]
    assert len(error["details"]) <= 20 and all(set(d) == {"field", "problem"} for d in error["details"])
    return error


@pytest.fixture(scope="module")
def url(served):
    return served["server"].url


@pytest.fixture(scope="module")
def good(served):
    return window_payload(served["cfg"], candles=candles_needed(served["cfg"]) + 27)


def test_media_types_other_than_json_are_415(url, good):
    body = json.dumps(good).encode()
    for content_type in (
        "multipart/form-data",
        "multipart/form-data; boundary=",
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/json; charset=latin-1",
        None,
    ):
        status, _, answer = post(url, "/predict", body, content_type)
        error = assert_error_shape(status, answer, 415)
        assert error["code"] == "unsupported_media_type" and error["details"][0]["field"] == "Content-Type"
    status, _, _ = post(url, "/predict", body, "application/json; charset=utf-8")
    assert status == 200


@pytest.mark.parametrize(
    ("where", "value", "field"),
    [
        ("candle", "0001-01-01T00:00:00+00:00", "candles[0].open_time"),
        ("candle", "9999-12-31T23:00:00+00:00", "candles[-1].open_time"),  # the last one
        ("candle", "1600-01-01T00:00:00+00:00", "candles[0].open_time"),
        ("macro", "1600-01-01T00:00:00+00:00", "macro[0].known_at"),
        ("macro_date", "0001-01-01", "macro[0].observation_date"),
        ("safe_haven", "1000-01-01T00:00:00+00:00", "safe_haven[0].known_at"),
    ],
)
def test_dates_out_of_range_are_422_naming_the_field(url, good, where, value, field):
    body = copy.deepcopy(good)
    field = field.replace("[-1]", f"[{len(body['candles']) - 1}]")
    if where == "candle":
        body["candles"][0 if field.startswith("candles[0]") else -1]["open_time"] = value
    else:
        body["macro"] = [
            {
                "series_id": "DGS10",
                "observation_date": "2024-01-02",
                "known_at": "2024-01-03T21:00:00+00:00",
                "value": 4.0,
            }
        ]
        body["safe_haven"] = [
            {
                "ticker": "GC=F",
                "date": "2024-01-02",
                "open": 1,
                "high": 1,
                "low": 1,
                "close": 1,
                "known_at": "2024-01-02T22:00:00+00:00",
            }
        ]
        if where == "macro":
            body["macro"][0]["known_at"] = value
        elif where == "macro_date":
            body["macro"][0]["observation_date"] = value
        else:
            body["safe_haven"][0]["known_at"] = value
    status, _, answer = post(url, "/predict", json.dumps(body).encode())
    error = assert_error_shape(status, answer, 422)
    assert field in [d["field"] for d in error["details"]], error


def test_an_oversized_body_is_413_before_it_is_read(url, served):
    """Announced size over the limit: answered at once (only the headers were sent), RSS unchanged."""
    pids = bento.process_tree(served["server"].process.pid)
    before = _rss(pids)
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n"
    status, headers, answer = raw_request(url, head + b'{"candles": [')
    error = assert_error_shape(status, answer, 413)
    assert error["code"] == "payload_too_large" and headers.get("connection") == "close"
    assert _rss(pids) - before < 50 * 2**20


def test_a_streamed_body_is_cut_off_at_the_limit(url, served):
    chunk = b"[" + b"1," * 32_000
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(100))  # ~6.4 MB, never terminated
    status, _, answer = raw_request(url, head + chunks)
    assert_error_shape(status, answer, 413)


def test_a_window_over_the_candle_cap_is_422(url, served, good):
    body = copy.deepcopy(good)
    body["candles"] = body["candles"] * 7  # 3,500 candles: over serving.max_window_candles, under 2 MB
    status, _, answer = post(url, "/predict", json.dumps(body).encode())
    error = assert_error_shape(status, answer, 422)
    assert error["code"] == "too_many_items" and error["details"][0]["field"] == "candles"


def test_many_problems_give_a_small_answer(url, good):
    body = copy.deepcopy(good)
    for candle in body["candles"]:
        candle["open_time"] = candle["open_time"].replace(":00:00+", ":17:00+")  # every candle off the grid
    status, _, answer = post(url, "/predict", json.dumps(body).encode())
    error = assert_error_shape(status, answer, 422)
    assert len(error["details"]) == 20 and error["truncated"] >= 280


def test_two_megabytes_of_garbage_give_a_small_answer(url):
    junk = bytes(random.Random(7).getrandbits(8) for _ in range(2 * 1024 * 1024 - 100))
    status, _, answer = post(url, "/predict", junk)
    assert_error_shape(status, answer, 400)
    invalid = json.dumps({"symbol": "BTCUSDT", "interval": "1h", "candles": [{"open_time": "x" * 1_000_000}]}).encode()
    status, _, answer = post(url, "/predict", invalid)
    assert_error_shape(status, answer)


def test_any_bytes_get_a_4xx(url, good):
    """Random bytes, truncations and byte flips of a real window, on every endpoint: never a 5xx."""
    rng = random.Random(12)
    real = json.dumps(good).encode()
    cases = [
        b"",
        b"null",
        b"[]",
        b"{}",
        b'"x"',
        b"1e999",
        b"\xff\xfe\x00",
        b'{"symbol": "\\ud800"}',
        b'{"symbol": "\x85"}',
        b"[" * 100_000,
        real[: len(real) // 2],
    ]
    for _ in range(40):
        mutated = bytearray(real)
        for _ in range(rng.randint(1, 20)):
            mutated[rng.randrange(len(mutated))] = rng.getrandbits(8)
        cases.append(bytes(mutated))
    cases += [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 3000))) for _ in range(20)]
    for path in ("/predict", "/predict_batch", "/predict_latest", "/model_info"):
        for body in cases:
            status, _, answer = post(url, path, body)
            assert status < 500, (path, body[:100], answer[:300])
            if status >= 400:
                assert_error_shape(status, answer)


def test_unknown_paths_and_methods(url):
    for path in (f"/nope-{i}" for i in range(30)):
        status, _, answer = raw_request(url, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert_error_shape(status, answer, 404)
    status, headers, answer = raw_request(url, b"DELETE /predict HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert_error_shape(status, answer, 405)
    assert headers["allow"] == "POST"
    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        metrics = response.read().decode()
    endpoints = set(re.findall(r'bentoml_service_request_total\{[^}]*endpoint="([^"]*)"', metrics))
    assert "other" in endpoints and endpoints <= KNOWN_ENDPOINTS, endpoints - KNOWN_ENDPOINTS


def test_client_errors_are_logged_at_info_in_one_line(url, served):
    """One line at INFO per refusal, no traceback, in a rotating file per worker (16 KB in this fixture)."""
    port = url.rsplit(":", 1)[1]
    for _ in range(8):  # reaches every worker (the kernel spreads connections over them)
        status, _, _ = post(
            url, "/predict", b'{"symbol": "BTCUSDT", "interval": "1h", "candles": [], "marker": "log-me"}'
        )
        assert status == 422
    logs = sorted((Path(served["cfg"].var_dir) / "logs").glob(f"service-stable-{port}*.log"))
    assert logs, "no service log"
    text = "".join(log.read_text() for log in logs)
    lines = [line for line in text.splitlines() if "marker" in line]
    assert lines and all(" INFO " in line for line in lines), text[-2000:]
    assert text.isascii() and all(line[:4].isdigit() for line in text.splitlines()), "one escaped line per record"
    assert "Traceback" not in text
    rotated = [p for log in logs for p in log.parent.glob(log.name + ".*")]
    assert rotated, "the refusals of the tests above fill more than one 16 KB file"
    assert {p.name.rsplit(".", 1)[1] for p in rotated} <= {"1", "2"}, rotated  # log_backups = 2
    assert all(p.stat().st_size <= 16384 for p in [*logs, *rotated])


def test_the_api_document_is_valid_and_its_examples_work(url):
    with urllib.request.urlopen(url + "/docs.json", timeout=30) as response:
        spec = json.loads(response.read())
    assert spec["openapi"] == "3.0.3"
    validate(spec)  # openapi-spec-validator, for the declared version
    example = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["example"]
    needed = json.loads(post(url, "/model_info", b"{}")[2])["candles_needed"]
    assert len(example["candles"]) == max(300, needed)  # bento.example_window: 300 candles, at least one window
    for path in ("/predict", "/predict_batch", "/predict_latest", "/explain"):  # Swagger's "Try it out" bodies
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["example"]
        status, _, answer = post(url, path, json.dumps(body).encode())
        assert status == 200, (path, answer[:500])
    assert json.loads(answer)["explanation"]["top"], "the /explain example explains"
    with urllib.request.urlopen(url + "/", timeout=30) as response:
        page = response.read().decode()
    resources = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert resources and not [r for r in resources if "//" in r], resources
    for resource in resources:
        with urllib.request.urlopen(url + "/" + resource.removeprefix("./"), timeout=30) as response:
            assert response.status == 200


def test_answers_say_whether_the_two_heads_agree(url, good, served):
    for end in ("2024-03-20T12:00:00+00:00", "2024-03-21T03:00:00+00:00", "2024-03-22T18:00:00+00:00"):
        status, _, answer = post(url, "/predict", json.dumps(window_payload(served["cfg"], end)).encode())
        assert status == 200
        a = json.loads(answer)
        assert a["heads_agree"] == ((a["direction"] == "up") == (a["expected_return"] > 0))
        assert a["direction"] == ("up" if a["prob_up"] > 0.5 else "down")


def _rss(pids: set[int]) -> int:
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        total += int(match[1]) * 1024 if match else 0
    return total
