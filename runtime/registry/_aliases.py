"""Alias moves as compare-and-swap, each recorded in the registry.

:func:`move_alias` says where the caller expects the alias to point (``expected``; None: unset)
and moves it only if it still points there, else raises :class:`AliasConflictError`. Two
trainings that both beat v1 cannot both become champion, and a rollback made while a training
evaluated is not overwritten. A move to where the alias already points (and ``expected`` says
so) succeeds without writing anything.

**The lock.** MLflow has no conditional update, so the read and the move happen under a lock
made of the one atomic operation its SQL store and its tracking server both offer: creating a
registered model whose name is taken fails with ``RESOURCE_ALREADY_EXISTS`` (a unique
constraint in the database). One lock covers all aliases of a model: the lock of model ``name``
is the registered model ``<name>.alias-lock`` (:func:`lock_name`), tagged ``owner``, ``pid``, ``host``, ``token`` and
``expires_at`` (epoch seconds: a lease of :data:`LEASE_S`, where the move takes milliseconds);
releasing it deletes it. It exists only while a move runs, so listings of registered models
(the MLflow UI, ``search_registered_models``) show it only then, or when its owner died.

A lock whose lease ended is broken: deleted, with a warning naming its owner. Breaking happens
under a second lock, ``<name>.alias-lock.break-<the stale lock's token>``, and only while the
lock still carries that token: two waiters that both saw the lease end cannot delete each
other's fresh lock. A lock without a readable ``expires_at`` (a registered model of that name
that skewless did not make) is never broken: waiting for it ends in
:class:`AliasLockTimeoutError`. Leases compare the holder's clock with the waiter's: hosts'
clocks must agree to well within a lease. A holder still running when its lease ends has lost
the lock; it releases only a lock that still carries its token.

**The history.** Every move that changes an alias writes one tag on the registered model,
``skewless.alias_move.<seq, 6 digits>``, whose value is the :class:`AliasMove` as compact JSON
(``reason`` cut to :data:`MAX_REASON` characters, so a record stays well inside the 5,000
characters MLflow's database column holds); :func:`alias_history` reads them back. The record
is written just before the alias moves (and removed if the move then fails), so a move is never
without its record. Moves made around skewless (the MLflow UI or client, :func:`set_alias`)
take no lock and are not recorded; one that lands in the milliseconds between a move's read
and its write is overwritten.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from runtime.errors import AliasConflictError, AliasLockTimeoutError, ModelNotFoundError, RegistryError

logger = logging.getLogger(__name__)

LOCK_SUFFIX = ".alias-lock"
LEASE_S = 60.0
HISTORY_PREFIX = "skewless.alias_move."
MAX_REASON = 500
_MAX_ACTOR = 200
_BREAK = ".break-"
_POLL_S = (0.1, 0.5)  # a waiter sleeps a random time in this range between tries
_EXISTS, _MISSING = "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"


@dataclass(frozen=True)
class AliasMove:
    """One move of an alias. ``from_version`` None: the alias was unset. ``seq`` numbers the
    model's records from 1; 0 for a move that changed nothing and so was not recorded."""

    model: str
    alias: str
    from_version: str | None
    to_version: str
    actor: str
    reason: str
    at: float  # epoch seconds
    seq: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> AliasMove:
        d = json.loads(text)
        return cls(
            model=str(d["model"]),
            alias=str(d["alias"]),
            from_version=None if d["from_version"] is None else str(d["from_version"]),
            to_version=str(d["to_version"]),
            actor=str(d["actor"]),
            reason=str(d["reason"]),
            at=float(d["at"]),
            seq=int(d["seq"]),
        )


def lock_name(name: str) -> str:
    """The registered model that locks ``name``'s aliases while one moves."""
    return f"{name}{LOCK_SUFFIX}"


