"""Optuna: the search space from config, TPE, a Hyperband or median pruner on the validation loss,
and RDB storage in the warehouse database, so parallel workers share one study and a killed study
resumes (trials left RUNNING by a dead worker are failed by the heartbeat and retried once)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from sofare.data import warehouse
from sofare.errors import NotFoundError

if TYPE_CHECKING:
    from sofare.config import Config

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
HEARTBEAT_SECONDS = 10
GRACE_SECONDS = 30


def storage(cfg: Config) -> RDBStorage:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    url = warehouse.warehouse_url(cfg)
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    return RDBStorage(
        url,
        engine_kwargs=kwargs,
        heartbeat_interval=HEARTBEAT_SECONDS,
        grace_period=GRACE_SECONDS,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
    )


def pruner(cfg: Config) -> optuna.pruners.BasePruner:
    t = cfg.training
    if t.pruner == "hyperband":
        # factor 4 on max_epochs 10: two brackets, rungs at epochs 1 and 4, the best quarter promoted. Factor 3 adds
        # a bracket (3 in 17 trials) that can prune only at epoch 9, after early stopping ends most trials.
        # Chosen by this arithmetic, not by comparing studies; measured share pruned in docs/benchmarks.md.
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=t.max_epochs, reduction_factor=4)
    if t.pruner == "median":
        # The validation loss bottoms out at epoch 2-4 and early stopping ends most trials soon after, so a pruner
        # only saves epochs if it may judge from the first epoch on: warm-up 0, 4 finished trials as reference.
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=0)
    return optuna.pruners.NopPruner()


def _sampler(cfg: Config, worker: int) -> optuna.samplers.BaseSampler:
    # one seed per worker: workers run different trials, and a sequential run is reproducible
    return optuna.samplers.TPESampler(seed=cfg.training.seed + worker, n_startup_trials=5)


def create_study(cfg: Config, name: str) -> optuna.Study:
    return optuna.create_study(
        study_name=name,
        storage=storage(cfg),
        direction="minimize",
        load_if_exists=True,
        sampler=_sampler(cfg, 0),
        pruner=pruner(cfg),
    )


def load_study(cfg: Config, name: str, worker: int) -> optuna.Study:
    try:
        return optuna.load_study(
            study_name=name, storage=storage(cfg), sampler=_sampler(cfg, worker), pruner=pruner(cfg)
        )
    except KeyError:
        raise NotFoundError(f"no Optuna study {name!r} in {warehouse.describe(warehouse.get_engine(cfg))}") from None


def suggest(cfg: Config, trial: optuna.trial.Trial) -> dict[str, Any]:
    s = cfg.training.search_space
    return hyper_of(
        cfg,
        {
            "hidden_size": trial.suggest_int("hidden_size", s.hidden_size[0], s.hidden_size[1], step=s.hidden_size[2]),
            "num_layers": trial.suggest_int("num_layers", *s.num_layers),
            "num_heads": trial.suggest_categorical("num_heads", s.num_heads),
            "dropout": trial.suggest_float("dropout", *s.dropout),
            "learning_rate": trial.suggest_float("learning_rate", *s.learning_rate, log=True),
            "batch_size": trial.suggest_categorical("batch_size", s.batch_size),
            "weight_decay": trial.suggest_float("weight_decay", *s.weight_decay, log=True),
            "lookback": trial.suggest_categorical("lookback", s.lookback),
        },
    )


def hyper_of(cfg: Config, params: dict[str, Any]) -> dict[str, Any]:
    from sofare.training.model import Hyper

    return Hyper(**params).to_dict()


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def optimize(
    study: optuna.Study, objective: Callable[[optuna.trial.Trial], float], n_trials: int, timeout: float
) -> int:
    """Run trials until the study holds n_trials finished ones (counting other workers' and earlier
    runs'), or until timeout; the number this call ran."""
    optuna.storages.fail_stale_trials(study)
    began, ran = time.monotonic(), 0
    while finished_trials(study) + _running(study) < n_trials and time.monotonic() - began < timeout:
        study.optimize(objective, n_trials=1, catch=(), gc_after_trial=True)
        ran += 1
    return ran


def _running(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise NotFoundError(f"study {study.study_name!r} has no completed trial (all pruned or failed); tune again")
    return min(complete, key=objective_value)


def objective_value(trial: optuna.trial.FrozenTrial) -> float:
    """A complete trial's validation loss."""
    assert trial.value is not None  # a COMPLETE trial of a single-objective study always has its value
    return trial.value


def trial_summary(study: optuna.Study) -> list[dict[str, Any]]:
    return [
        {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "epochs": t.user_attrs.get("epochs"),
            "params": t.params,
            "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None,
        }
        for t in study.get_trials(deepcopy=False)
    ]


def wall_seconds(study: optuna.Study) -> float | None:
    """The study's wall time: its first trial's start to its last trial's end (parallel workers overlap)."""
    spans = [
        (t.datetime_start, t.datetime_complete)
        for t in study.get_trials(deepcopy=False)
        if t.datetime_start and t.datetime_complete
    ]
    if not spans:
        return None
    return (max(end for _, end in spans) - min(start for start, _ in spans)).total_seconds()
