"""Canary analysis: parsing BentoML's metrics, interval deltas, PromQL-style quantiles, the judging rules and the
step decisions; and one test against a real `bentoml serve` process.

Nothing asserts on durations: the real server is waited for with a bounded poll and its latencies are only
checked to be positive.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sofare.deploy import analysis
from sofare.deploy.analysis import (
    PREDICTION_ENDPOINTS,
    Measurement,
    Rules,
    Sample,
    ScrapeError,
    delta,
    judge,
    parse,
    quantile,
    scrape,
    step_decision,
    verdict,
)
from sofare.errors import InputError, PermanentError, TransientError

INF = math.inf
LABELS = 'runner_name="Echo",service_name="Echo",service_version="not available"'
BOUNDS = ("0.005", "0.01", "0.025", "0.05", "0.1", "+Inf")


def _series(
    endpoint: str, code: int, count: int, le_counts: dict[str, int] | None = None, *, prefix: str = "bentoml_service"
) -> list[str]:
    """The lines BentoML writes for one (endpoint, code) series: its counter, its buckets and its _count."""
    le_counts = le_counts or {le: count for le in BOUNDS}
    base = f'endpoint="{endpoint}",http_response_code="{code}",{LABELS}'
    lines = [f"{prefix}_request_total{{{base}}} {float(count)}"]
    lines += [f'{prefix}_request_duration_seconds_bucket{{{base},le="{le}"}} {float(n)}' for le, n in le_counts.items()]
    lines.append(f"{prefix}_request_duration_seconds_count{{{base}}} {float(count)}")
    return lines


def _exposition(*series: list[str], prefix: str = "bentoml_service") -> str:
    """A /metrics page shaped like BentoML 1.4's (HELP/TYPE lines, the gauges it also exports)."""
    counters = [line for s in series for line in s if "_request_total" in line]
    histogram = [line for s in series for line in s if "_request_total" not in line]
    return "\n".join(
        [
            f"# HELP {prefix}_request_total Total number of runner RPC",
            f"# TYPE {prefix}_request_total counter",
            *counters,
            f"# HELP {prefix}_request_in_progress Total number of runner RPC in progress now",
            f"# TYPE {prefix}_request_in_progress gauge",
            f'{prefix}_request_in_progress{{endpoint="/predict",{LABELS}}} 3.0',
            f"# HELP {prefix}_request_duration_seconds runner RPC duration in seconds",
            f"# TYPE {prefix}_request_duration_seconds histogram",
            *histogram,
            "",
        ]
    )


def _sample(
    requests: float,
    server_errors: float = 0.0,
    client_errors: float = 0.0,
    buckets: tuple[tuple[float, float], ...] | None = None,
) -> Sample:
    """A sample whose requests all fall in one 10-50 ms bucket unless buckets are given."""
    if buckets is None:
        buckets = ((0.01, 0.0), (0.05, requests), (INF, requests))
    return Sample(requests, server_errors, client_errors, buckets)


RULES = Rules(min_requests=20, max_error_rate=0.01, max_p95_ms=500.0, max_latency_ratio=1.5)


# --- parse -------------------------------------------------------------------------------------------------------


def test_parse_counts_only_prediction_endpoints_and_splits_5xx_from_4xx() -> None:
    text = _exposition(
        _series("/predict", 200, 30, {"0.005": 10, "0.01": 20, "0.025": 30, "0.05": 30, "0.1": 30, "+Inf": 30}),
        _series("/predict", 500, 5),
        _series("/predict", 400, 2),
        _series("/predict_batch", 200, 4),
        _series("/predict_latest", 503, 1),
        _series("/readyz", 200, 100),
        _series("/livez", 200, 100),
        _series("/nope", 404, 7),
        _series("/docs.json", 200, 3),
        _series("/model_info", 200, 9),
        _series("/predict/", 307, 6),  # a different path (a redirect), not the endpoint
    )
    sample = parse(text)
    assert sample.requests == 30 + 5 + 2 + 4 + 1
    assert sample.server_errors == 5 + 1
    assert sample.client_errors == 2
    assert sample.buckets == (
        (0.005, 10 + 5 + 2 + 4 + 1),
        (0.01, 20 + 12),
        (0.025, 42),
        (0.05, 42),
        (0.1, 42),
        (INF, 42),
    )


