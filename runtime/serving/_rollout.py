"""Rollouts on Ray Serve: canary with automated analysis, sticky A/B, shadow; promotion and
rollback by alias, compare-and-swap.

The reference design is Argo Rollouts' steps and analysis plus Kayenta's judge. A rollout
resolves ``baseline`` (default: ``champion``) and ``candidate`` to versions once, deploys the
router (:mod:`runtime.serving._router`) in front of both pinned versions, and then, for a
canary, walks ``steps`` (percent of live traffic to the candidate). At each step it waits an
analysis window, reads the per-request samples of both arms from the application's
:class:`~runtime.serving.RolloutControl`, and judges the candidate against the baseline
(:func:`~runtime.serving.judge`: error rate, p99 latency, the arms' prediction distributions, and
shadow disagreement). A fail rolls back at once: traffic returns to the baseline, and the alias
too if it had moved. A window without enough requests is extended up to
``analysis.max_extensions`` times, then rolled back ("not enough traffic to judge"). After the
last step passes, ``champion`` moves to the candidate, compare-and-swap from the baseline
(:func:`~runtime.registry.move_alias`): the registry's champion names what production serves.
The baseline's deployment stays up at weight 0, so a later rollback is instant.

``strategy: shadow`` keeps all live traffic on the baseline and mirrors it to the candidate;
``strategy: ab`` splits by the sticky header at ``split`` percent. Both judge windows the same
way and move the alias only with ``promote_on_pass: true``.

Every rollout is an MLflow run (experiment ``skewless-rollouts``: parameters, each window's
figures as metrics, each verdict as JSON, the Markdown report) and its state (step, weights,
the judge's figures, the verdict so far) is readable from any process through the control
actor: :func:`rollout_status`. :func:`promote_rollout`, :func:`rollback_rollout` and :func:`abort_rollout` act from any
process too; a running :func:`run` sees the change and stops.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from runtime.config import ServeAppArgs, StrictModel, load_config
from runtime.errors import AliasConflictError, ConfigError, ServingError
from runtime.serving._judge import ArmWindow, Disagreement, JudgeThresholds, Verdict, judge, window_metrics

logger = logging.getLogger(__name__)

__all__ = [
    "EXPERIMENT",
    "AnalysisSpec",
    "RolloutResult",
    "RolloutSpec",
    "ShadowSpec",
    "abort_rollout",
    "deploy_rollout",
    "promote_rollout",
    "report_markdown",
    "rollback_rollout",
    "rollout_status",
    "run_rollout",
]

EXPERIMENT = "skewless-rollouts"
TERMINAL = ("promoted", "rolled_back", "aborted", "passed")
Progress = Callable[[str], None]


class ShadowSpec(StrictModel):
    """Mirror live traffic to the candidate; its answers are compared, never returned."""

    fraction: float = Field(default=1.0, gt=0.0, le=1.0, description="Share of live requests copied.")
    max_in_flight: int = Field(
        default=32, ge=1, description="Shadow calls at once per router replica; past it, dropped."
    )


class AnalysisSpec(StrictModel):
    window_s: float = Field(default=30.0, gt=0.0, description="Seconds of traffic judged at each step.")
    max_extensions: int = Field(
        default=3, ge=0, description="Windows added to a step without enough requests, before it rolls back."
    )
    thresholds: JudgeThresholds = Field(default_factory=JudgeThresholds)


class RolloutSpec(StrictModel):
    """A rollout (YAML): which versions, how traffic moves, how the candidate is judged."""

    app: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$", description="Serve application; route /<app>.")
    model: str = Field(min_length=1, description="Registered model name.")
    strategy: Literal["canary", "ab", "shadow"] = "canary"
    baseline: str = Field(default="champion", description="Alias or version number serving now.")
    candidate: str = Field(default="candidate", description="Alias or version number to roll out.")
    steps: list[float] = Field(default_factory=lambda: [5.0, 25.0, 50.0, 100.0], description="Canary percents.")
    split: float = Field(default=50.0, gt=0.0, lt=100.0, description="A/B: percent of keys on the candidate.")
    sticky_header: str = Field(default="x-skewless-key", description="A/B: the request key's header.")
    shadow: ShadowSpec | None = Field(default=None, description="Shadow settings (strategy shadow: defaults).")
    analysis: AnalysisSpec = Field(default_factory=AnalysisSpec)
    promote_on_pass: bool | None = Field(default=None, description="Move champion on a pass (canary: yes).")
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8000, ge=1, le=65535)
    app_args: dict[str, Any] = Field(default_factory=dict, description="Predictor args (max_batch_size, ...).")
    candidate_app_args: dict[str, Any] = Field(
        default_factory=dict, description="Predictor args for the candidate only, over app_args."
    )
    replicas: int = Field(default=1, ge=1, description="Replicas per model version.")
    router_replicas: int = Field(default=1, ge=1)
    arm_num_cpus: float = Field(default=0.5, gt=0.0)
    api_key_env: str | None = Field(default=None, description="Require this env var's key at the router.")
    retries: int = Field(default=2, ge=0, le=10, description="Retries of a prediction whose replica failed.")

    @model_validator(mode="after")
    def _check(self) -> RolloutSpec:
        if self.strategy == "canary":
            if not self.steps or any(not 0 < s <= 100 for s in self.steps):
                raise ValueError(f"steps {self.steps}: each a percent in (0, 100]")
            if any(b <= a for a, b in zip(self.steps, self.steps[1:], strict=False)):
                raise ValueError(f"steps {self.steps}: must increase")
            if self.steps[-1] != 100:
                raise ValueError(f"steps {self.steps}: the last must be 100 (the candidate takes all traffic)")
            if len(self.steps) < 2:
                raise ValueError(
                    f"steps {self.steps}: start below 100 (e.g. [5, 25, 50, 100]): the judge compares the candidate "
                    "with the baseline's traffic in the same or the previous window"
                )
        if "model_uri" in self.app_args or "model_uri" in self.candidate_app_args:
            raise ValueError("app_args.model_uri: set by the rollout from baseline and candidate; remove it")
        return self

    @property
    def promotes(self) -> bool:
        return self.promote_on_pass if self.promote_on_pass is not None else self.strategy == "canary"

    @property
    def shadow_settings(self) -> ShadowSpec | None:
        return self.shadow or (ShadowSpec() if self.strategy == "shadow" else None)


@dataclass(frozen=True)
class RolloutResult:
    outcome: str  # promoted | rolled_back | aborted | passed
    reason: str
    baseline: str
    candidate: str
    windows: list[dict[str, Any]]
    run_id: str | None
    report: Path | None


# --------------------------------------------------------------------------- deploy


def _version_uri(model: str, ref: str) -> str:
    return f"models:/{model}/{ref}" if ref.isdigit() else f"models:/{model}@{ref}"


def _arm(version: str) -> str:
    return f"v{version}"


def deploy_rollout(spec: RolloutSpec, progress: Progress = print) -> tuple[str, str, str]:
    """Resolve both versions (once), deploy the router in front of them with all live traffic on
    the baseline, and reset the application's control. Returns (baseline, candidate, endpoint)."""
    from ray import serve

    from runtime import registry
    from runtime.connect import connect
    from runtime.serving._deploy import run_app
    from runtime.serving._ingress import ingress_options
    from runtime.serving._predictor import Predictor
    from runtime.serving._router import Router, control_actor

    base = registry.resolve(_version_uri(spec.model, spec.baseline))
    cand = registry.resolve(_version_uri(spec.model, spec.candidate))
    if base.version == cand.version:
        raise ConfigError(
            f"baseline {spec.baseline!r} and candidate {spec.candidate!r} are both version {base.version} of "
            f"{spec.model}: nothing to roll out; register a new version or name another candidate"
        )
    connect()
    http = {"host": spec.http_host, "port": spec.http_port}
    serve.start(http_options=http, controller_options=ingress_options(http))
    arms = {_arm(base.version): base.version, _arm(cand.version): cand.version}
    shadow = spec.shadow_settings
    config = {
        "weights": {_arm(base.version): 100.0, _arm(cand.version): 0.0},
        "versions": arms,
        "sticky_header": spec.sticky_header if spec.strategy == "ab" else None,
        "shadow": None if shadow is None else {"arm": _arm(cand.version), **shadow.model_dump()},
        "salt": secrets.token_hex(16),  # per rollout: a client cannot compute which key lands where
    }
    control = control_actor(spec.app, config)
    import ray

    ray.get(control.set_config.remote(**config))
    handles = {}
    for arm, version in arms.items():
        extra = spec.candidate_app_args if version == cand.version else {}
        args = load_config(
            ServeAppArgs, {**spec.app_args, **extra, "model_uri": f"models:/{spec.model}/{version}"}, name="app_args"
        )
        handles[arm] = Predictor.options(  # type: ignore[attr-defined]
            name=f"{spec.model}-{arm}",
            num_replicas=spec.replicas,
            ray_actor_options={"num_cpus": spec.arm_num_cpus},
        ).bind(args.model_dump())
    router_args = {
        "app": spec.app,
        "control": config,
        "api_key": spec.app_args.get("api_key"),  # the arms' key, checked at the router (the HTTP front)
        "api_key_env": spec.api_key_env or spec.app_args.get("api_key_env"),
        "max_body_bytes": int(spec.app_args.get("max_body_bytes", 10 << 20)),
        "retries": spec.retries,
    }
    app = Router.options(num_replicas=spec.router_replicas).bind(handles, router_args)  # type: ignore[attr-defined]
    endpoint = f"http://{spec.http_host}:{spec.http_port}/{spec.app}"
    progress(f"deploying {spec.app}: baseline v{base.version}, candidate v{cand.version} at {endpoint}")
    run_app(app, name=spec.app, route_prefix=f"/{spec.app}")
    ray.get(
        control.update_state.remote(
            status="deployed",
            strategy=spec.strategy,
            model=spec.model,
            baseline=base.version,
            candidate=cand.version,
            endpoint=endpoint,
            step=None,
            windows=[],
            reason="",
            started_at=time.time(),
        )
    )
    return base.version, cand.version, endpoint


