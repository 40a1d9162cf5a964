"""A bearer API key for the predictor: off unless a key is configured.

The key comes from the Serve app args or from an environment variable (so it can live in
a secret store, not in a YAML file). It is compared in constant time and never logged,
echoed or put in an error body. Which routes need it is the route table's call
(:data:`runtime.serving.ROUTES`): health stays open so probes need no secret.
"""

from __future__ import annotations

import hmac
import os

from runtime.errors import ConfigError
from runtime.serving._codec import HttpError

__all__ = ["DEFAULT_API_KEY_ENV", "ApiKeyAuth"]

DEFAULT_API_KEY_ENV = "SKEWLESS_API_KEY"
_CHALLENGE = {"WWW-Authenticate": "Bearer"}
_RULE = 'send "Authorization: Bearer <key>"'


class ApiKeyAuth:
    """Checks ``Authorization: Bearer <key>``; with no key configured every request passes."""

    def __init__(self, key: str | None) -> None:
        self._key = None if key is None else key.encode()

    @classmethod
    def from_config(cls, api_key: str | None, api_key_env: str | None = DEFAULT_API_KEY_ENV) -> ApiKeyAuth:
        """``api_key`` if given, else the variable ``api_key_env`` if set; neither: auth off."""
        if api_key is not None:
            return cls(_checked(api_key, "api_key"))
        value = os.environ.get(api_key_env) if api_key_env else None
        if value is None:
            return cls(None)
        return cls(_checked(value, f"${api_key_env}"))

    @classmethod
    def for_app(cls, api_key: str | None, api_key_env: str | None) -> ApiKeyAuth:
        """:meth:`from_config` for a Serve app's args: a configured ``api_key_env`` that is not
        set is an error, not an open endpoint."""
        auth = cls.from_config(api_key, api_key_env)
        if api_key_env and not auth.enabled:
            raise ConfigError(
                f"api_key_env: ${api_key_env} is not set in this replica's environment; set it in the "
                "Serve config's runtime_env (env_vars) or on every node, or remove api_key_env"
            )
        return auth

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def __repr__(self) -> str:  # never the key
        return f"ApiKeyAuth(enabled={self.enabled})"

    def check(self, authorization_header: str | None) -> None:
        """Return if the header carries the key; else raise a 401 with ``WWW-Authenticate``."""
        if self._key is None:
            return
        scheme, _, token = (authorization_header or "").strip().partition(" ")
        # compare_digest on bytes: constant time in the key's content, and no str/ASCII error
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode("utf-8", "surrogatepass"), self._key
        ):
            raise HttpError(401, "Authorization", None, _RULE, headers=_CHALLENGE)


def _checked(key: str, source: str) -> str:
    """A usable key; the error names where it came from, never the value."""
    stripped = key.strip()
    if len(stripped) < 16 or any(c.isspace() for c in stripped):
        raise ConfigError(
            f"{source}: an API key must be at least 16 characters with no whitespace "
            f"(got {len(stripped)} characters); generate one with `python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))'`"
        )
    return stripped