def test_parse_missing_metrics_is_zeros() -> None:
    assert parse("") == Sample(0.0, 0.0, 0.0, ())
    only_probes = _exposition(_series("/readyz", 200, 5), _series("/livez", 200, 5))
    assert parse(only_probes) == Sample()
    assert (
        parse(
            "# HELP process_cpu_seconds_total CPU\n# TYPE process_cpu_seconds_total counter\n"
            "process_cpu_seconds_total 12.5\n"
        )
        == Sample()
    )


def test_parse_ignores_label_order_type_lines_and_the_leading_slash() -> None:
    text = textwrap.dedent("""\
        bentoml_service_request_total{service_version="1",http_response_code="200",endpoint="predict"} 4
        bentoml_service_request_total{http_response_code="500",service_name="s",endpoint="/predict_batch"} 1
        bentoml_service_request_duration_seconds_bucket{le="0.1",endpoint="predict",http_response_code="200"} 4
        bentoml_service_request_duration_seconds_bucket{le="+Inf",endpoint="predict",http_response_code="200"} 4
        """)
    sample = parse(text)
    assert (sample.requests, sample.server_errors, sample.buckets) == (5.0, 1.0, ((0.1, 4.0), (INF, 4.0)))
    assert parse(text, endpoints=("predict_batch",)).requests == 1.0  # the slash is optional on our side too


def test_parse_endpoints_and_namespace_are_parameters() -> None:
    text = _exposition(
        _series("/predict", 200, 3, prefix="sofare"), _series("/model_info", 200, 2, prefix="sofare"), prefix="sofare"
    )
    assert parse(text).requests == 0  # a different namespace is not ours by default
    assert parse(text, namespace="sofare").requests == 3
    assert parse(text, ("/model_info",), namespace="sofare").requests == 2


def test_parse_completes_a_histogram_without_its_inf_bucket_from_count() -> None:
    text = textwrap.dedent("""\
        bentoml_service_request_duration_seconds_bucket{endpoint="/predict",le="0.1"} 3
        bentoml_service_request_duration_seconds_count{endpoint="/predict"} 5
        """)
    assert parse(text).buckets == ((0.1, 3.0), (INF, 5.0))


def test_parse_rejects_text_that_is_not_an_exposition() -> None:
    with pytest.raises(InputError):
        parse('bentoml_service_request_total{endpoint="/predict" 1\n')


def test_sample_validates_its_buckets() -> None:
    with pytest.raises(InputError, match="ascending"):
        Sample(1, 0, 0, ((0.1, 1.0), (0.05, 1.0), (INF, 1.0)))
    with pytest.raises(InputError, match="inf"):
        Sample(1, 0, 0, ((0.1, 1.0),))


# --- delta -------------------------------------------------------------------------------------------------------


def test_delta_is_the_interval() -> None:
    before = Sample(10, 1, 2, ((0.1, 8.0), (INF, 10.0)))
    after = Sample(25, 3, 2, ((0.1, 20.0), (INF, 25.0)))
    assert delta(before, after) == Sample(15, 2, 0, ((0.1, 12.0), (INF, 15.0)))


def test_delta_after_a_counter_reset_is_after_alone() -> None:
    before = Sample(100, 4, 1, ((0.1, 90.0), (INF, 100.0)))
    restarted = Sample(7, 0, 0, ((0.1, 7.0), (INF, 7.0)))
    assert delta(before, restarted) == restarted
    fewer_errors = Sample(120, 2, 1, ((0.1, 110.0), (INF, 120.0)))  # more requests, yet errors went down
    assert delta(before, fewer_errors) == fewer_errors
    assert delta(before, Sample()) == Sample()  # restarted and not called yet


def test_delta_from_a_fresh_server_and_with_changed_bounds() -> None:
    after = Sample(5, 1, 0, ((0.1, 5.0), (INF, 5.0)))
    assert delta(Sample(), after) == after  # metrics appear on the first request
    before = Sample(3, 0, 0, ((0.05, 3.0), (INF, 3.0)))
    assert delta(before, after) == after  # other bucket bounds: another process (configuration changed)


# --- quantile ----------------------------------------------------------------------------------------------------

HAND = Sample(100, 0, 0, ((0.01, 10.0), (0.05, 50.0), (0.1, 90.0), (0.5, 100.0), (INF, 100.0)))


@pytest.mark.parametrize(
    ("q", "expected_ms"),
    [
        (0.05, 5.0),  # rank 5 in the first bucket [0, 10 ms]: 10 * 5/10
        (0.5, 50.0),  # rank 50 is the top of the second bucket (10, 50 ms]: 10 + 40 * 40/40
        (0.7, 75.0),  # rank 70 in (50, 100 ms] holding 40: 50 + 50 * 20/40
        (0.95, 300.0),  # rank 95 in (100, 500 ms] holding 10: 100 + 400 * 5/10
        (1.0, 500.0),
    ],
)
def test_quantile_interpolates_like_histogram_quantile(q: float, expected_ms: float) -> None:
    assert quantile(HAND, q) == pytest.approx(expected_ms)


