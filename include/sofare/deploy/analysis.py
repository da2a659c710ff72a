"""Canary analysis: is the canary at least as healthy as stable over one analysis interval?

Modelled on Argo Rollouts' AnalysisTemplate and Flagger: each step of a rollout scrapes both serving processes'
Prometheus `/metrics` before and after an interval, takes the difference (what happened *in* the interval, not
since the process started) and judges the canary on two measurements, its 5xx rate and its p95 latency. Too little
traffic is never a pass: it is "inconclusive" and the step is measured again, up to a limit, then the rollout
aborts. Promoting a model nobody called would be promoting on no evidence.

What BentoML 1.4 exports (checked on a real `bentoml serve`): a counter `bentoml_service_request_total` and a
histogram `bentoml_service_request_duration_seconds`, both labelled `endpoint` (the raw request path, with its
leading slash), `http_response_code`, `runner_name`, `service_name`, `service_version`. The prefix is BentoML's
`api_server.metrics.namespace` (default `bentoml_service`). Health probes (/livez, /readyz) and unknown paths (404)
are counted too, which is why only the prediction endpoints are kept; /metrics itself is never counted. Each
counter is incremented before the response's last byte is sent, so a client that has its answer can scrape it.

Why scrape the processes and not the front door: nginx retries a failed canary request on stable, so the client
never sees the canary's 5xx; the canary's own counters still do.

Stdlib and prometheus_client only: analysis runs in Airflow tasks and the CLI, which must not pay for the ML stack.
"""

from __future__ import annotations

import http.client
import itertools
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from sofare.errors import InputError, PermanentError, TransientError

PREDICTION_ENDPOINTS = ("/predict", "/predict_batch", "/predict_latest")
NAMESPACE = "bentoml_service"

SUCCESS, FAILURE, INCONCLUSIVE = "success", "failure", "inconclusive"
VERDICTS = (SUCCESS, FAILURE, INCONCLUSIVE)
CONTINUE, ABORT, RETRY = "continue", "abort", "retry"
ERROR_RATE, P95_LATENCY_MS = "error_rate", "p95_latency_ms"
_INF = math.inf


class ScrapeError(TransientError):
    """A serving process could not be scraped (refused, timed out, cut off, 5xx): it may be starting or
    restarting, so the step is worth retrying."""


@dataclass(frozen=True)
class Sample:
    """Counts from one scrape (or, after `delta`, over one interval), summed over the prediction endpoints.

    `buckets` are cumulative histogram counts `(le, count)` in seconds, ascending, +inf last, over every response
    code (a slow 500 is still a slow answer). 4xx answers are the caller's fault, so they are reported, not judged.
    """

    requests: float = 0.0
    server_errors: float = 0.0
    client_errors: float = 0.0
    buckets: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        bounds = [le for le, _ in self.buckets]
        if any(b <= a for a, b in itertools.pairwise(bounds)):
            raise InputError(f"histogram bounds must be strictly ascending, got {bounds}")
        if bounds and bounds[-1] != _INF:
            raise InputError(f"the last histogram bound must be +inf, got {bounds[-1]}")


def _endpoint_key(endpoint: str) -> str:
    """BentoML labels the raw path ("/predict"); older exporters and hand-written configs drop the slash. Only the
    leading slash is ignored: "/predict/" is a different path (Starlette answers it with a redirect)."""
    return endpoint.lstrip("/")


def _status_class(code: str) -> int | None:
    try:
        return int(float(code)) // 100
    except (TypeError, ValueError):
        return None


