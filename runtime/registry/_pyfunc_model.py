"""The MLflow pyfunc flavor of a skewless model (logged as "models from code", no pickle).

``mlflow.pyfunc.load_model(...)`` on a tabular model takes raw rows and runs them through the
same preprocessing and weights the Serve app uses; on the byte-level language model it takes a
``prompt`` column and returns a greedy ``continuation`` of ``max_new_bytes`` (a param, 64 by
default). MLflow runs this file when it loads the model: skewless verifies the artifacts first
(:func:`runtime.registry.verify`, ``skewless models verify``).
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
        if self._model.preprocessor is None:
            return self._generate(model_input, int((params or {}).get("max_new_bytes", 64)))
        # Missing values (NaN/None/NA) become JSON-style nulls, exactly as in a request.
        frame = model_input.astype(object).where(model_input.notna(), None)
        records = frame.to_dict(orient="records")
        preds = self._model.predict_records(records)
        out = pd.DataFrame({"prediction": preds.values})
        if preds.probabilities is not None and preds.classes is not None:
            for i, cls in enumerate(preds.classes):
                out[f"probability_{cls}"] = preds.probabilities[:, i]
        return out

    def _generate(self, model_input: pd.DataFrame, max_new_bytes: int) -> pd.DataFrame:
        prompts = [str(p).encode("utf-8") for p in model_input["prompt"]]
        generate = self._model.module.generate
        return pd.DataFrame(
            {"continuation": [generate(p, max_new_bytes).decode("utf-8", errors="replace") for p in prompts]}
        )


mlflow.models.set_model(SkewlessPyfuncModel())
