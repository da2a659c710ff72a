"""Stage 3, training: the validated training frame, leakage-free windows and splits, the SofareM3
network, Optuna tuning, evaluation beside naive baselines, MLflow tracking of runs and trials, and
the export of a trained model to files a server runs without training code.

May import: data, validation, and config, errors, contracts. Produces `TrainingPlan`,
`EvaluationReport` and `ModelMeta` (sofare.contracts) for the registry and serving.
"""