def parse(text: str, endpoints: Iterable[str] = PREDICTION_ENDPOINTS, *, namespace: str = NAMESPACE) -> Sample:
    """The prediction traffic in one Prometheus exposition; a metric that is missing counts as zero (BentoML
    creates its metrics on the first request, so a fresh server exposes none)."""
    wanted = {_endpoint_key(e) for e in endpoints}
    total_name = f"{namespace}_request_total"
    bucket_name = f"{namespace}_request_duration_seconds_bucket"
    count_name = f"{namespace}_request_duration_seconds_count"
    requests = server_errors = client_errors = histogram_count = 0.0
    buckets: dict[float, float] = {}
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as exc:
        raise InputError(f"not Prometheus exposition text: {exc}") from exc
    for family in families:
        for sample in family.samples:  # matched by sample name, so a missing "# TYPE" line changes nothing
            if sample.name not in (total_name, bucket_name, count_name):
                continue
            if _endpoint_key(sample.labels.get("endpoint", "")) not in wanted or not math.isfinite(sample.value):
                continue
            if sample.name == total_name:
                requests += sample.value
                status = _status_class(sample.labels.get("http_response_code", ""))
                if status == 5:
                    server_errors += sample.value
                elif status == 4:
                    client_errors += sample.value
            elif sample.name == bucket_name:
                try:
                    le = float(sample.labels["le"])
                except (KeyError, ValueError):
                    continue
                buckets[le] = buckets.get(le, 0.0) + sample.value
            else:
                histogram_count += sample.value
    if buckets and _INF not in buckets:  # a truncated histogram: `_count` is what +inf would have said
        buckets[_INF] = max(histogram_count, max(buckets.values()))
    return Sample(requests, server_errors, client_errors, tuple(sorted(buckets.items())))


def scrape(
    url: str, timeout: float = 5.0, *, endpoints: Iterable[str] = PREDICTION_ENDPOINTS, namespace: str = NAMESPACE
) -> Sample:
    """GET `{url}/metrics` and parse it. Goes direct, like Prometheus: a serving process is on our network, and
    HTTP(S)_PROXY is for the internet. The opener is local to the call; nothing global is installed or changed."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InputError(f"a serving URL must be http(s)://host:port, got {url!r}")
    target = url.rstrip("/") + "/metrics"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(target, headers={"Accept": "text/plain; version=0.0.4"})
    try:
        with opener.open(request, timeout=timeout) as response:
            text = response.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        if 400 <= exc.code < 500:  # metrics disabled or not a BentoML server: retrying changes nothing
            raise PermanentError(f"{target} answered HTTP {exc.code}: is it a BentoML server with metrics on?") from exc
        raise ScrapeError(f"{target} answered HTTP {exc.code}") from exc
    except urllib.error.URLError as exc:
        raise ScrapeError(f"cannot reach {target}: {exc.reason}") from exc
    except (OSError, http.client.HTTPException) as exc:  # timeouts, resets, a cut-off body
        raise ScrapeError(f"scraping {target} failed: {exc!r}") from exc
    return parse(text, endpoints, namespace=namespace)


def delta(before: Sample, after: Sample) -> Sample:
    """What happened between two scrapes. A counter that went down, or histogram bounds that changed, means the
    process restarted in between (Prometheus' counter-reset rule): then `after` alone is the interval's count."""
    before_buckets = dict(before.buckets)
    reset = (
        after.requests < before.requests
        or after.server_errors < before.server_errors
        or after.client_errors < before.client_errors
        or (bool(before.buckets) and [le for le, _ in before.buckets] != [le for le, _ in after.buckets])
        or any(count < before_buckets.get(le, 0.0) for le, count in after.buckets)
    )
    if reset:
        return after
    return Sample(
        requests=after.requests - before.requests,
        server_errors=after.server_errors - before.server_errors,
        client_errors=after.client_errors - before.client_errors,
        buckets=tuple((le, count - before_buckets.get(le, 0.0)) for le, count in after.buckets),
    )


def quantile(sample: Sample, q: float) -> float | None:
    """The q-quantile of the request duration in milliseconds, computed as PromQL's histogram_quantile does
    (linear inside the bucket, from 0 for the first; the highest finite bound if it falls in +inf). None without
    requests: no latency is not a good latency."""
    if not 0.0 <= q <= 1.0:
        raise InputError(f"a quantile must be in [0, 1], got {q!r}")
    if not sample.buckets or sample.buckets[-1][1] <= 0:
        return None
    bounds: list[float] = []
    counts: list[float] = []
    running = 0.0
    for le, count in sample.buckets:  # a scrape can catch one bucket updated before another: keep it monotonic
        running = max(running, count)
        bounds.append(le)
        counts.append(running)
    if len(bounds) < 2:  # only +inf: nothing to interpolate in
        return None
    rank = q * counts[-1]
    index = next(i for i, count in enumerate(counts) if count >= rank)
    if index == len(bounds) - 1:
        return bounds[-2] * 1000.0
    lower = 0.0 if index == 0 else bounds[index - 1]
    below = 0.0 if index == 0 else counts[index - 1]
    in_bucket = counts[index] - below
    if in_bucket <= 0:
        return bounds[index] * 1000.0
    return (lower + (bounds[index] - lower) * (rank - below) / in_bucket) * 1000.0


@dataclass(frozen=True)
class Rules:
    """The thresholds of one analysis. `max_error_rate` is the canary's allowed share of 5xx answers (Flagger's
    request-success-rate >= 99% is 0.01); `max_latency_ratio` compares the canary's p95 with stable's, only
    when stable itself served `min_requests` in the interval (a p95 of five requests is noise) and only when
    the canary's p95 is above `latency_floor_ms` (2.1 against 3.2 ms is a histogram bucket, not a regression)."""

    min_requests: int
    max_error_rate: float
    max_p95_ms: float
    max_latency_ratio: float
    latency_floor_ms: float = 0.0  # a canary p95 at or under this passes the ratio: differences there are noise

    def __post_init__(self) -> None:
        if isinstance(self.min_requests, bool) or not isinstance(self.min_requests, int) or self.min_requests < 1:
            raise InputError(f"min_requests must be an integer >= 1, got {self.min_requests!r}")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise InputError(f"max_error_rate must be in [0, 1], got {self.max_error_rate!r}")
        if not (math.isfinite(self.max_p95_ms) and self.max_p95_ms > 0):
            raise InputError(f"max_p95_ms must be a positive number, got {self.max_p95_ms!r}")
        if not (math.isfinite(self.max_latency_ratio) and self.max_latency_ratio > 0):
            raise InputError(f"max_latency_ratio must be a positive number, got {self.max_latency_ratio!r}")
        if not (math.isfinite(self.latency_floor_ms) and self.latency_floor_ms >= 0):
            raise InputError(f"latency_floor_ms must be a number >= 0, got {self.latency_floor_ms!r}")


