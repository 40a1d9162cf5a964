"""Ray Serve applications over registered models, sharing the one preprocessing module."""

from runtime.serving._auth import DEFAULT_API_KEY_ENV, ApiKeyAuth
from runtime.serving._codec import ARROW_STREAM, JSON, HttpError, decode_request, encode_response, is_arrow
from runtime.serving._deploy import deploy_config, run_app, validate_serve_config
from runtime.serving._ingress import ingress_options, loopback_binds
from runtime.serving._ingress import state_dir as ingress_state_dir
from runtime.serving._metrics import MAX_LABEL_VALUES, ServingMetrics, exported_names, feature_buckets
from runtime.serving._parity import ParityReport, check_parity
from runtime.serving._predictor import Predictor, build_predictor_app
from runtime.serving._routes import ROUTES, HealthRoute, PredictRoute, Route

__all__ = [
    "ARROW_STREAM",
    "DEFAULT_API_KEY_ENV",
    "JSON",
    "MAX_LABEL_VALUES",
    "ROUTES",
    "ApiKeyAuth",
    "HealthRoute",
    "HttpError",
    "ParityReport",
    "PredictRoute",
    "Predictor",
    "Route",
    "ServingMetrics",
    "build_predictor_app",
    "check_parity",
    "decode_request",
    "deploy_config",
    "encode_response",
    "exported_names",
    "feature_buckets",
    "ingress_options",
    "ingress_state_dir",
    "is_arrow",
    "loopback_binds",
    "run_app",
    "validate_serve_config",
]