# --------------------------------------------------------------------------- judge a window


def _windows(
    data: dict[str, Any], base: str, cand: str, kind: str, base_data: dict[str, Any] | None = None
) -> tuple[ArmWindow, ArmWindow, Disagreement | None]:
    def arm_window(samples: list[tuple[Any, ...]], want: str) -> ArmWindow:
        chosen = [s for s in samples if s[2] == want]
        latencies = np.array([s[3] for s in chosen], dtype=np.float64)
        errors = sum(1 for s in chosen if s[4] >= 500)
        labels: list[Any] = []
        probs: list[float] = []
        for s in chosen:
            if s[4] == 200 and s[5] is not None:
                labels.extend(s[5])
                if s[6] is not None:
                    probs.extend(s[6])
        return ArmWindow(
            latencies_ms=latencies,
            errors=errors,
            requests=len(chosen),
            predictions=np.array(labels),
            probabilities=np.array(probs, dtype=np.float64) if probs and len(probs) == len(labels) else None,
        )

    source = base_data if base_data is not None else data
    baseline = arm_window(source["samples"].get(_arm(base), []), "live")
    canary = arm_window(data["samples"].get(_arm(cand), []), kind)
    shadows = [s for s in data["shadows"] if s[2] == _arm(cand)]
    disagreement = None
    if shadows:
        deltas = [d for s in shadows for d in s[5]]
        disagreement = Disagreement(
            pairs=sum(s[3] for s in shadows),
            label_flips=sum(s[4] for s in shadows),
            prob_deltas=np.array(deltas, dtype=np.float64) if deltas else None,
        )
    return baseline, canary, disagreement