@dataclass(frozen=True)
class Measurement:
    """One judged metric of one step, as Argo records a measurement: the values, the outcome and why."""

    name: str
    outcome: str
    canary: float | None
    stable: float | None
    requests: int
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rate(sample: Sample) -> float | None:
    return sample.server_errors / sample.requests if sample.requests > 0 else None


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def judge(canary: Sample, stable: Sample, rules: Rules) -> list[Measurement]:
    """The error-rate and p95 measurements of one interval. Fewer than `min_requests` canary requests makes every
    measurement inconclusive, whatever the numbers: a clean record of three requests proves nothing."""
    requests = int(canary.requests)
    canary_rate, stable_rate = _rate(canary), _rate(stable)
    canary_p95, stable_p95 = quantile(canary, 0.95), quantile(stable, 0.95)
    if requests < rules.min_requests:
        why = f"only {requests} canary requests in the interval, fewer than the {rules.min_requests} required"
        return [
            Measurement(
                ERROR_RATE,
                INCONCLUSIVE,
                canary_rate,
                stable_rate,
                requests,
                f"{why} (5xx rate {_pct(canary_rate)}, stable {_pct(stable_rate)}).",
            ),
            Measurement(
                P95_LATENCY_MS,
                INCONCLUSIVE,
                canary_p95,
                stable_p95,
                requests,
                f"{why} (p95 {_ms(canary_p95)}, stable {_ms(stable_p95)}).",
            ),
        ]
    return [_judge_errors(canary, stable_rate, rules), _judge_latency(canary_p95, stable_p95, stable, requests, rules)]


def _judge_errors(canary: Sample, stable_rate: float | None, rules: Rules) -> Measurement:
    rate = canary.server_errors / canary.requests
    outcome = FAILURE if rate > rules.max_error_rate else SUCCESS
    relation = "above" if outcome == FAILURE else "within"
    detail = (
        f"canary 5xx rate {rate:.2%} ({int(canary.server_errors)} of {int(canary.requests)} requests, "
        f"{int(canary.client_errors)} 4xx not counted) is {relation} the limit {rules.max_error_rate:.2%}; "
        f"stable {_pct(stable_rate)}."
    )
    return Measurement(ERROR_RATE, outcome, rate, stable_rate, int(canary.requests), detail)


