"""Serve application: ``import_path: serve_apps.predictor:app`` with ``args: {model_uri: ...}``.

``app`` is an application builder: Serve calls it with the config's ``args``, so both
``serve deploy serve_apps/configs/<x>.yaml`` and ``skewless serve deploy`` work.
"""

from typing import Any

from ray.serve import Application

from runtime.serving import build_predictor_app


def app(args: dict[str, Any]) -> Application:
    return build_predictor_app(args)