def _figures(baseline: ArmWindow, canary: ArmWindow, verdict: Verdict) -> dict[str, Any]:
    return {
        "baseline": window_metrics(baseline),
        "candidate": window_metrics(canary),
        "checks": {c.name: c.value for c in verdict.checks},
    }


# --------------------------------------------------------------------------- the loop


def run_rollout(spec: RolloutSpec, progress: Progress = print, poll_s: float = 0.5) -> RolloutResult:
    """Deploy, walk the steps judging each window, then promote or roll back (see the module).

    An unexpected error (the tracking server down, the cluster gone) returns all traffic to the
    baseline, marks the rollout ``failed`` and re-raises: never a candidate left at a partial weight.
    """
    import ray

    from runtime.serving._router import control_actor

    base, cand, _ = deploy_rollout(spec, progress)
    control = control_actor(spec.app)
    run_id = _start_run(spec, base, cand)
    ray.get(control.update_state.remote(status="running", run_id=run_id))
    try:
        return _steps(spec, progress, poll_s, control, base, cand, run_id)
    except BaseException as exc:
        try:
            state = ray.get(control.transition.remote(["running"], "failed", reason=f"error: {exc}"))
            if state is not None:
                ray.get(control.set_config.remote(weights={_arm(base): 100.0, _arm(cand): 0.0}, shadow=None))
                progress(f"failed ({type(exc).__name__}: {exc}); all traffic back on v{base}")
        except Exception:
            logger.exception("could not return traffic to the baseline after an error")
        raise


