"""Replay: walk stored history hour by hour as if it were live, through the production functions.

Each hour: ingest the candle that just closed (and, at a day's first hour, that day's safe-haven bars and
macro observations) with the ingest task function -> predict it through the front door (stable, and the
canary when one is deployed) -> `monitor.run` for the hour (outcomes, live quality, drift, severity, action)
-> act: a rollback runs `Deployment.rollback` (what sofare_rollback runs); a retrain request is recorded as the
asset event sofare_monitor would emit (training itself is not run: it takes minutes to hours).

Scenarios (`inject`), to prove the loop ends in the right action:
- drift: from a third of the way in, the windows sent have 4x the volatility (log returns scaled around the
  first close) and 10x the volume: the served inputs drift away from the reference -> retrain requested.
- bad-canary: a sabotaged copy of the stable version (its classification head's "up" bias raised by 8, as a
  broken export would: prob_up near 1 for every window) is registered, built and deployed as a canary at weight
  0.5 -> its Brier score is provably worse than a coin's -> rollback to the stable.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from sofare.config import interval_delta
from sofare.contracts import MonitorRun
from sofare.data import ingest
from sofare.data import warehouse as wh
from sofare.errors import InputError
from sofare.monitoring import monitor, policy, quality

if TYPE_CHECKING:
    from sofare.config import Config

log = logging.getLogger(__name__)
INJECTIONS = ("drift", "bad-canary")
SABOTAGE_LOGIT = 8.0  # the bad canary's "up" logit is raised by this: prob_up ~ 0.9997 whatever the window


@dataclass
class Summary:
    start: str
    end: str
    hours: int = 0
    predictions: Counter[str] = field(default_factory=Counter)  # by "version/variant"
    refused: int = 0
    runs: list[MonitorRun] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    quality: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # seconds per step, summed over the hours
    timings: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))

    def to_dict(self) -> dict[str, Any]:
        drift = [
            {"at": r.at, "share": r.drift.share, "severity": f.severity}
            for r in self.runs
            for f in r.decision.findings
            if f.rule == "drift" and f.severity != "low"
        ]
        return {
            "start": self.start,
            "end": self.end,
            "hours": self.hours,
            "predictions": dict(self.predictions),
            "refused": self.refused,
            "monitor_runs": len(self.runs),
            "drift_events": drift,
            "actions": self.actions,
            "quality": self.quality,
            "seconds": round(self.seconds, 1),
            "timings": {k: round(v, 2) for k, v in self.timings.items()},
            "notes": self.notes,
        }


def _post(url: str, body: bytes, variant: str) -> dict[str, Any]:
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "X-Variant": variant, "X-Client-Id": "sofare-replay"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # local: never through a proxy
    with opener.open(request, timeout=30) as response:
        return json.loads(response.read())


def drifted(body: dict[str, Any]) -> dict[str, Any]:
    """The drift scenario's window: 4x the volatility around the first close, 10x the volume."""
    candles = body["candles"]
    close = np.array([c["close"] for c in candles])
    anchor = close[0]
    scale = lambda x: anchor * np.exp(4.0 * np.log(np.asarray(x) / anchor))
    out = []
    for c in candles:
        o, h, lo, cl = (float(v) for v in scale([c["open"], c["high"], c["low"], c["close"]]))
        out.append(
            {**c, "open": o, "high": max(h, o, cl), "low": min(lo, o, cl), "close": cl, "volume": c["volume"] * 10.0}
        )
    return {**body, "candles": out}


