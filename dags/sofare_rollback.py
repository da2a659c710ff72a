"""
### sofare_rollback — the on-call way back, verified

Trigger it from the UI form (or `sofare rollback`) when the model in production misbehaves:

- **reason** — why (incident, bad predictions, latency, drift, other); **details** — what you saw.
- **target_version** — optional; empty: the current stable when a canary is live, otherwise the
  previous champion from the deployment history (right after a rollback: the version it restored).

One task, in this order: canary weight → 0; the target's bento serves as the only (stable) version
behind the front door (the old processes stop only after nginx's old workers finished their requests);
`champion` moves to the target; **live requests through the front door** must all be answered by the
target; then a `deployment_events` row, an `audit_log` record and an alert. A second run finds the target
serving and only verifies it (a no-op). An unknown version fails at once and changes nothing. The task log
shows the seconds from trigger to verified (goal: under 60 s).
"""

from __future__ import annotations

from airflow.sdk import Param, dag, task

from sofare.config import load_config
from sofare.orchestration import CHAMPION, UNSCHEDULED_START, default_args, run

CFG = load_config()
REASONS = {
    "incident": "Incident (errors, outage)",
    "bad-predictions": "Bad predictions",
    "latency": "Latency",
    "drift": "Data drift",
    "other": "Other (say in details)",
}


@dag(
    dag_id="sofare_rollback",
    schedule=None,
    start_date=UNSCHEDULED_START,
    catchup=False,
    max_active_runs=1,
    default_args={**default_args(CFG), "retries": 0},
    tags=["sofare", "deploy", "on-call"],
    doc_md=__doc__,
    params={
        "reason": Param(
            "incident",
            type="string",
            enum=list(REASONS),
            values_display=REASONS,
            title="Reason",
            description="Why the model is rolled back (recorded in the audit log and the alert)",
        ),
        "details": Param("", type="string", maxLength=2000, title="Details", description="What you saw"),
        "target_version": Param(
            None,
            type=["null", "string"],
            pattern=r"^[0-9]+$",
            title="Target version",
            description="Empty: the stable when a canary is live, else the previous champion",
        ),
    },
)
def sofare_rollback():
    @task(outlets=[CHAMPION])
    def rollback(params=None) -> dict:
        import logging

        from sofare import tasks

        result = run(
            tasks.rollback,
            params["reason"],
            params["details"] or "",
            params["target_version"],
            "airflow:sofare_rollback",
        )
        logging.getLogger("sofare.rollback").info(
            "version %s %s, verified through %s in %.1f s (live answers: %s)",
            result["target"],
            "already served" if result["decision"] == "noop" else "rolled back",
            result["frontdoor"],
            result["seconds"],
            ", ".join(result["verified"]),
        )
        return result

    rollback()


sofare_rollback()
