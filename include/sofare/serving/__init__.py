"""Stage 5, serving: what a `bentoml serve` process runs — request schemas, the served model (ONNX or
TorchScript file + `ModelMeta`), the predictor (checks, the one feature function, answers), the
non-blocking prediction log, adaptive batching — and building, containerizing and running bentos.

May import: data, and config, errors, contracts. Never training, registry, MLflow, Lightning or
Optuna: the bento carries only this stage and what it imports (tests/unit/test_architecture.py).
"""