def test_quantile_in_the_inf_bucket_is_the_highest_finite_bound() -> None:
    slow = Sample(100, 0, 0, ((0.1, 10.0), (0.5, 10.0), (INF, 100.0)))
    assert quantile(slow, 0.95) == pytest.approx(500.0)
    assert quantile(slow, 0.05) == pytest.approx(50.0)


def test_quantile_without_requests_is_none() -> None:
    assert quantile(Sample(), 0.95) is None
    assert quantile(Sample(0, 0, 0, ((0.1, 0.0), (INF, 0.0))), 0.95) is None
    with pytest.raises(InputError):
        quantile(HAND, 95)


def test_quantile_tolerates_a_torn_scrape() -> None:
    torn = Sample(10, 0, 0, ((0.1, 10.0), (0.5, 9.0), (INF, 10.0)))  # one bucket read before its increment
    assert quantile(torn, 0.95) == pytest.approx(95.0)


# --- judge and verdict -------------------------------------------------------------------------------------------


def _by_name(measurements: list[Measurement]) -> dict[str, Measurement]:
    return {m.name: m for m in measurements}


def test_a_healthy_canary_succeeds() -> None:
    got = _by_name(judge(_sample(200), _sample(800), RULES))
    assert [got["error_rate"].outcome, got["p95_latency_ms"].outcome] == ["success", "success"]
    assert got["error_rate"].canary == 0.0 and got["error_rate"].requests == 200
    assert got["p95_latency_ms"].canary == pytest.approx(48.0)  # 10 + 40 * 0.95
    assert verdict(list(got.values())) == "success"
    assert "1.00%" in got["error_rate"].detail and "0 of 200" in got["error_rate"].detail


def test_too_few_canary_requests_is_inconclusive_never_success() -> None:
    got = judge(_sample(19), _sample(800), RULES)  # perfect numbers, too little evidence
    assert [m.outcome for m in got] == ["inconclusive", "inconclusive"]
    assert all("19" in m.detail and "20" in m.detail for m in got)
    assert verdict(got) == "inconclusive"
    nothing = judge(Sample(), Sample(), RULES)
    assert [(m.outcome, m.canary, m.requests) for m in nothing] == [("inconclusive", None, 0)] * 2


def test_error_rate_above_the_limit_fails_and_4xx_do_not_count() -> None:
    failing = _by_name(judge(_sample(200, server_errors=3), _sample(800, server_errors=1), RULES))["error_rate"]
    assert failing.outcome == "failure"
    assert failing.canary == pytest.approx(0.015) and failing.stable == pytest.approx(1 / 800)
    assert "above" in failing.detail and "1.50%" in failing.detail
    at_limit = _by_name(judge(_sample(200, server_errors=2), _sample(800), RULES))["error_rate"]
    assert at_limit.outcome == "success"  # 1.00% is not above 1%: Flagger's >= 99% success
    bad_callers = _by_name(judge(_sample(200, client_errors=150), _sample(800), RULES))["error_rate"]
    assert bad_callers.outcome == "success" and "150 4xx" in bad_callers.detail


def test_p95_above_the_absolute_limit_fails() -> None:
    slow = _sample(100, buckets=((0.5, 50.0), (1.0, 100.0), (INF, 100.0)))
    got = _by_name(judge(slow, slow, RULES))["p95_latency_ms"]
    assert got.outcome == "failure" and got.canary == pytest.approx(950.0) and "500.0 ms" in got.detail


def test_p95_ratio_against_stable() -> None:
    fast = _sample(100, buckets=((0.01, 100.0), (0.05, 100.0), (INF, 100.0)))  # p95 9.5 ms
    got = _by_name(judge(_sample(100), fast, RULES))["p95_latency_ms"]  # canary p95 48 ms > 9.5 x 1.5
    assert got.outcome == "failure" and got.stable == pytest.approx(9.5)
    assert "9.5 ms x 1.5 = 14." in got.detail  # the threshold, 14.25 ms
    assert _by_name(judge(fast, _sample(100), RULES))["p95_latency_ms"].outcome == "success"