def _steps(
    spec: RolloutSpec, progress: Progress, poll_s: float, control: Any, base: str, cand: str, run_id: str | None
) -> RolloutResult:
    import ray

    thresholds = spec.analysis.thresholds
    if spec.strategy == "canary":
        plan = list(spec.steps)
    elif spec.strategy == "ab":
        plan = [spec.split]
    else:
        plan = [0.0]
    kind = "shadow" if spec.strategy == "shadow" else "live"
    windows: list[dict[str, Any]] = []
    previous: tuple[float, float, int] | None = None  # the last window in which the baseline had traffic
    for index, weight in enumerate(plan):
        stopped = _stopped(control)
        if stopped is not None:
            return _finish(
                spec, stopped["status"], stopped.get("reason", ""), base, cand, windows, run_id, external=True
            )
        weights = {_arm(base): 100.0 - weight, _arm(cand): weight}
        version = int(ray.get(control.set_config.remote(weights=weights)))
        ray.get(control.update_state.remote(step=index, step_weight=weight, weights=weights))
        progress(f"step {index + 1}/{len(plan)}: {weight:g}% of live traffic to v{cand} ({spec.strategy})")
        since = time.time()
        for extension in range(spec.analysis.max_extensions + 1):
            stopped = _wait(control, since + spec.analysis.window_s * (extension + 1), poll_s)
            if stopped is not None:
                return _finish(
                    spec, stopped["status"], stopped.get("reason", ""), base, cand, windows, run_id, external=True
                )
            until = time.time()
            data = ray.get(control.window.remote(since, until, version))  # routed by this step's weights
            base_data = None
            if weights[_arm(base)] == 0 and previous is not None:
                base_data = ray.get(control.window.remote(*previous))
            baseline, canary, disagreement = _windows(data, base, cand, kind, base_data)
            verdict = judge(baseline, canary, thresholds, disagreement)
            record = {
                "step": index,
                "weight": weight,
                "since": since,
                "until": until,
                "outcome": verdict.outcome,
                "verdict": verdict.to_dict(),
                **_figures(baseline, canary, verdict),
            }
            windows.append(record)
            ray.get(control.update_state.remote(windows=windows, verdict=verdict.outcome))
            _log_window(run_id, len(windows) - 1, record)
            progress("  " + verdict.summary().replace("\n", "\n  "))
            if verdict.outcome != "inconclusive":
                break
        if verdict.outcome == "fail":
            failed = [c for c in verdict.checks if c.passed is False]
            reason = f"step {index + 1} ({weight:g}%): " + "; ".join(c.detail for c in failed)
            rollback_rollout(spec, reason, progress=progress)
            return _finish(spec, "rolled_back", reason, base, cand, windows, run_id)
        if verdict.outcome == "inconclusive":
            reason = (
                f"step {index + 1} ({weight:g}%): not enough traffic to judge after "
                f"{spec.analysis.max_extensions + 1} windows of {spec.analysis.window_s:g} s "
                f"(min_requests {thresholds.min_requests} per arm)"
            )
            rollback_rollout(spec, reason, progress=progress)
            return _finish(spec, "rolled_back", reason, base, cand, windows, run_id)
        if weights[_arm(base)] > 0:
            previous = (since, time.time(), version)
    reason = f"every window passed ({len(windows)})"
    stopped = _stopped(control)
    if stopped is not None:
        return _finish(spec, stopped["status"], stopped.get("reason", ""), base, cand, windows, run_id, external=True)
    if spec.promotes:
        try:
            promote_rollout(spec, reason, progress=progress)
        except AliasConflictError as exc:
            rollback_rollout(spec, f"the champion moved during the rollout: {exc}", progress=progress)
            return _finish(spec, "rolled_back", str(exc), base, cand, windows, run_id)
        return _finish(spec, "promoted", reason, base, cand, windows, run_id)
    return _finish(spec, "passed", reason, base, cand, windows, run_id)


def _stopped(control: Any) -> dict[str, Any] | None:
    """The state, once final, if someone else (an operator) took the rollout out of ``running``."""
    import ray

    state = ray.get(control.get_state.remote())
    if state.get("status") == "running":
        return None
    deadline = time.time() + 120  # their promote/rollback/abort is finishing: wait for its outcome
    while state.get("status") not in TERMINAL and time.time() < deadline:
        time.sleep(0.2)
        state = ray.get(control.get_state.remote())
    return dict(state)


