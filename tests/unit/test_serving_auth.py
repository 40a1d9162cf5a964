"""The bearer API key: off by default, from config or an env var, constant-time, never echoed."""

from __future__ import annotations

import json

import pytest

from runtime.errors import ConfigError
from runtime.serving import DEFAULT_API_KEY_ENV, ApiKeyAuth, HttpError

KEY = "k3y-0123456789abcdef-XYZ"


def rejected(auth: ApiKeyAuth, header: str | None) -> HttpError:
    with pytest.raises(HttpError) as info:
        auth.check(header)
    return info.value


def test_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DEFAULT_API_KEY_ENV, raising=False)
    auth = ApiKeyAuth.from_config(None, DEFAULT_API_KEY_ENV)
    assert not auth.enabled
    for header in (None, "", "Bearer anything", "Basic xyz"):
        auth.check(header)  # no key configured: every request passes


def test_right_key_passes_any_scheme_case() -> None:
    auth = ApiKeyAuth.from_config(KEY, None)
    for header in (f"Bearer {KEY}", f"bearer {KEY}", f"  BEARER   {KEY}  "):
        auth.check(header)


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Bearer ", f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", f"Basic {KEY}", KEY, "Bearer \u00e9\ud800"],
)
def test_wrong_missing_or_other_scheme_is_401_with_challenge(header: str | None) -> None:
    err = rejected(ApiKeyAuth.from_config(KEY, None), header)
    assert (err.status, err.field, err.value) == (401, "Authorization", None)
    assert err.headers == {"WWW-Authenticate": "Bearer"}
    assert err.rule == 'send "Authorization: Bearer <key>"'
    assert KEY not in err.body().decode() and KEY not in str(err)  # the key is never echoed
    assert set(json.loads(err.body())["error"]) == {"field", "row", "value", "rule"}


def test_key_from_env_var_default_and_custom_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEFAULT_API_KEY_ENV, KEY)
    auth = ApiKeyAuth.from_config(None)
    auth.check(f"Bearer {KEY}")
    assert rejected(auth, "Bearer nope").status == 401

    monkeypatch.setenv("MY_SERVE_KEY", "another-key-0123456789")
    custom = ApiKeyAuth.from_config(None, "MY_SERVE_KEY")
    custom.check("Bearer another-key-0123456789")
    assert rejected(custom, f"Bearer {KEY}").status == 401
    # a key in the config wins over the environment
    ApiKeyAuth.from_config("config-key-0123456789", "MY_SERVE_KEY").check("Bearer config-key-0123456789")


def test_weak_key_is_a_config_error_that_does_not_print_it(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="api_key: an API key must be at least 16 characters") as info:
        ApiKeyAuth.from_config("s3cret", None)
    assert "s3cret" not in str(info.value)
    monkeypatch.setenv(DEFAULT_API_KEY_ENV, "")  # set but empty: an error, not silently open
    with pytest.raises(ConfigError, match=rf"\${DEFAULT_API_KEY_ENV}"):
        ApiKeyAuth.from_config(None)


def test_repr_hides_the_key() -> None:
    assert KEY not in repr(ApiKeyAuth.from_config(KEY, None))
    assert repr(ApiKeyAuth.from_config(KEY, None)) == "ApiKeyAuth(enabled=True)"


def test_every_route_needs_the_key_but_health() -> None:
    from runtime.serving import ROUTES, Route

    assert {path for path, route in ROUTES.items() if not route.auth} == {"/healthz"}
    assert Route.auth  # the default: a new route needs the key unless it says otherwise
    assert ROUTES["/predict"].methods == {"POST"}


def test_a_configured_key_variable_that_is_missing_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SKEWLESS_MISSING_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"\$SKEWLESS_MISSING_KEY is not set"):
        ApiKeyAuth.for_app(None, "SKEWLESS_MISSING_KEY")
    assert not ApiKeyAuth.for_app(None, None).enabled  # nothing configured: off, as documented
    monkeypatch.setenv("SKEWLESS_MISSING_KEY", "k" * 32)
    assert ApiKeyAuth.for_app(None, "SKEWLESS_MISSING_KEY").enabled