def test_p95_ratio_needs_enough_stable_requests() -> None:
    fast_but_few = _sample(19, buckets=((0.01, 19.0), (0.05, 19.0), (INF, 19.0)))
    got = _by_name(judge(_sample(100), fast_but_few, RULES))["p95_latency_ms"]
    assert got.outcome == "success" and "no ratio" in got.detail
    assert _by_name(judge(_sample(100), Sample(), RULES))["p95_latency_ms"].outcome == "success"


def test_requests_without_a_histogram_is_inconclusive() -> None:
    got = _by_name(judge(Sample(100, 0, 0, ()), _sample(100), RULES))
    assert got["error_rate"].outcome == "success" and got["p95_latency_ms"].outcome == "inconclusive"


def test_verdict() -> None:
    def m(outcome: str) -> Measurement:
        return Measurement("error_rate", outcome, 0.0, 0.0, 100, "")

    assert verdict([m("success"), m("success")]) == "success"
    assert verdict([m("success"), m("inconclusive")]) == "inconclusive"
    assert verdict([m("inconclusive"), m("failure")]) == "failure"
    assert verdict([]) == "inconclusive"


def test_measurements_serialise() -> None:
    measurements = judge(_sample(100), _sample(100), RULES)
    data = json.loads(json.dumps([m.to_dict() for m in measurements]))
    assert verdict(measurements) == "success"
    assert [d["name"] for d in data] == ["error_rate", "p95_latency_ms"]
    assert set(measurements[0].to_dict()) == {"name", "outcome", "canary", "stable", "requests", "detail"}


def test_rules_are_validated() -> None:
    for bad in (
        {"min_requests": 0},
        {"max_error_rate": 1.5},
        {"max_p95_ms": 0.0},
        {"max_latency_ratio": -1.0},
        {"max_p95_ms": math.nan},
    ):
        with pytest.raises(InputError):
            Rules(**{"min_requests": 20, "max_error_rate": 0.01, "max_p95_ms": 500.0, "max_latency_ratio": 1.5, **bad})


# --- step_decision -----------------------------------------------------------------------------------------------


def test_success_continues() -> None:
    assert step_decision(["success"], failure_limit=0, inconclusive_limit=3) == "continue"
    assert step_decision(["inconclusive", "inconclusive", "success"], 0, 3) == "continue"


def test_failure_limit_is_argos() -> None:
    assert step_decision(["failure"], failure_limit=0, inconclusive_limit=3) == "abort"
    assert step_decision(["failure"], failure_limit=1, inconclusive_limit=3) == "retry"  # same weight again
    assert step_decision(["failure", "success"], 1, 3) == "continue"
    assert step_decision(["failure", "success", "failure"], 1, 3) == "abort"  # counted over the whole rollout
    assert step_decision(["success", "failure", "success", "failure"], 2, 3) == "retry"


def test_inconclusive_limit_counts_consecutive_verdicts() -> None:
    assert step_decision(["inconclusive"], 0, inconclusive_limit=3) == "retry"
    assert step_decision(["inconclusive"] * 2, 0, 3) == "retry"
    assert step_decision(["inconclusive"] * 3, 0, 3) == "abort"  # never promote without evidence
    assert step_decision(["inconclusive"], 0, inconclusive_limit=1) == "abort"
    assert step_decision(["inconclusive", "inconclusive", "success", "inconclusive"], 0, 3) == "retry"
    assert step_decision(["inconclusive", "failure", "inconclusive", "inconclusive"], 1, 3) == "retry"


def test_step_decision_rejects_bad_arguments() -> None:
    for history, failure_limit, inconclusive_limit in (
        ([], 0, 3),
        (["passed"], 0, 3),
        (["success"], -1, 3),
        (["success"], 0, 0),
    ):
        with pytest.raises(InputError):
            step_decision(history, failure_limit, inconclusive_limit)


# --- scrape ------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_scrape_of_nothing_listening_is_a_transient_error() -> None:
    with pytest.raises(ScrapeError) as caught:
        scrape(f"http://127.0.0.1:{_free_port()}", timeout=5.0)
    assert isinstance(caught.value, TransientError)


def test_scrape_rejects_other_schemes() -> None:
    with pytest.raises(InputError):
        scrape("file:///etc/passwd")


@pytest.fixture
def plain_server() -> Iterator[tuple[str, dict[str, object]]]:
    """A small HTTP server whose /metrics answer (status, body) the test sets."""
    state: dict[str, object] = {"status": 200, "body": _exposition(_series("/predict", 200, 4)), "paths": []}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state["paths"].append(self.path)  # type: ignore[union-attr]
            data = str(state["body"]).encode()
            self.send_response(int(state["status"]))  # type: ignore[call-overload]
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)


