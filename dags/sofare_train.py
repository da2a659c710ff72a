"""
### sofare_train — tune, train, evaluate and register SofareM3

Runs **weekly**, **whenever `sofare_validated_features` is updated**, **when `sofare_monitor` asks for a
retrain** (`sofare_retrain_request`, the reason in the event's extra), or manually with Params.
Reads validated days only: an unvalidated or failed day in the window fails `plan` and names it.

- `plan` — fixes the training window (Params, else config, else the latest span of days that
  passed every suite), creates or resumes the Optuna study (stored in the warehouse database), and
  opens the MLflow parent run.
- `tune[worker]` — parallel mapped workers sharing the one study: TPE sampler, Hyperband/median
  pruning on the validation loss through Lightning, each trial an MLflow child run. A killed
  worker's trial is failed by the heartbeat and retried; rerunning resumes the study.
- `finalize` — best trial's parameters, final fit on train + validation, evaluation on the held-out
  test window (metrics with bootstrap 95% CIs beside persistence, majority-class and linear
  baselines; cost-aware backtest; plots), registration of a new `sofare-m3` version with semver,
  data window, feature-set version and git commit tags, and the model card.

Emits `sofare_model_candidate` (the registered version is in the event's extra).
"""

from __future__ import annotations

import pendulum
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task

from sofare.config import load_config
from sofare.orchestration import MODEL_CANDIDATE, RETRAIN_REQUEST, VALIDATED_FEATURES, default_args, run

CFG = load_config()


@dag(
    dag_id="sofare_train",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(CFG.training.schedule, timezone="UTC"),
        assets=VALIDATED_FEATURES | RETRAIN_REQUEST,
    ),
    start_date=pendulum.parse(CFG.ingest.start_date, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(CFG),
    tags=["sofare", "training", "optuna", "mlflow"],
    doc_md=__doc__,
    params={
        "n_trials": Param(
            CFG.training.n_trials,
            type="integer",
            minimum=1,
            maximum=500,
            title="Optuna trials",
            description="finished trials the study should hold (a resumed study counts its earlier ones)",
        ),
        "timeout": Param(
            CFG.training.timeout_seconds,
            type="integer",
            minimum=60,
            title="Tuning timeout (s)",
            description="each tuning worker stops starting trials after this many seconds",
        ),
        "max_epochs": Param(
            CFG.training.max_epochs,
            type="integer",
            minimum=1,
            maximum=200,
            title="Max epochs per trial",
            description="per trial, per walk-forward fold and for the final fit (early stopping may end sooner)",
        ),
        "start": Param(
            None,
            type=["null", "string"],
            format="date",
            title="Training window start (UTC day)",
            description="Empty: the latest span of days that passed every validation suite",
        ),
        "end": Param(
            None,
            type=["null", "string"],
            format="date",
            title="Training window end (inclusive)",
            description="Empty: the last day of that validated span",
        ),
    },
)
def sofare_train():
    @task
    def plan(params=None) -> dict:
        from sofare import tasks

        return run(
            tasks.train_plan,
            params["n_trials"],
            params["timeout"],
            params["max_epochs"],
            params["start"],
            params["end"],
        )

    @task(map_index_template="worker {{ task.op_kwargs['worker'] }}")
    def tune(plan: dict, worker: int) -> dict:
        from sofare import tasks

        return run(tasks.train_tune, plan, worker)

    @task(outlets=[MODEL_CANDIDATE])
    def finalize(plan: dict, outlet_events=None) -> dict:
        from sofare import tasks

        result = run(tasks.train_finalize, plan)
        outlet_events[MODEL_CANDIDATE].extra = {k: result[k] for k in ("model", "version", "semver", "run_id")}
        return result

    the_plan = plan()
    tune.partial(plan=the_plan).expand(worker=list(range(CFG.training.workers))) >> finalize(the_plan)


sofare_train()