def sabotaged_canary(cfg: Config, actor: str) -> str:
    """Register a copy of the stable version with a broken classification head (SABOTAGE_LOGIT), build its bento and
    deploy it as the canary at weight 0.5. Tagged `injected` on the version: it is a drill, never a candidate."""
    import tempfile
    from pathlib import Path

    import mlflow
    import torch

    from sofare.contracts import ModelMeta
    from sofare.deploy import rollout
    from sofare.registry import audit, versions
    from sofare.serving import bento
    from sofare.training import export

    deployment = rollout.Deployment(cfg, actor)
    stable = deployment.state().stable
    if stable is None:
        raise InputError("nothing is deployed: `sofare deploy` a version first (make demo does)")
    base = versions.resolve(cfg, stable.version)
    with tempfile.TemporaryDirectory(prefix="sofare-sabotage-") as scratch:
        source = versions.download(cfg, stable.version)
        network = export.TorchModel(source)
        with torch.no_grad():
            # "up" wins every window: prob_up near 1 after the version's calibration too (it scales the margin)
            network.model.cls_head.bias[1] += SABOTAGE_LOGIT / network.meta.calibration.scale
        directory = export.export(network.model, network.meta, Path(scratch) / "model", export.read_reference(source))
        meta = ModelMeta.read(directory)
        example = np.zeros((1, meta.lookback, len(meta.columns)), dtype=np.float32)
        with versions.scoped(cfg), mlflow.start_run(run_id=base.tags.get("training_run_id") or base.run_id):
            info = versions._log_model(cfg, directory, example, meta.feature_set_version)
        version = str(info.registered_model_version)
        model_tag = bento.import_model(
            cfg,
            directory,
            {"model_version": version, "semver": "sabotaged", "feature_set_version": meta.feature_set_version},
        )
    built = bento.build(cfg, model_tag)
    note = (
        f"bad-canary drill (sofare replay): version {stable.version} with its classification head's 'up' bias "
        f"raised by {SABOTAGE_LOGIT:g} (prob_up near 1 for every window)"
    )
    versions.set_tags(
        cfg,
        version,
        {
            **{k: v for k, v in base.tags.items() if k not in ("bento_tag", "container")},
            "semver": f"{base.tags.get('semver', '0.0.0')}+sabotaged",
            "injected": note,
            "promotion_verdict": "rejected",
            "bento_tag": built["bento"],
            "bento_model": model_tag,
        },
    )
    audit.record(cfg, actor, "inject", version, "sabotaged", {"base_version": stable.version, "note": note})
    deployment.start_canary(version, 0.5)
    return version


def _ingest(cfg: Config, hour: datetime) -> None:
    """What sofare_ingest's load tasks run (`ingest.load_interval`, source: the embedded data), for one hour."""
    engine = monitor.engine_of(cfg)
    delta = interval_delta(cfg.market.interval)
    ingest.load_interval(cfg, engine, "sample", "candles", hour - delta, hour)
    if hour.hour == 0:
        for modality in ("safe_haven", "macro"):
            ingest.load_interval(cfg, engine, "sample", modality, hour, hour + timedelta(days=1))


def _wait_for_log(cfg: Config, expected: int, since: datetime, timeout: float = 15.0) -> int:
    """The prediction log writes asynchronously: wait until the replay's predictions are in the table."""
    p = wh.predictions
    deadline = time.monotonic() + timeout
    while True:
        with wh.get_engine(cfg).connect() as conn:
            n = conn.execute(sa.select(sa.func.count()).where(p.c.created_at >= since)).scalar_one()
        if n >= expected or time.monotonic() > deadline:
            return int(n)
        time.sleep(0.2)


