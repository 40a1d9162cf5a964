"""Ray Serve applications over registered models, sharing the one preprocessing module."""

from runtime.serving._deploy import deploy_config, run_app, validate_serve_config
from runtime.serving._predictor import Predictor, build_predictor_app

__all__ = ["Predictor", "build_predictor_app", "deploy_config", "run_app", "validate_serve_config"]
