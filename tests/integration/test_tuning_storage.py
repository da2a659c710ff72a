"""The Optuna study lives in the warehouse database (SQLite and a real PostgreSQL server), and
parallel workers share it: together they run the requested number of trials, not each."""

from __future__ import annotations

import threading

import optuna

from sofare.training import tuning


def test_parallel_workers_share_one_study_in_the_warehouse(db_cfg, engine):
    tuning.create_study(db_cfg, "shared")
    done: list[int] = []

    def worker(index: int) -> None:
        study = tuning.load_study(db_cfg, "shared", index)
        done.append(tuning.optimize(study, lambda t: (t.suggest_float("x", -1, 1) - 0.3) ** 2, n_trials=8, timeout=120))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    study = optuna.load_study(study_name="shared", storage=tuning.storage(db_cfg))
    finished = tuning.finished_trials(study)
    assert 8 <= finished <= 9, "the workers stop together once the study holds n_trials (one may overlap)"
    assert sum(done) == len(study.get_trials()) and all(n > 0 for n in done), "both workers took trials"
    again = tuning.load_study(db_cfg, "shared", 0)
    assert tuning.optimize(again, lambda t: 0.0, n_trials=8, timeout=60) == 0, (
        "a finished study resumes with nothing to do"
    )