def _judge_latency(
    canary_p95: float | None, stable_p95: float | None, stable: Sample, requests: int, rules: Rules
) -> Measurement:
    if canary_p95 is None:  # requests counted but no histogram: the exporter is not the one we know
        return Measurement(
            P95_LATENCY_MS,
            INCONCLUSIVE,
            None,
            stable_p95,
            requests,
            f"{requests} canary requests but no duration histogram to take a p95 from.",
        )
    if canary_p95 > rules.max_p95_ms:
        return Measurement(
            P95_LATENCY_MS,
            FAILURE,
            canary_p95,
            stable_p95,
            requests,
            f"canary p95 {_ms(canary_p95)} is above the limit {_ms(rules.max_p95_ms)} (stable {_ms(stable_p95)}).",
        )
    if canary_p95 <= rules.latency_floor_ms:
        return Measurement(
            P95_LATENCY_MS,
            SUCCESS,
            canary_p95,
            stable_p95,
            requests,
            f"canary p95 {_ms(canary_p95)} is at or under the noise floor {_ms(rules.latency_floor_ms)} "
            f"(stable {_ms(stable_p95)}): no ratio is applied to millisecond differences.",
        )
    if stable_p95 is not None and stable.requests >= rules.min_requests:
        limit = stable_p95 * rules.max_latency_ratio
        relation = "above" if canary_p95 > limit else "within"
        return Measurement(
            P95_LATENCY_MS,
            FAILURE if canary_p95 > limit else SUCCESS,
            canary_p95,
            stable_p95,
            requests,
            f"canary p95 {_ms(canary_p95)} is {relation} stable p95 {_ms(stable_p95)} x "
            f"{rules.max_latency_ratio:g} = {_ms(limit)} (absolute limit {_ms(rules.max_p95_ms)}).",
        )
    return Measurement(
        P95_LATENCY_MS,
        SUCCESS,
        canary_p95,
        stable_p95,
        requests,
        f"canary p95 {_ms(canary_p95)} is within the limit {_ms(rules.max_p95_ms)}; stable served "
        f"{int(stable.requests)} requests, fewer than {rules.min_requests}, so no ratio is applied.",
    )


def verdict(measurements: list[Measurement]) -> str:
    """One step's verdict: any failure fails it; otherwise any inconclusive leaves it inconclusive (so does an
    empty list: nothing measured is no evidence)."""
    outcomes = {m.outcome for m in measurements}
    if FAILURE in outcomes:
        return FAILURE
    if INCONCLUSIVE in outcomes or not outcomes:
        return INCONCLUSIVE
    return SUCCESS


def step_decision(history: list[str], failure_limit: int, inconclusive_limit: int) -> str:
    """What to do after the latest step verdict (history is every verdict of this rollout so far, latest last).

    failure: counts toward `failure_limit` over the whole rollout, Argo's failureLimit: abort once failures exceed
    it (0 aborts on the first); within it, measure again at the same weight ("retry"): never shift more traffic
    on a failed step. inconclusive: "retry" until `inconclusive_limit` consecutive inconclusive verdicts, then
    "abort": a canary is never promoted without evidence. success: "continue" to the next weight.
    """
    if isinstance(failure_limit, bool) or not isinstance(failure_limit, int) or failure_limit < 0:
        raise InputError(f"failure_limit must be an integer >= 0, got {failure_limit!r}")
    if isinstance(inconclusive_limit, bool) or not isinstance(inconclusive_limit, int) or inconclusive_limit < 1:
        raise InputError(f"inconclusive_limit must be an integer >= 1, got {inconclusive_limit!r}")
    if not history:
        raise InputError("step_decision needs at least one step verdict")
    unknown = sorted(set(history) - set(VERDICTS))
    if unknown:
        raise InputError(f"unknown step verdicts {unknown}; expected one of {VERDICTS}")
    if history.count(FAILURE) > failure_limit:
        return ABORT
    latest = history[-1]
    if latest == SUCCESS:
        return CONTINUE
    if latest == FAILURE:
        return RETRY
    consecutive = 0
    for item in reversed(history):
        if item != INCONCLUSIVE:
            break
        consecutive += 1
    return ABORT if consecutive >= inconclusive_limit else RETRY
