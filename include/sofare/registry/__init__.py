"""Stage 4, registry: the `sofare-m3` model in MLflow (registering a trained model, resolving a version
or alias, reading its report and files, semver), the promotion gate that judges an
`EvaluationReport` into a `Verdict`, the model card, and the `audit_log` table.

May import: data, validation, training, and config, errors, contracts.
"""
