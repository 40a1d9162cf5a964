"""The MLflow pyfunc flavor of a skewless model (logged as "models from code", no pickle).

``mlflow.pyfunc.load_model("models:/<name>@champion").predict(df)`` takes raw rows and runs
them through the same preprocessing and weights the Serve app uses.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext


class SkewlessPyfuncModel(PythonModel):
    def load_context(self, context: PythonModelContext) -> None:
        from runtime.registry._package import load_model_dir

        self._model = load_model_dir(context.artifacts["model_dir"])

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        # Missing values (NaN/None/NA) become JSON-style nulls, exactly as in a request.
        frame = model_input.astype(object).where(model_input.notna(), None)
        records = frame.to_dict(orient="records")
        preds = self._model.predict_records(records)
        out = pd.DataFrame({"prediction": preds.values})
        if preds.probabilities is not None and preds.classes is not None:
            for i, cls in enumerate(preds.classes):
                out[f"probability_{cls}"] = preds.probabilities[:, i]
        return out


mlflow.models.set_model(SkewlessPyfuncModel())