def default_actor() -> str:
    """``user@host`` of this process (``uid-<n>@host`` in a container whose user has no name)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no $USER and no passwd entry for this uid
        user = f"uid-{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def move_alias(
    name: str,
    alias: str,
    to_version: str | int,
    *,
    expected: str | int | None,
    reason: str,
    actor: str | None = None,
    lock_timeout_s: float = 30.0,
) -> AliasMove:
    """Point ``alias`` of model ``name`` at ``to_version`` if it points at ``expected`` now
    (None: unset), and record the move in the model's history.

    Raises :class:`AliasConflictError` when it points elsewhere (nothing changes),
    :class:`AliasLockTimeoutError` when another move holds the lock past ``lock_timeout_s``,
    :class:`ModelNotFoundError` when the model or the version does not exist. ``actor``
    defaults to ``user@host``.
    """
    import mlflow

    client = mlflow.MlflowClient()
    who = (actor or default_actor())[:_MAX_ACTOR]
    to, want = str(to_version), None if expected is None else str(expected)
    with _locked(client, name, who, lock_timeout_s):
        model = _registered_model(client, name)
        aliases = dict(model.aliases or {})
        now = str(aliases[alias]) if alias in aliases else None
        if now != want:
            raise AliasConflictError(name, alias, now, want)
        seq = 0 if now == to else _last_seq(dict(model.tags or {})) + 1
        move = AliasMove(name, alias, now, to, who, reason[:MAX_REASON], time.time(), seq)
        if now == to:
            return move
        _mlflow_call(f"models:/{name}/{to}", client.get_model_version, name, to)
        key = f"{HISTORY_PREFIX}{seq:06d}"
        _mlflow_call(f"model {name!r}", client.set_registered_model_tag, name, key, move.to_json())
        try:
            _mlflow_call(f"models:/{name}@{alias}", client.set_registered_model_alias, name, alias, to)
        except RegistryError:
            _forget(client, name, key)
            raise
    return move


def alias_history(name: str, alias: str | None = None) -> list[AliasMove]:
    """The recorded moves of model ``name``'s aliases (of ``alias`` only, when given), oldest first."""
    import mlflow

    model = _registered_model(mlflow.MlflowClient(), name)
    moves = []
    for key, value in sorted(dict(model.tags or {}).items()):
        if not key.startswith(HISTORY_PREFIX):
            continue
        try:
            move = AliasMove.from_json(value)
        except (ValueError, KeyError, TypeError) as exc:
            raise RegistryError(
                f"model {name!r}: tag {key} is not an alias-move record ({exc}: {value[:80]!r}); "
                "restore it or delete the tag"
            ) from None
        if alias is None or move.alias == alias:
            moves.append(move)
    return sorted(moves, key=lambda m: m.seq)


def _last_seq(tags: dict[str, str]) -> int:
    seqs = [
        int(k[len(HISTORY_PREFIX) :])
        for k in tags
        if k.startswith(HISTORY_PREFIX) and k[len(HISTORY_PREFIX) :].isdigit()
    ]
    return max(seqs, default=0)


