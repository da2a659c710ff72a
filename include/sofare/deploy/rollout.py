"""Stable and canary serving processes behind the front door, and every change of what serves.

One `Deployment` per var/: its state (which version serves as stable and as canary, on which port, at
which weight) is a JSON file beside the nginx front door, so the CLI, Airflow tasks and the tests all
operate the same processes. Every change takes an exclusive lock (never two canaries, never two
switches at once), starts what is new and waits for it to be ready, reroutes through nginx (a graceful
reload), waits until the old nginx workers have finished their requests, and only then stops what no
longer serves: nothing is dropped. Each change is a `deployment_events` row.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
import uuid
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from sofare.data import alerts, warehouse
from sofare.deploy.frontdoor import FrontDoor, FrontDoorError, Routing, exclusive
from sofare.errors import InputError, NotFoundError, PermanentError
from sofare.serving import bento

if TYPE_CHECKING:
    from sofare.config import Config

log = logging.getLogger(__name__)
REASONS = ("incident", "bad-predictions", "latency", "drift", "other")  # sofare_rollback's `reason` choices


class DeployError(PermanentError):
    """A deployment change was refused or failed; the message says why and what is left serving."""


class Backend(BaseModel):
    """One `bentoml serve` process: the version it serves, its bento, where it listens."""

    model_config = ConfigDict(frozen=True)

    version: str
    bento: str
    port: int
    pid: int
    variant: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class State(BaseModel):
    """What serves now (var/deploy/state.json)."""

    model_config = ConfigDict(frozen=True)

    stable: Backend | None = None
    canary: Backend | None = None
    canary_weight: float = 0.0
    deployment_id: str = ""


def check_weight(weight: float) -> float:
    """A canary weight in [0, 1]; anything else (NaN, inf, a string) is refused naming the value."""
    try:
        value = float(weight)
    except (TypeError, ValueError):
        raise InputError(f"canary weight must be a number in [0, 1], got {weight!r}") from None
    if not 0.0 <= value <= 1.0:  # NaN fails both comparisons
        raise InputError(f"canary weight must be in [0, 1], got {weight!r}")
    return value


class Deployment:
    """The stable and canary processes of one var/ and the nginx in front of them."""

    def __init__(self, cfg: Config, actor: str = "sofare") -> None:
        self.cfg = cfg
        self.actor = actor
        self.dir = cfg.var_dir / "deploy"
        self.frontdoor = FrontDoor(cfg.var_dir / "nginx")
        self.state_path = self.dir / "state.json"

    # --- reading ---------------------------------------------------------------------------------------------

    def state(self) -> State:
        try:
            return State.model_validate_json(self.state_path.read_text())
        except FileNotFoundError:
            return State()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.cfg.deploy.frontdoor_port}"

    def status(self, champion: bool = True) -> dict[str, Any]:
        """What serves, where, at which weight, and whether each process and the front door run (and the
        `champion` alias, unless `champion=False` spares the MLflow lookup)."""
        state = self.state()

        def describe(b: Backend | None) -> dict[str, Any] | None:
            return None if b is None else {**b.model_dump(), "url": b.url, "running": bento.group_alive(b.pid)}

        champion_version = None
        if champion:
            from sofare.registry import versions  # MLflow: imported only when the champion is asked for

            champion_version = versions.alias_version(self.cfg, "champion")
        return {
            "frontdoor": {"url": self.url, "running": self.frontdoor.running()},
            "stable": describe(state.stable),
            "canary": describe(state.canary),
            "canary_weight": state.canary_weight,
            "deployment_id": state.deployment_id,
            "champion": champion_version,
        }

    # --- changes ---------------------------------------------------------------------------------------------

    def serve(self, version: str, reason: str = "") -> State:
        """Make `version` the stable (nothing else serves): the first deployment, or a direct switch."""
        with self._locked():
            state = self.state()
            if state.canary is not None:
                raise DeployError(f"a canary (version {state.canary.version}) is live: promote or abort it first")
            return self._switch_stable(state, version, "serve", reason or f"serve version {version}")

    def start_canary(self, version: str, weight: float, env: dict[str, str] | None = None) -> State:
        """Start `version` as the canary and send it `weight` of the clients (sticky by client id); `env`
        overrides the canary process's settings (SOFARE_*), e.g. to try a configuration change as a canary."""
        weight = check_weight(weight)
        with self._locked():
            state = self.state()
            if state.stable is None:
                raise DeployError(
                    "nothing serves yet: deploy a stable version first (`sofare deploy` does when nothing runs)"
                )
            if state.canary is not None:
                raise DeployError(
                    f"a canary (version {state.canary.version}, weight {state.canary_weight:g}) is "
                    "already live: promote or abort it before deploying another"
                )
            if version == state.stable.version:
                raise DeployError(f"version {version} already serves as stable")
            canary = self._start(version, "canary", env)
            new = State(stable=state.stable, canary=canary, canary_weight=weight, deployment_id=uuid.uuid4().hex)
            try:
                self._route(new)
            except FrontDoorError:
                bento.stop_group(canary.pid)
                raise
            self._save(new)
            self.event(new, "canary", "done", f"canary version {version} at weight {weight:g}")
            return new

    def set_weight(self, weight: float, action: str = "weight", reason: str = "") -> State:
        weight = check_weight(weight)
        with self._locked():
            state = self.state()
            if state.canary is None:
                raise DeployError("no canary is live")
            new = state.model_copy(update={"canary_weight": weight})
            self._route(new)
            self._save(new)
            self.event(new, action, "done", reason or f"canary weight {weight:g}")
            return new

    def promote(self, reason: str = "canary analysis passed") -> State:
        """The canary becomes stable (a fresh `stable` process of its bento takes over, then the old ones stop),
        and `champion` moves to its version."""
        with self._locked():
            state = self.state()
            if state.canary is None:
                raise DeployError("no canary is live to promote")
            from sofare.registry import audit, versions

            version = state.canary.version
            new = self._switch_stable(state, version, "promote", reason)
            versions.set_alias(self.cfg, "champion", version)
            audit.record(
                self.cfg,
                self.actor,
                "promote",
                version,
                "champion",
                {"reason": reason, "previous": state.stable.version if state.stable else None},
            )
            return new

    def abort(self, reason: str) -> State:
        """Take every request off the canary and stop it; stable keeps serving."""
        with self._locked():
            state = self.state()
            if state.canary is None:
                raise DeployError("no canary is live to abort")
            new = self._drop_canary(state)
            self.event(new, "abort", "done", reason, canary_version=state.canary.version)
            return new

    def rollback(self, reason: str, details: str = "", target: str | None = None) -> dict[str, Any]:
        """Put `target` (default: the current stable when a canary is live, else the previous champion; right
        after a rollback, the version it restored) back as the only version serving, move `champion` to it, verify by live requests through the front door, record
        and alert. A second run finds the target serving and only verifies it."""
        from sofare.registry import audit, versions

        if reason not in REASONS:
            raise InputError(f"reason must be one of {', '.join(REASONS)}, got {reason!r}")
        began = time.monotonic()
        with self._locked():
            state = self.state()
            target = str(target) if target else self._default_target(state)
            versions.resolve(self.cfg, target)  # an unknown version fails here, before anything changes
            note = f"{reason}: {details}" if details else reason
            if state.stable is not None and state.stable.version == target and state.canary is None:
                decision = "noop"
                new = state
            elif state.stable is not None and state.stable.version == target:  # only the canary has to go
                decision = "done"
                new = self._drop_canary(state)
            else:
                decision = "done"
                if state.canary is not None:  # weight 0 first: no new client reaches the canary from here on
                    state = state.model_copy(update={"canary_weight": 0.0})
                    self._route(state)
                new = self._switch_stable(state, target, "rollback", note, record=False)
            versions.set_alias(self.cfg, "champion", target)
        answered = self.verify(target)
        seconds = time.monotonic() - began
        previous_canary = state.canary.version if state.canary else None
        result: dict[str, Any] = {
            "target": target,
            "previous_stable": state.stable.version if state.stable else None,
            "previous_canary": previous_canary,
            "decision": decision,
            "verified": answered,
            "seconds": round(seconds, 2),
            "reason": reason,
            "details": details,
            "frontdoor": self.url,
        }
        self.event(
            new,
            "rollback",
            decision,
            f"{note}; verified {len(answered)} live requests in {seconds:.1f}s",
            canary_version=previous_canary,
        )
        result["audit_id"] = audit.record(self.cfg, self.actor, "rollback", target, decision, result)
        alerts.send(
            self.cfg,
            f"rollback:{self.actor}",
            "high" if decision == "done" else "low",
            f"rolled back to version {target} ({note})"
            if decision == "done"
            else f"rollback to version {target} requested ({note}): already serving, verified",
            result,
        )
        log.info("rollback to version %s %s and verified in %.1fs", target, decision, seconds)
        return result

    def stop(self) -> None:
        """Stop the front door and every serving process (the demo's and the tests' clean-up)."""
        with self._locked():
            state = self.state()
            self.frontdoor.stop()
            for backend in (state.canary, state.stable):
                if backend is not None:
                    bento.stop_group(backend.pid)
            self.state_path.unlink(missing_ok=True)

    def verify(self, version: str) -> list[str]:
        """Live requests through the front door (distinct client ids, so any split would show) must all be
        answered by `version` as stable; the answering versions otherwise raise DeployError."""
        answered = []
        for n in range(self.cfg.deploy.verify_requests):
            request = urllib.request.Request(
                f"{self.url}/model_info",
                data=b"{}",
                method="POST",
                headers={
                    "Content-Type": "application/json",
                    "X-Client-Id": f"sofare-verify-{uuid.uuid4().hex[:8]}-{n}",
                },
            )
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    info = json.loads(response.read())
            except (OSError, ValueError) as exc:
                raise DeployError(f"verification request {n + 1} through {self.url} failed: {exc}") from exc
            answered.append(f"{info.get('model_version')}/{info.get('variant')}")
        if any(a != f"{version}/stable" for a in answered):
            raise DeployError(
                f"verification failed: expected version {version} as stable, the front door answered {answered}"
            )
        return answered

    # --- history ---------------------------------------------------------------------------------------------

    def event(
        self,
        state: State,
        action: str,
        decision: str,
        reason: str,
        measurements: list[dict[str, Any]] | None = None,
        canary_version: str | None = None,
    ) -> str:
        event_id = uuid.uuid4().hex
        import pandas as pd

        row = {
            "event_id": event_id,
            "at": pd.Timestamp(datetime.now(UTC)),
            "deployment_id": state.deployment_id or "-",
            "action": action,
            "stable_version": state.stable.version if state.stable else None,
            "canary_version": canary_version or (state.canary.version if state.canary else None),
            "canary_weight": float(state.canary_weight),
            "measurements": json.dumps(measurements or []),
            "decision": decision,
            "reason": reason,
            "actor": self.actor,
        }
        with warehouse.transaction(warehouse.get_engine(self.cfg)) as conn:
            warehouse.upsert(conn, warehouse.deployment_events, pd.DataFrame([row]))
        return event_id

    def history(self, limit: int = 50) -> list[dict[str, Any]]:
        import sqlalchemy as sa

        e = warehouse.deployment_events
        with warehouse.get_engine(self.cfg).connect() as conn:
            rows = conn.execute(sa.select(e).order_by(e.c.at.desc()).limit(limit)).mappings().all()
        return [dict(r) for r in rows]

    def _default_target(self, state: State) -> str:
        if state.canary is not None and state.stable is not None:
            return state.stable.version
        current = state.stable.version if state.stable else None
        changes = [
            row
            for row in self.history(limit=1000)  # newest first
            if row["action"] in ("serve", "promote", "rollback") and row["decision"] in ("done", "noop")
        ]
        if changes and changes[0]["action"] == "rollback" and current is not None:
            return current  # the last change was a rollback: asking again verifies it (no flip-flop)
        for row in changes:  # the last stable that is not the current one
            if row["stable_version"] and row["stable_version"] != current:
                return str(row["stable_version"])
        raise DeployError("no previous champion in the deployment history: give the target version")

    # --- internals -------------------------------------------------------------------------------------------

    def _switch_stable(self, state: State, version: str, action: str, reason: str, record: bool = True) -> State:
        """Start `version` as a new stable process, route everything to it, drain, stop the old processes."""
        fresh = self._start(version, "stable")
        new = State(stable=fresh, canary=None, canary_weight=0.0, deployment_id=state.deployment_id or uuid.uuid4().hex)
        try:
            self._route(new)
        except FrontDoorError:
            bento.stop_group(fresh.pid)
            raise
        self._save(new)
        self.frontdoor.drain()
        for old in (state.canary, state.stable):
            if old is not None:
                bento.stop_group(old.pid)
        if record:
            self.event(new, action, "done", reason, canary_version=state.canary.version if state.canary else None)
        return new

    def _drop_canary(self, state: State) -> State:
        """Route everything to stable, let in-flight canary requests finish, stop the canary."""
        new = State(stable=state.stable, canary=None, canary_weight=0.0, deployment_id=state.deployment_id)
        self._route(new)
        self._save(new)
        self.frontdoor.drain()
        if state.canary is not None:
            bento.stop_group(state.canary.pid)
        return new

    def _start(self, version: str, variant: str, env: dict[str, str] | None = None) -> Backend:
        from sofare.registry import versions

        tag = versions.resolve(self.cfg, version).tags.get("bento_tag")
        if not tag:
            raise DeployError(f"version {version} has no bento yet; run `sofare build --version {version}`")
        preferred = self.cfg.serving.port + (1 if variant == "canary" else 0)
        server = bento.Server(self.cfg, tag, bento.free_port(preferred), variant, **(env or {}))
        try:
            server.wait_ready(self.cfg.deploy.start_timeout_seconds)
        except (RuntimeError, TimeoutError) as exc:
            raise DeployError(f"version {version} ({tag}) did not start as {variant}: {exc}") from exc
        return Backend(
            version=str(version),
            bento=tag,
            port=int(server.url.rsplit(":", 1)[1]),
            pid=server.process.pid,
            variant=variant,
        )

    def _route(self, state: State) -> None:
        if state.stable is None:
            raise DeployError("no stable version to route to")
        self.frontdoor.apply(
            Routing(
                stable_port=state.stable.port,
                canary_port=state.canary.port if state.canary else None,
                canary_weight=state.canary_weight,
                listen_port=self.cfg.deploy.frontdoor_port,
            )
        )

    def _save(self, state: State) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(state.model_dump_json(indent=1))
        tmp.replace(self.state_path)

    def _locked(self) -> AbstractContextManager[None]:
        """One change at a time across processes; a second one waits for the first, then sees its result."""
        return exclusive(self.dir / "lock")


def require_version(cfg: Config, version: str | None) -> str:
    """The version to deploy: the one given, else the `challenger`; a clear error for neither."""
    from sofare.registry import versions

    if version:
        return str(versions.resolve(cfg, version).version)
    challenger = versions.alias_version(cfg, "challenger")
    if challenger is None:
        raise NotFoundError("no challenger: promote a version first (`sofare promote`), or give --version")
    return challenger
