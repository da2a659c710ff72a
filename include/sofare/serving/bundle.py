"""The served model: the file exported at training time (ONNX or TorchScript) and its `ModelMeta`.

No training code: ONNX Runtime (the default, measured faster for SofareM3, docs/benchmarks.md) or
plain torch for TorchScript. The same scaling and output maths as training, from `ModelMeta`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np

from sofare.contracts import ModelMeta, model_dir
from sofare.errors import NotFoundError

Runtime = Literal["onnx", "torch"]
Network = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _onnx(path: Path, threads: int) -> Network:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(micro: np.ndarray, safe: np.ndarray, macro: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, ret = session.run(None, {"micro": micro, "safe": safe, "macro": macro})
        return logits, ret

    return run


def _torchscript(path: Path, threads: int) -> Network:
    import torch

    module = torch.jit.load(str(path))
    module.eval()

    def run(micro: np.ndarray, safe: np.ndarray, macro: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            logits, ret = module(torch.from_numpy(micro), torch.from_numpy(safe), torch.from_numpy(macro))
        return logits.numpy(), ret.numpy()

    return run


class ServedModel:
    """One model version as the service runs it."""

    def __init__(self, meta: ModelMeta, network: Network, runtime: Runtime, directory: Path | None = None) -> None:
        self.meta = meta
        self.network = network
        self.runtime = runtime
        self.directory = directory  # where meta.json and the model files are (the explainer loads from it)

    @classmethod
    def load(cls, directory: Path, runtime: Runtime = "onnx", threads: int | None = None) -> ServedModel:
        where = model_dir(directory)
        meta = ModelMeta.read(where)
        file = meta.runtime_files.get(runtime)
        if file is None or not (where / file).exists():
            raise NotFoundError(f"the model under {where} has no {runtime} file (has: {sorted(meta.runtime_files)})")
        threads = threads or len(os.sched_getaffinity(0))
        return cls(meta, (_onnx if runtime == "onnx" else _torchscript)(where / file, threads), runtime, where)

    @property
    def lookback(self) -> int:
        return self.meta.lookback

    @property
    def columns(self) -> list[str]:
        return list(self.meta.columns)

    def predict_windows(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw feature windows [B, lookback, features] -> (P(up), expected log return)."""
        return self.meta.outputs(*self.network(*self.meta.inputs(raw)))