def _wait(control: Any, deadline: float, poll_s: float) -> dict[str, Any] | None:
    """Sleep until ``deadline``; the final state if someone else ended the rollout meanwhile."""
    while time.time() < deadline:
        stopped = _stopped(control)
        if stopped is not None:
            return stopped
        time.sleep(min(poll_s, max(0.0, deadline - time.time())))
    return None


# --------------------------------------------------------------------------- actions


def _state(app: str) -> tuple[Any, dict[str, Any]]:
    import ray

    from runtime.connect import connect
    from runtime.serving._router import control_actor

    connect()
    from runtime.registry import configure_mlflow

    configure_mlflow()  # alias moves go to the project's store, whatever the working directory
    try:
        control = control_actor(app)
    except ValueError:
        raise ServingError(
            f"no rollout for application {app!r} on this cluster; start one with `skewless serve rollout start <spec>`"
        ) from None
    return control, ray.get(control.get_state.remote())


def _actor() -> str:
    from runtime.registry import default_actor

    return f"{default_actor()} (skewless rollout)"


def _claim(control: Any, allowed: list[str], status: str, what: str) -> dict[str, Any]:
    """Take the rollout from one of ``allowed`` to ``status`` (compare-and-swap), or refuse."""
    import ray

    state = ray.get(control.transition.remote(allowed, status))
    if state is None:
        now = ray.get(control.get_state.remote()).get("status")
        raise ServingError(f"cannot {what}: the rollout is {now} (allowed from: {', '.join(allowed)})")
    return dict(state)


def promote_rollout(spec: RolloutSpec, reason: str, progress: Progress = print) -> None:
    """All traffic to the candidate; ``champion`` from the baseline to it (compare-and-swap)."""
    import ray

    from runtime import registry

    control, _ = _state(spec.app)
    before = ray.get(control.get_state.remote()).get("status")
    state = _claim(control, ["deployed", "running", "passed"], "promoting", "promote")
    base, cand = state["baseline"], state["candidate"]
    try:
        move = registry.move_alias(spec.model, registry.CHAMPION, cand, expected=base, reason=reason, actor=_actor())
    except BaseException:
        ray.get(control.transition.remote(["promoting"], before))  # nothing moved: as it was
        raise
    ray.get(control.set_config.remote(weights={_arm(base): 0.0, _arm(cand): 100.0}, shadow=None, sticky_header=None))
    ray.get(control.update_state.remote(status="promoted", reason=reason, alias_move=move.seq))
    progress(f"promoted: champion v{base} -> v{cand}; all traffic on v{cand} ({reason})")


def rollback_rollout(spec: RolloutSpec, reason: str, progress: Progress = print) -> None:
    """All traffic back to the baseline; ``champion`` back to it if it had moved to the candidate."""
    import ray

    from runtime import registry

    control, _ = _state(spec.app)
    state = _claim(control, ["deployed", "running", "passed", "promoted"], "rolling_back", "roll back")
    base, cand = state["baseline"], state["candidate"]
    ray.get(control.set_config.remote(weights={_arm(base): 100.0, _arm(cand): 0.0}, shadow=None, sticky_header=None))
    champion = registry.current_champion(spec.model)
    if champion is not None and champion.version == cand:
        registry.move_alias(
            spec.model, registry.CHAMPION, base, expected=cand, reason=f"rollback: {reason}", actor=_actor()
        )
    ray.get(control.update_state.remote(status="rolled_back", reason=reason))
    progress(f"rolled back: all traffic on v{base}, champion v{base} ({reason})")


def abort_rollout(spec: RolloutSpec, reason: str = "aborted by the operator", progress: Progress = print) -> None:
    """Stop the analysis and return traffic to the baseline; the alias is left where it is."""
    import ray

    control, _ = _state(spec.app)
    state = _claim(control, ["deployed", "running", "passed"], "aborting", "abort")
    base, cand = state["baseline"], state["candidate"]
    ray.get(control.set_config.remote(weights={_arm(base): 100.0, _arm(cand): 0.0}, shadow=None, sticky_header=None))
    ray.get(control.update_state.remote(status="aborted", reason=reason))
    progress(f"aborted: all traffic on v{base} ({reason})")


def rollout_status(app: str) -> dict[str, Any]:
    """The rollout's state: status, versions, step, weights, each window's figures and verdict."""
    _, state = _state(app)
    return state


# --------------------------------------------------------------------------- MLflow and the report