def _registered_model(client: Any, name: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == _MISSING:
            raise ModelNotFoundError(f"no registered model {name!r}: {exc.message}") from None
        raise RegistryError(f"model {name!r}: cannot read it from the registry: {exc.message}") from exc


def _mlflow_call(what: str, fn: Any, *args: Any) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return fn(*args)
    except MlflowException as exc:
        if exc.error_code == _MISSING:
            raise ModelNotFoundError(f"{what}: not found in the registry: {exc.message}") from None
        raise RegistryError(f"{what}: {exc.message}") from exc


def _forget(client: Any, name: str, key: str) -> None:
    try:
        client.delete_registered_model_tag(name, key)
    except Exception as exc:  # the alias did not move; a record saying it did must not stay silent
        logger.warning("model %r: the alias did not move, but its history record %s stays: %s", name, key, exc)


# -- the lock ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Holder:
    """Who holds a lock, from its tags (expires_at None: not a lock skewless made)."""

    owner: str
    host: str
    pid: str
    token: str
    expires_at: float | None

    @classmethod
    def of(cls, model: Any) -> _Holder:
        tags = dict(model.tags or {})
        try:
            expires: float | None = float(tags["expires_at"])
        except (KeyError, ValueError):
            expires = None
        # a lock made by hand may have no token: its creation time tells it from its successors
        token = tags.get("token") or f"c{model.creation_timestamp}"
        return cls(tags.get("owner", "?"), tags.get("host", "?"), tags.get("pid", "?"), token, expires)

    def expired(self) -> bool:
        return self.expires_at is not None and self.expires_at <= time.time()

    def describe(self) -> str:
        return f"{self.owner} (pid {self.pid} on {self.host})"


def _lock_tags(actor: str, token: str, lease_s: float) -> dict[str, str]:
    return {
        "owner": actor,
        "pid": str(os.getpid()),
        "host": socket.gethostname(),
        "token": token,
        "expires_at": f"{time.time() + lease_s:.3f}",
    }


@contextmanager
def _locked(client: Any, name: str, actor: str, timeout_s: float, lease_s: float = LEASE_S) -> Iterator[None]:
    lock = lock_name(name)
    token = _acquire(client, lock, actor, timeout_s, lease_s)
    try:
        yield
    finally:
        _release(client, lock, token, lease_s)


def _acquire(client: Any, lock: str, actor: str, timeout_s: float, lease_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    token = secrets.token_hex(8)
    while True:
        won, holder = _claim(client, lock, _lock_tags(actor, token, lease_s))
        if won:
            return token
        if holder is None:
            continue  # released between our try and our look: try again now
        if holder.expired() and _break(client, lock, holder, actor, lease_s):
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            raise AliasLockTimeoutError(_timeout_message(lock, holder, timeout_s))
        time.sleep(min(random.uniform(*_POLL_S), left))


def _claim(client: Any, lock: str, tags: dict[str, str]) -> tuple[bool, _Holder | None]:
    """Create the lock model: (True, None) when this call holds it, else (False, its holder),
    holder None when it went away in between."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(
            lock, tags=tags, description="skewless: held while an alias moves; delete it if its owner is gone"
        )
        return True, None
    except MlflowException as exc:
        # MLflow's SQL store answers a taken name by reading the existing model, which raises
        # RESOURCE_DOES_NOT_EXIST when it was deleted in between
        if exc.error_code not in (_EXISTS, _MISSING):
            raise RegistryError(f"cannot take the alias lock {lock!r}: {exc.message}") from exc
    holder = _holder(client, lock)
    if holder is not None and holder.token == tags["token"]:
        return True, None  # our create went through, and a retry of it found it there
    return False, holder


def _holder(client: Any, lock: str) -> _Holder | None:
    from mlflow.exceptions import MlflowException

    try:
        return _Holder.of(client.get_registered_model(lock))
    except MlflowException as exc:
        if exc.error_code == _MISSING:
            return None
        raise RegistryError(f"cannot read the alias lock {lock!r}: {exc.message}") from exc


def _delete(client: Any, lock: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model(lock)
    except MlflowException as exc:
        if exc.error_code != _MISSING:
            raise RegistryError(f"cannot delete the alias lock {lock!r}: {exc.message}") from exc


def _break(client: Any, lock: str, stale: _Holder, actor: str, lease_s: float) -> bool:
    """Delete ``lock`` if it still is ``stale``; True when it is gone. Only the one waiter that
    creates ``<lock>.break-<token>`` may delete it."""
    breaker = f"{lock}{_BREAK}{stale.token}"
    token = secrets.token_hex(8)
    won, other = _claim(client, breaker, _lock_tags(actor, token, lease_s))
    if not won:
        if other is not None and other.expired():
            _delete(client, breaker)  # a waiter died while it broke the lock
        return False
    try:
        now = _holder(client, lock)
        if now is None or now.token != stale.token:
            return True  # another waiter broke it already
        logger.warning(
            "breaking the alias lock %r held by %s: its lease ended at %s", lock, stale.describe(), _when(stale)
        )
        _delete(client, lock)
        return True
    finally:
        _delete(client, breaker)


def _release(client: Any, lock: str, token: str, lease_s: float) -> None:
    try:
        holder = _holder(client, lock)
        if holder is None or holder.token != token:
            logger.warning(
                "the alias lock %r was broken while this process held it (its lease of %s s ended)", lock, lease_s
            )
            return
        _delete(client, lock)
    except Exception as exc:  # the move is done; the lock's lease ends it
        logger.warning("cannot release the alias lock %r (%s); it is broken when its lease ends", lock, exc)


def _when(holder: _Holder) -> str:
    if holder.expires_at is None:
        return "never (no expires_at tag)"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(holder.expires_at))
    left = holder.expires_at - time.time()
    return f"{stamp} ({left:.0f} s from now)" if left >= 0 else f"{stamp} ({-left:.0f} s ago)"


def _timeout_message(lock: str, holder: _Holder, timeout_s: float) -> str:
    if holder.expires_at is None:
        return (
            f"the registered model {lock!r} blocks alias moves: it has no expires_at tag, so skewless did not make "
            f"it as a lock (owner tag: {holder.owner}); rename or delete that registered model"
        )
    return (
        f"the alias lock {lock!r} is still held by {holder.describe()} after {timeout_s:g} s; its lease ends "
        f"{_when(holder)}. Retry later; if its owner is gone, delete the registered model {lock!r}"
    )
