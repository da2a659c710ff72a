"""The trained network as files a server can run without any training code, and back.

A model directory holds `meta.json` (`contracts.ModelMeta`), `weights.pt` (the state dict, for
training-side use: re-scoring a champion, the MLflow pyfunc), `model.onnx` (ONNX Runtime) and
`model.ts` (TorchScript). `sofare.serving.bundle` loads the last two with onnxruntime or plain torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sofare.contracts import META_FILE, MODALITIES, ModelMeta, model_dir

if TYPE_CHECKING:
    from sofare.training.model import SofareM3

WEIGHTS_FILE = "weights.pt"
RUNTIME_FILES = {"onnx": "model.onnx", "torch": "model.ts"}


def export(model: SofareM3, meta: ModelMeta, directory: Path) -> Path:
    """Write the weights, the ONNX and TorchScript graphs (dynamic batch) and the meta into `directory`."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    model.eval()
    torch.save(model.state_dict(), directory / WEIGHTS_FILE)
    example = tuple(torch.zeros(2, meta.lookback, max(meta.n_inputs[g], 1)) for g in MODALITIES)
    torch.onnx.export(model, example, str(directory / RUNTIME_FILES["onnx"]), input_names=list(MODALITIES),
                      output_names=["logits", "ret"], dynamo=False,
                      dynamic_axes={n: {0: "batch"} for n in (*MODALITIES, "logits", "ret")})
    with torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False)
    traced.save(str(directory / RUNTIME_FILES["torch"]))
    meta = meta.model_copy(update={"runtime_files": dict(RUNTIME_FILES)})
    (directory / META_FILE).write_text(meta.model_dump_json(indent=1))
    return directory


class TorchModel:
    """The network rebuilt from its weights (training-side: the gate's re-scoring, the MLflow pyfunc)."""

    def __init__(self, directory: Path) -> None:
        import torch

        from sofare.training.model import SofareM3

        self.directory = model_dir(directory)
        self.meta = ModelMeta.read(self.directory)
        n = self.meta.n_inputs
        self.model = SofareM3(n["micro"], n["safe"], n["macro"], self.meta.hyper, **self.meta.loss)
        self.model.load_state_dict(torch.load(self.directory / WEIGHTS_FILE, weights_only=True))
        self.model.eval()

    @property
    def lookback(self) -> int:
        return self.meta.lookback

    @property
    def size_mb(self) -> float:
        return (self.directory / WEIGHTS_FILE).stat().st_size / 2**20

    def predict_windows(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw feature windows [B, lookback, features] -> (P(up), expected log return)."""
        import torch

        micro, safe, macro = (torch.from_numpy(x) for x in self.meta.inputs(raw))
        with torch.no_grad():
            logits, ret = self.model(micro, safe, macro)
        return self.meta.outputs(logits.numpy(), ret.numpy())
