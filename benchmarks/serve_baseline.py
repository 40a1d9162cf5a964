"""The baseline server: the simplest honest FastAPI app a team would write around the model.

One uvicorn worker, one process, the model called directly: ``POST /predict`` takes
``{"instances": [...]}`` and answers ``predict_records(...).to_json()`` plus the model
identity; ``GET /healthz`` answers once the model is loaded. Bad rows are a 422 (not a
500), as in the skewless predictor, so error counts compare like with like.

    python benchmarks/serve_baseline.py --model-dir DIR --port 8123 [--torch-threads 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def create_app(model_dir: str) -> Any:
    from fastapi import Body, FastAPI
    from fastapi.responses import JSONResponse

    from runtime.errors import SchemaValidationError
    from runtime.registry import load_model_dir

    model = load_model_dir(model_dir)
    identity = {"name": Path(model_dir).name, "version": None, "uri": str(model_dir)}
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": identity}

    @app.post("/predict")
    def predict(payload: dict[str, Any] = Body(...)) -> JSONResponse:  # noqa: B008 (FastAPI's idiom)
        # a sync endpoint: FastAPI runs it in its thread pool, off the event loop
        instances = payload.get("instances")
        if not isinstance(instances, list) or not instances:
            return JSONResponse({"error": "instances must be a non-empty list"}, status_code=422)
        try:
            preds = model.predict_records(instances)
        except SchemaValidationError as exc:
            return JSONResponse({"error": exc.to_dict()}, status_code=422)
        return JSONResponse({**preds.to_json(), "model": identity})

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--torch-threads", type=int, default=1, help="Match a Serve replica's OMP_NUM_THREADS.")
    args = parser.parse_args(argv)

    import torch
    import uvicorn

    torch.set_num_threads(args.torch_threads)
    app = create_app(args.model_dir)
    # 127.0.0.1 only: a benchmark must not listen on the network
    uvicorn.run(app, host="127.0.0.1", port=args.port, workers=1, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
