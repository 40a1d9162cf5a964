"""Ray Serve applications over registered models, sharing the one preprocessing module."""

from runtime.serving._auth import DEFAULT_API_KEY_ENV, ApiKeyAuth
from runtime.serving._codec import ARROW_STREAM, JSON, HttpError, decode_request, encode_response, is_arrow
from runtime.serving._deploy import APP_LOGGING, deploy_config, run_app, validate_serve_config
from runtime.serving._grpc import (
    GRPC_STATUS,
    PREDICT_METHOD,
    PredictReply,
    PredictRequest,
    add_predictor_servicer,
    bind_grpc_to_front_host,
    grpc_status,
    predict_stub,
)
from runtime.serving._ingress import buffered_requests, ingress_options, loopback_binds, unwatched_disconnects
from runtime.serving._ingress import state_dir as ingress_state_dir
from runtime.serving._judge import ArmWindow, Check, Disagreement, JudgeThresholds, Verdict, judge, window_metrics
from runtime.serving._metrics import MAX_LABEL_VALUES, ServingMetrics, exported_names, feature_buckets
from runtime.serving._parity import ParityReport, check_parity
from runtime.serving._predictor import Answer, Predictor, build_predictor_app, pin
from runtime.serving._rollout import (
    AnalysisSpec,
    RolloutResult,
    RolloutSpec,
    ShadowSpec,
    abort_rollout,
    deploy_rollout,
    promote_rollout,
    report_markdown,
    rollback_rollout,
    rollout_status,
    run_rollout,
)
from runtime.serving._router import ROLLOUT_METRICS, RolloutControl, Router, control_actor, pick_arm, stable_unit
from runtime.serving._routes import ROUTES, HealthRoute, PredictRoute, Route
from runtime.serving._wire import coalesce_response_writes

__all__ = [
    "APP_LOGGING",
    "ARROW_STREAM",
    "DEFAULT_API_KEY_ENV",
    "GRPC_STATUS",
    "JSON",
    "MAX_LABEL_VALUES",
    "PREDICT_METHOD",
    "ROLLOUT_METRICS",
    "ROUTES",
    "AnalysisSpec",
    "Answer",
    "ApiKeyAuth",
    "ArmWindow",
    "Check",
    "Disagreement",
    "HealthRoute",
    "HttpError",
    "JudgeThresholds",
    "ParityReport",
    "PredictReply",
    "PredictRequest",
    "PredictRoute",
    "Predictor",
    "RolloutControl",
    "RolloutResult",
    "RolloutSpec",
    "Route",
    "Router",
    "ServingMetrics",
    "ShadowSpec",
    "Verdict",
    "abort_rollout",
    "add_predictor_servicer",
    "bind_grpc_to_front_host",
    "buffered_requests",
    "build_predictor_app",
    "check_parity",
    "coalesce_response_writes",
    "control_actor",
    "decode_request",
    "deploy_config",
    "deploy_rollout",
    "encode_response",
    "exported_names",
    "feature_buckets",
    "grpc_status",
    "ingress_options",
    "ingress_state_dir",
    "is_arrow",
    "judge",
    "loopback_binds",
    "pick_arm",
    "pin",
    "predict_stub",
    "promote_rollout",
    "report_markdown",
    "rollback_rollout",
    "rollout_status",
    "run_app",
    "run_rollout",
    "stable_unit",
    "unwatched_disconnects",
    "validate_serve_config",
    "window_metrics",
]