def test_scrape_reads_metrics_and_maps_http_errors(
    plain_server: tuple[str, dict[str, object]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, state = plain_server
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # a scrape goes direct, whatever the environment says
    monkeypatch.setenv("no_proxy", "")
    assert scrape(url + "/").requests == 4
    assert state["paths"] == ["/metrics"]
    state["status"] = 503
    with pytest.raises(ScrapeError, match="503"):
        scrape(url)
    state["status"] = 404
    with pytest.raises(PermanentError, match="404") as caught:
        scrape(url)
    assert not isinstance(caught.value, TransientError)


# --- a real BentoML server ---------------------------------------------------------------------------------------

ECHO_SERVICE = """
import bentoml


@bentoml.service
class Echo:
    @bentoml.api(route="/predict")
    def predict(self, x: int) -> int:
        if x < 0:
            raise ValueError("negative input")  # unhandled: BentoML answers 500
        return x
"""


def _request(port: int, method: str, path: str, body: dict[str, object] | None = None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=payload, headers={"Content-Type": "application/json"} if payload else {})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


@pytest.fixture
def bentoml_server(tmp_path: Path) -> Iterator[str]:
    """`bentoml serve` of a tiny service, in its own process group so teardown can stop all of its processes."""
    (tmp_path / "service.py").write_text(textwrap.dedent(ECHO_SERVICE))
    port = _free_port()
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", "service:Echo", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"bentoml serve exited with {proc.returncode}:\n{(tmp_path / 'serve.log').read_text()}")
            try:
                if _request(port, "GET", "/readyz") == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"bentoml serve not ready after 120 s:\n{(tmp_path / 'serve.log').read_text()[-3000:]}")
            time.sleep(0.25)
        yield f"http://127.0.0.1:{port}"
    finally:
        for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 30)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


@pytest.mark.slow
def test_against_a_real_bentoml_server(bentoml_server: str) -> None:
    port = int(bentoml_server.rsplit(":", 1)[1])
    before = scrape(bentoml_server)
    statuses = [_request(port, "POST", "/predict", {"x": i}) for i in range(30)]
    statuses += [_request(port, "POST", "/predict", {"x": -1}) for _ in range(5)]
    statuses.append(_request(port, "POST", "/predict", {"y": 1}))  # invalid input: the caller's fault
    statuses += [_request(port, "GET", path) for path in ("/livez", "/readyz", "/metrics", "/no_such_path")]
    assert statuses == [200] * 30 + [500] * 5 + [400] + [200, 200, 200, 404]
    after = scrape(bentoml_server)
    interval = delta(before, after)
    assert (interval.requests, interval.server_errors, interval.client_errors) == (36, 5, 1)
    assert interval.buckets[-1] == (INF, 36)
    p95 = quantile(interval, 0.95)
    assert p95 is not None and p95 > 0
    rules = Rules(min_requests=30, max_error_rate=0.01, max_p95_ms=1e9, max_latency_ratio=1e9)
    got = _by_name(judge(interval, Sample(), rules))
    assert got["error_rate"].outcome == "failure" and got["p95_latency_ms"].outcome == "success"
    assert got["error_rate"].canary == pytest.approx(5 / 36)
    assert PREDICTION_ENDPOINTS[0] == "/predict" and analysis.NAMESPACE == "bentoml_service"


def test_p95_ratio_is_not_applied_under_the_noise_floor() -> None:
    """2.1 against 3.2 ms is one histogram bucket, not a regression (a flake found in a fresh-clone run)."""
    floor = Rules(min_requests=20, max_error_rate=0.01, max_p95_ms=500.0, max_latency_ratio=1.5, latency_floor_ms=60.0)
    fast = _sample(100, buckets=((0.01, 100.0), (0.05, 100.0), (INF, 100.0)))  # p95 9.5 ms
    got = _by_name(judge(_sample(100), fast, floor))["p95_latency_ms"]  # canary p95 48 ms, stable 9.5 ms
    assert got.outcome == "success" and "noise floor" in got.detail
    assert _by_name(judge(_sample(100), fast, RULES))["p95_latency_ms"].outcome == "failure"  # no floor: the ratio
    with pytest.raises(InputError):
        Rules(min_requests=1, max_error_rate=0.0, max_p95_ms=1.0, max_latency_ratio=1.0, latency_floor_ms=-1.0)
