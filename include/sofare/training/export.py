"""The trained network as files a server can run without any training code, and back.

A model directory holds `meta.json` (`contracts.ModelMeta`), `weights.pt` (the state dict, for
training-side use: re-scoring a champion, the MLflow pyfunc), `model.onnx` (ONNX Runtime) and
`model.ts` (TorchScript). `sofare.serving.bundle` loads the last two with onnxruntime or plain torch. `explain.ts`
(runtime_files["explain"]) is the same network traced with autograd on, for `/explain` only: the inference trace
(`model.ts`, traced under no_grad) holds fused kernels that have no derivative, so Captum cannot use it.
Since the monitoring stage, it also holds `reference.parquet` (`meta.reference_file`): the drift reference
sample written at training time (`write_reference`), so it travels with the version wherever the directory goes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sofare.contracts import META_FILE, MODALITIES, ModelMeta, model_dir

if TYPE_CHECKING:
    import pandas as pd

    from sofare.training.model import SofareM3

WEIGHTS_FILE = "weights.pt"
RUNTIME_FILES = {"onnx": "model.onnx", "torch": "model.ts", "explain": "explain.ts"}
REFERENCE_FILES = ("reference.parquet", "reference.csv.gz")  # parquet when pyarrow is there, else gzipped CSV


def export(model: SofareM3, meta: ModelMeta, directory: Path, reference: pd.DataFrame | None = None) -> Path:
    """Write the weights, the ONNX and TorchScript graphs (dynamic batch), the drift reference sample (if
    given) and the meta into `directory`."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    model.eval()
    torch.save(model.state_dict(), directory / WEIGHTS_FILE)
    example = tuple(torch.zeros(2, meta.lookback, max(meta.n_inputs[g], 1)) for g in MODALITIES)
    torch.onnx.export(
        model,
        example,
        str(directory / RUNTIME_FILES["onnx"]),
        input_names=list(MODALITIES),
        output_names=["logits", "ret"],
        dynamo=False,
        dynamic_axes={n: {0: "batch"} for n in (*MODALITIES, "logits", "ret")},
    )
    with torch.no_grad():
        # Lightning's own tracing: torch.jit.trace alone probes `trainer`, which raises on a model not attached to
        # one (a model rebuilt from its weights, e.g. the replay's sabotaged canary)
        traced = model.to_torchscript(method="trace", example_inputs=example, check_trace=False)
    assert isinstance(traced, torch.jit.ScriptModule)  # the dict in its return type is for overrides; SofareM3 has none
    traced.save(str(directory / RUNTIME_FILES["torch"]))
    # Lightning's flag that lets torch.jit probe the module's attributes without a trainer (as to_torchscript
    # does), set on this instance only; tracing with autograd on keeps the unfused, differentiable kernels
    model._jit_is_scripting = True
    try:
        differentiable = torch.jit.trace(model, example, check_trace=False)
    finally:
        del model._jit_is_scripting
    differentiable.save(str(directory / RUNTIME_FILES["explain"]))
    update: dict[str, object] = {"runtime_files": dict(RUNTIME_FILES)}
    if reference is not None:
        update["reference_file"] = write_reference(reference, directory)
    meta = meta.model_copy(update=update)
    (directory / META_FILE).write_text(meta.model_dump_json(indent=1))
    return directory


def write_reference(sample: pd.DataFrame, directory: Path) -> str:
    """Write the drift reference sample into a model directory; its file name (for `meta.reference_file`)."""
    try:
        import pyarrow  # noqa: F401 - only whether it is there
    except ImportError:
        name = REFERENCE_FILES[1]
        sample.to_csv(directory / name, index=False, compression="gzip")
    else:
        name = REFERENCE_FILES[0]
        sample.to_parquet(directory / name, index=False)
    return name


def read_reference(directory: Path) -> pd.DataFrame | None:
    """The drift reference sample of a model directory (at or below `directory`); None when the version was
    exported without one (before the monitoring stage) or the file is missing."""
    import pandas as pd

    where = model_dir(directory)
    name = ModelMeta.read(where).reference_file
    if not name or not (where / name).is_file():
        return None
    if name.endswith(".parquet"):
        return pd.read_parquet(where / name)
    frame = pd.read_csv(where / name)
    if "open_time" in frame:
        frame["open_time"] = pd.to_datetime(frame["open_time"], utc=True)
    return frame


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
