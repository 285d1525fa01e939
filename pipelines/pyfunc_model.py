"""The registered model's pyfunc code, logged as a file ("models from code"), not pickled.

MLflow stores this file beside the UPSR checkpoint folder; ``mlflow.pyfunc.load_model`` runs it,
which builds ``UPSRModel`` and loads the checkpoint's safetensors and JSON with ``upsr.load``.
Nothing of the model is unpickled. (Loading still runs this stored code: trust the MLflow
artifact store as you trust the code you install; ``upsr.load("models:/...")`` runs none.)
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np

# The artifact key of the checkpoint folder (pipelines.tracking logs it under this name).
CHECKPOINT_ARTIFACT = "checkpoint"


class UPSRModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of an UPSR checkpoint folder: ``predict`` takes uint8 HxWx3 image(s) and
    returns the x4 upscaled image(s)."""

    def load_context(self, context) -> None:
        import upsr

        self.pipeline = upsr.load(context.artifacts[CHECKPOINT_ARTIFACT])

    # np.ndarray is a hint MLflow accepts without inferring a schema from it: image sizes vary.
    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        return self.pipeline.upscale(model_input)


mlflow.models.set_model(UPSRModel())
