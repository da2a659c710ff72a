"""SOFARE: the whole life of a crypto price model as Airflow DAGs with a BentoML serving bundle.

One package per stage, each importing only the stages before it (tests/unit/test_architecture.py):

    data ─► validation ─► training ─► registry ─► serving ─► deploy ─► monitoring
    (sources, ingest,   (Great       (SofareM3,   (MLflow,   (bundle,  (nginx,    (outcomes,
     warehouse,          Expectations) Optuna,     gate,      predictor, canary,    drift,
     features)                        evaluation)  model card) bento)    rollback)  actions)

Foundations every stage may import: `config` (the one typed configuration), `errors` (PermanentError,
TransientError) and `contracts` (the typed values that pass between stages). At the top, importing
any stage: `tasks` (the task bodies), `orchestration` (Airflow wiring), `runtime` (the embedded
runtime) and `cli` (the `sofare` command). `serving` never imports training code, MLflow or Optuna.
"""