def replay(
    cfg: Config,
    start: str,
    end: str,
    speed: float | None = None,
    inject: str | None = None,
    actor: str | None = None,
    html_every: int = 24,
    progress: Callable[[str], None] | None = None,
) -> Summary:
    """Replay inclusive days [start, end] hour by hour (see the module's docstring). `speed`: simulated hours
    per second at most (None: as fast as it goes). `html_every`: write the Evidently HTML every N hours."""
    from sofare.deploy import rollout
    from sofare.serving.schemas import request_body

    if inject not in (None, *INJECTIONS):
        raise InputError(f"--inject must be one of {', '.join(INJECTIONS)}, got {inject!r}")
    progress = progress or (lambda line: None)
    actor = actor or f"{monitor.REPLAY_ACTOR}{uuid.uuid4().hex[:8]}"
    first, stop = ingest.day_range(start, end)
    delta = interval_delta(cfg.market.interval)
    hours = pd.date_range(first + delta, stop, freq=delta).to_pydatetime().tolist()
    summary = Summary(start=first.isoformat(), end=stop.isoformat())
    deployment = rollout.Deployment(cfg, actor)
    if not deployment.status(champion=False)["frontdoor"]["running"]:
        raise InputError("the front door is not running: `sofare deploy` a version first (make demo does)")
    stable = deployment.state().stable
    if stable is not None:
        from sofare.registry import versions

        test_start = versions.resolve(cfg, stable.version).tags.get("test_window", "").split("..")[0]
        if test_start and pd.Timestamp(first) < pd.Timestamp(test_start):
            summary.notes.append(
                f"version {stable.version} was fitted on data before its test window (from "
                f"{test_start}): live accuracy on replayed hours before that is in-sample, not evidence"
            )
            progress("warning: " + summary.notes[-1])
    if inject == "bad-canary":
        version = sabotaged_canary(cfg, actor)
        summary.notes.append(f"injected: sabotaged version {version} deployed as canary at weight 0.5")
        progress(summary.notes[-1])
    drift_from = hours[len(hours) // 3] if inject == "drift" else None
    if drift_from:
        summary.notes.append(
            f"injected: 4x volatility and 10x volume in the windows sent from {drift_from.isoformat()}"
        )
        progress(summary.notes[-1])
    began_wall = pd.Timestamp.now(tz="UTC").to_pydatetime()
    began = time.monotonic()
    sent = 0
    for k, hour in enumerate(hours):
        mark = time.monotonic()
        _ingest(cfg, hour)
        summary.timings["ingest"] += time.monotonic() - mark
        mark = time.monotonic()
        body = request_body(cfg, hour - delta)
        if drift_from and hour >= drift_from:
            body = drifted(body)
        payload = json.dumps(body).encode()
        state = deployment.state()
        for variant in ("stable", "canary") if state.canary is not None else ("stable",):
            try:
                answer = _post(f"{deployment.url}/predict", payload, variant)
                summary.predictions[f"{answer['model_version']}/{answer['variant']}"] += 1
                sent += 1
            except OSError as exc:
                summary.refused += 1
                log.warning("replay %s: %s prediction failed: %s", hour, variant, exc)
        summary.timings["predict"] += time.monotonic() - mark
        mark = time.monotonic()
        result = monitor.run(cfg, hour, actor=actor, html=(k % html_every == html_every - 1 or k == len(hours) - 1))
        summary.timings["monitor"] += time.monotonic() - mark
        summary.runs.append(result)
        decision = result.decision
        if decision.action != "none":
            mark = time.monotonic()
            summary.actions.append(act(cfg, result, actor))
            summary.timings["act"] += time.monotonic() - mark
            progress(f"{result.at}  {decision.severity:<8} -> {decision.action}: {decision.reason}")
        if speed:
            time.sleep(max(0.0, (k + 1) / speed - (time.monotonic() - began)))
    _wait_for_log(cfg, sent, began_wall)
    summary.hours = len(hours)
    summary.seconds = time.monotonic() - began
    summary.quality = overall_quality(cfg, first, stop)
    return summary


def act(cfg: Config, result: MonitorRun, actor: str) -> dict[str, Any]:
    """What sofare_monitor's branches do, outside Airflow: alert; roll back with the function sofare_rollback runs;
    a retrain request is recorded as the asset event the DAG emits (with its extra)."""
    from sofare.data import alerts
    from sofare.deploy import rollout

    decision = result.decision
    taken: dict[str, Any] = {
        "at": result.at,
        "action": decision.action,
        "severity": decision.severity,
        "reason": decision.reason,
    }
    alerts.send(cfg, "sofare_monitor", decision.severity, f"sofare_monitor at {result.at}: {decision.reason}")
    if decision.action == "rollback":
        cause = next((f.rule for f in decision.findings if f.action == "rollback"), "")
        done = rollout.Deployment(cfg, actor).rollback(
            policy.ROLLBACK_REASONS.get(cause, "other"), decision.reason[:1900], decision.rollback_target
        )
        taken["rollback"] = {"target": done["target"], "verified": done["verified"], "seconds": done["seconds"]}
    elif decision.action == "retrain":
        taken["asset_event"] = {
            "asset": "sofare_retrain_request",
            "extra": {
                "reason": decision.reason,
                "severity": decision.severity,
                "monitor_run": result.run_id,
                "at": result.at,
            },
        }
    return taken


def overall_quality(cfg: Config, start: datetime, end: datetime) -> list[dict[str, Any]]:
    """Live accuracy with its CI over the whole replayed span, per version and variant, beside persistence."""
    m = cfg.monitoring
    engine = monitor.engine_of(cfg)
    out: list[dict[str, Any]] = []
    with engine.connect() as conn:
        frame = quality.hours(conn, cfg, start, end)
    if frame.empty:
        return out
    for (version, variant), group in frame.groupby(["model_version", "variant"]):
        known = group[group["realised_up"].notna()]
        row: dict[str, Any] = {
            "model_version": version,
            "variant": variant,
            "n": len(known),
            "pending": len(group) - len(known),
        }
        if len(known) >= m.min_outcomes:
            found = quality.scores(
                known["prob_up"].to_numpy(float),
                known["realised_up"].to_numpy(float),
                known["last_return"].to_numpy(float),
                m.bootstrap_samples,
                m.bootstrap_block_bars,
                cfg.training.seed,
            )
            row.update({k: (v.model_dump() if hasattr(v, "model_dump") else v) for k, v in found.items()})
        out.append(row)
    return out