def _start_run(spec: RolloutSpec, base: str, cand: str) -> str | None:
    try:
        import mlflow

        from runtime.registry import configure_mlflow, ensure_experiment

        configure_mlflow()
        client = mlflow.MlflowClient()
        run = client.create_run(ensure_experiment(EXPERIMENT), run_name=f"{spec.app}: v{base} -> v{cand}")
        params = {
            "app": spec.app,
            "model": spec.model,
            "strategy": spec.strategy,
            "baseline_version": base,
            "candidate_version": cand,
            "steps": json.dumps(spec.steps),
            "window_s": spec.analysis.window_s,
            **{f"threshold.{k}": v for k, v in spec.analysis.thresholds.model_dump().items()},
        }
        for key, value in params.items():
            client.log_param(run.info.run_id, key, value)
        return str(run.info.run_id)
    except Exception as exc:  # tracking is a record, not a gate on serving
        logger.warning("could not start the rollout's MLflow run: %s", exc)
        return None


def _log_window(run_id: str | None, index: int, record: dict[str, Any]) -> None:
    if run_id is None:
        return
    import math

    import mlflow

    client = mlflow.MlflowClient()
    metrics = {"candidate_weight": record["weight"]}
    for arm in ("baseline", "candidate"):
        metrics.update({f"{arm}.{k}": v for k, v in record[arm].items()})
    metrics.update({f"check.{k}": v for k, v in record["checks"].items() if v is not None})
    for key, value in metrics.items():
        if value is not None and math.isfinite(float(value)):
            client.log_metric(run_id, key, float(value), step=index)
    client.log_dict(run_id, record["verdict"], f"verdicts/window_{index:03d}.json")


def report_markdown(spec: RolloutSpec, result: RolloutResult) -> str:
    lines = [
        f"# Rollout of {spec.model} on {spec.app}: {result.outcome}",
        "",
        f"- strategy: {spec.strategy}; baseline v{result.baseline}; candidate v{result.candidate}",
        f"- outcome: **{result.outcome}**: {result.reason}",
        f"- MLflow run: {result.run_id or 'not recorded'}",
        "",
        "| window | candidate % | verdict | baseline req / err % / p99 ms | candidate req / err % / p99 ms |",
        "|---|---|---|---|---|",
    ]

    def arm(m: dict[str, float]) -> str:
        return f"{m['requests']:.0f} / {100 * m['error_rate']:.2f} / {m['p99_ms']:.1f}"

    for i, w in enumerate(result.windows):
        lines.append(f"| {i + 1} | {w['weight']:g} | {w['outcome']} | {arm(w['baseline'])} | {arm(w['candidate'])} |")
    for i, w in enumerate(result.windows):
        lines += ["", f"## Window {i + 1} ({w['weight']:g}%): {w['outcome']}", ""]
        lines += [
            f"- {'pass' if c['passed'] else 'FAIL' if c['passed'] is False else 'n/a'} {c['name']}: {c['detail']}"
            for c in w["verdict"]["checks"]
        ]
    return "\n".join(lines) + "\n"


def _finish(
    spec: RolloutSpec,
    outcome: str,
    reason: str,
    base: str,
    cand: str,
    windows: list[dict[str, Any]],
    run_id: str | None,
    external: bool = False,
) -> RolloutResult:
    """Write the report and close the MLflow run; ``external``: an operator's action ended the
    rollout and set its status already."""
    import ray

    from runtime.registry import skewless_home
    from runtime.serving._router import control_actor

    result = RolloutResult(outcome, reason, base, cand, windows, run_id, None)
    directory = skewless_home() / "rollouts"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{spec.app}-v{base}-v{cand}-{time.strftime('%Y%m%d-%H%M%S')}.md"
    path.write_text(report_markdown(spec, result))
    if run_id is not None:
        try:
            import mlflow

            client = mlflow.MlflowClient()
            client.log_artifact(run_id, str(path), "report")
            client.set_tag(run_id, "skewless.rollout.outcome", outcome)
            client.set_tag(run_id, "skewless.rollout.reason", reason[:4000])
            client.set_terminated(run_id, "FINISHED")
        except Exception as exc:
            logger.warning("could not finish the rollout's MLflow run: %s", exc)
    changes = {"report": str(path)} if external else {"status": outcome, "reason": reason, "report": str(path)}
    ray.get(control_actor(spec.app).update_state.remote(**changes))
    return RolloutResult(outcome, reason, base, cand, windows, run_id, path)
