"""PKCS#11 sessions for asyncio services: login, reuse, dispatch, and error mapping.

This is the one module that touches ``pkcs11`` sessions and the one place where
``pkcs11.exceptions`` become typed errors. Two dispatch modes exist because the numbers
decide between them (README, performance notes):

- ``inline``: calls run on the event loop thread with one session. SoftHSM's AES-GCM on a
  few KB costs tens of microseconds, less than a hop to a thread and back. A call marked
  ``slow`` (key-pair generation: over a second for RSA-3072) runs on a thread instead, and
  while it holds the module, inline calls wait for it on threads too, not on the loop.
- ``threads``: calls run on a bounded thread pool with one session per worker thread, so
  a slow call (RSA signing, key generation, a remote HSM) does not stall the loop. Calls
  into the module are still serialised (see ``_MODULE_LOCKS``): SoftHSM2 as python-pkcs11
  initialises it is not thread-safe.

Login state in PKCS#11 belongs to the application, not the session: the pool logs in once on
a session it keeps open for its whole life, and every other session inherits the login.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final, TypeVar

import pkcs11
from pkcs11 import exceptions as p11e

__all__ = [
    "DispatchMode",
    "HSMDataInvalid",
    "HSMError",
    "HSMKeyMissing",
    "HSMKeyUsageNotPermitted",
    "HSMPoolExhausted",
    "HSMUnavailable",
    "PKCS11Pool",
    "PoolConfig",
    "SessionContext",
    "aes_gcm",
]

log = logging.getLogger("shared.pkcs11")
T = TypeVar("T")


class HSMError(Exception):
    """The token failed in a way the caller cannot fix."""


class HSMUnavailable(HSMError):
    """The token or session is gone; the session was evicted and will be reopened."""


class HSMKeyUsageNotPermitted(HSMError):
    """The key's attributes forbid this operation (``CKR_KEY_FUNCTION_NOT_PERMITTED``)."""


class HSMDataInvalid(HSMError):
    """The input data is wrong for the key, e.g. a GCM tag that does not verify."""


class HSMKeyMissing(HSMError):
    """A key object that was found before no longer exists in the token."""


class HSMPoolExhausted(HSMError):
    """More calls are waiting than the pool accepts; the caller should shed load."""


class DispatchMode(StrEnum):
    INLINE = "inline"
    THREADS = "threads"


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """Where the token is and how to use it."""

    module: str
    token_label: str
    user_pin: str = field(repr=False)
    mode: DispatchMode = DispatchMode.INLINE
    # Worker threads (threads mode). SoftHSM work is CPU-bound: more workers than cores only
    # queue inside the library.
    workers: int = 2
    # Calls allowed to wait for a worker before HSMPoolExhausted is raised.
    max_pending: int = 256


# Errors that say nothing about the session: it stays usable (spec'd PKCS#11 data errors).
_DATA_ERRORS: Final = (
    p11e.EncryptedDataInvalid,
    p11e.EncryptedDataLenRange,
    p11e.DataInvalid,
    p11e.DataLenRange,
    p11e.MechanismParamInvalid,
)
# Errors after which the session (or the whole token) cannot be trusted any more.
_SESSION_ERRORS: Final = (
    p11e.SessionHandleInvalid,
    p11e.SessionClosed,
    p11e.DeviceError,
    p11e.DeviceRemoved,
    p11e.DeviceMemory,
    p11e.TokenNotPresent,
    p11e.TokenNotRecognised,
    p11e.UserNotLoggedIn,
)


class SessionContext:
    """One session and the key objects found through it.

    Key handles are valid in every session of the application, but python-pkcs11 binds each
    object to the session that found it, so each session keeps its own cache.
    """

    def __init__(self, session: Any) -> None:
        self.session = session
        self._keys: dict[tuple[str, bytes], Any] = {}
        self._generation = _handles.generation

    def secret_key(self, label: str, key_id: bytes) -> Any:
        """Find a token secret key by label and CKA_ID, cached.

        :raises HSMKeyMissing: if there is not exactly one such key.
        """
        if self._generation != _handles.generation:
            # Some session met a handle of a destroyed object: no cached handle is trusted.
            self._keys.clear()
            self._generation = _handles.generation
        key = self._keys.get((label, key_id))
        if key is None:
            found = list(self.session.get_objects({
                pkcs11.Attribute.CLASS: pkcs11.ObjectClass.SECRET_KEY,
                pkcs11.Attribute.LABEL: label,
                pkcs11.Attribute.ID: key_id,
                pkcs11.Attribute.TOKEN: True,
            }))
            if len(found) != 1:
                raise HSMKeyMissing(f"{len(found)} token keys match label {label!r}")
            key = self._keys[(label, key_id)] = found[0]
        return key

    def forget_keys(self) -> None:
        self._keys.clear()


class _HandleGeneration:
    """Bumped when any session finds a cached object handle invalid."""

    generation = 0


_handles = _HandleGeneration()


def aes_gcm(key: Any, data: bytes, *, iv: bytes, aad: bytes, decrypt: bool) -> bytes:
    """AES-GCM with a 128-bit tag at the end of the ciphertext.

    :raises HSMKeyUsageNotPermitted: if the key's CKA_ENCRYPT/CKA_DECRYPT forbids it.
    """
    operation = getattr(key, "decrypt" if decrypt else "encrypt", None)
    if operation is None:
        # python-pkcs11 gives an object encrypt/decrypt methods only when the token reports
        # CKA_ENCRYPT/CKA_DECRYPT true, so a missing method is the token's usage refusal.
        raise HSMKeyUsageNotPermitted(
            f"the key does not permit {'decrypt' if decrypt else 'encrypt'}")
    return bytes(operation(data, mechanism=pkcs11.Mechanism.AES_GCM,
                           mechanism_param=pkcs11.GCMParams(iv, aad, 128)))


def _openssl_error_clearers() -> list[Callable[[], None]]:
    """``ERR_clear_error`` of every libcrypto mapped into this process.

    SoftHSM reports RSA failures (a bad PSS signature, a wrong OAEP padding) through
    OpenSSL and leaves them on OpenSSL's per-thread error queue. When that libcrypto is
    also the one Python's ssl module uses (Debian: one libcrypto.so.3), the next TLS read
    on that thread (in inline mode the event loop's) finds the stale error and fails: the
    server dropped another client's connection. Clearing the queue after each call into the
    module costs well under a microsecond.
    """
    paths: list[str] = []
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                path = line.rsplit(" ", 1)[-1].strip()
                if "/libcrypto" in path and path not in paths:
                    paths.append(path)
    except OSError:  # Not Linux: the library by its usual name, if there is one.
        found = ctypes.util.find_library("crypto")
        paths = [found] if found else []
    clearers: list[Callable[[], None]] = []
    for path in paths:
        try:
            clear = ctypes.CDLL(path).ERR_clear_error
        except (OSError, AttributeError):
            continue
        clear.restype, clear.argtypes = None, []
        clearers.append(clear)
    return clearers


_clear_errors: list[Callable[[], None]] = []


def _clear_openssl_errors() -> None:
    for clear in _clear_errors:
        clear()


# python-pkcs11 initialises the module with C_Initialize(NULL), which tells SoftHSM2 that
# the application is single-threaded, so SoftHSM turns its own locking off; and
# python-pkcs11 releases the GIL around every call. Two threads inside the module at once
# then corrupt its state (double frees, CKR_GENERAL_ERROR; softhsm/SoftHSMv2#688). One lock
# per loaded module serialises the calls of every pool of the process. Uncontended, it costs
# about 0.1 us; in threads mode it keeps the event loop free, not the token parallel.
_MODULE_LOCKS: Final[dict[str, threading.Lock]] = {}


def _module_lock(module: str) -> threading.Lock:
    return _MODULE_LOCKS.setdefault(module, threading.Lock())


class PKCS11Pool:
    """Run callables against logged-in sessions of one token, off or on the event loop.

    Use as an async context manager; ``run`` raises only the ``HSMError`` family for
    PKCS#11 failures.
    """

    def __init__(self, config: PoolConfig) -> None:
        self._config = config
        self._lib: Any = None
        self._token: Any = None
        self._login: SessionContext | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._pending = 0
        self._module_lock = _module_lock(config.module)
        # Bumped by each eviction in threads mode: every worker then opens a new session.
        self._epoch = 0

    @property
    def mode(self) -> DispatchMode:
        return self._config.mode

    @property
    def token_label(self) -> str:
        return self._config.token_label

    async def __aenter__(self) -> PKCS11Pool:
        # Loading the module and logging in happen once, at start-up, before any request.
        try:
            self._lib = pkcs11.lib(self._config.module)
            try:
                self._token = self._lib.get_token(token_label=self._config.token_label)
            except p11e.NoSuchToken:
                # SoftHSM builds its slot list in C_Initialize, so a token initialised after
                # the module was loaded in this process is only seen after re-initialising.
                self._lib.reinitialize()
                self._token = self._lib.get_token(token_label=self._config.token_label)
        except p11e.NoSuchToken:
            raise HSMUnavailable(f"no token labelled {self._config.token_label!r}") from None
        except p11e.PKCS11Error as exc:
            raise HSMUnavailable(f"cannot load {self._config.module}: {exc}") from None
        finally:
            # Now that the module (and whatever libcrypto it links) is loaded; C_Initialize
            # itself leaves an error behind.
            _clear_errors[:] = _openssl_error_clearers()
            _clear_openssl_errors()
        self._login = SessionContext(self._open_session(login=True))
        # Threads mode: the workers. Inline mode: one thread of the pool's own for slow calls
        # and for calls that find the module busy with one (calls into the module are
        # serialised anyway, so one thread loses nothing, and the loop's default executor,
        # which other work shares, is never filled with waiters).
        workers = self._config.workers if self._config.mode is DispatchMode.THREADS else 1
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pkcs11")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        if self._login is not None:
            with self._module_lock:
                _close_quietly(self._login.session)
            self._login = None
        self._token = None

    def _open_session(self, *, login: bool) -> Any:
        with self._module_lock:
            return self._open_session_locked(login=login)

    def _open_session_locked(self, *, login: bool) -> Any:
        try:
            return self._open_session_raw(login=login)
        finally:
            _clear_openssl_errors()

    def _open_session_raw(self, *, login: bool) -> Any:
        try:
            if login:
                try:
                    return self._token.open(rw=True, user_pin=self._config.user_pin)
                except p11e.UserAlreadyLoggedIn:
                    # Another pool of this process holds the login; sessions share it.
                    pass
            return self._token.open(rw=True)
        except p11e.PinIncorrect:
            # Never echo the PIN.
            raise HSMUnavailable("the token refused the configured user PIN") from None
        except p11e.PKCS11Error as exc:
            raise HSMUnavailable(f"cannot open a session: {type(exc).__name__}") from None

    def token_info(self) -> dict[str, str]:
        """Label, model, manufacturer and serial of the token (for health reports)."""
        token = self._token
        return {
            "label": str(token.label),
            "model": str(token.model).strip(),
            "manufacturer": str(token.manufacturer_id).strip(),
            "serial": bytes(token.serial).decode(errors="replace").strip()
            if isinstance(token.serial, bytes | bytearray) else str(token.serial).strip(),
        }

    def _login_context_locked(self) -> SessionContext:
        """The login session; reopened here if an eviction could not (the token was
        still away). :raises HSMUnavailable: while it is."""
        if self._token is None:
            raise RuntimeError("pool used outside its context")
        if self._login is None:
            self._login = SessionContext(self._open_session_locked(login=True))
        return self._login

    def _thread_context_locked(self) -> SessionContext:
        ctx: SessionContext | None = getattr(self._local, "ctx", None)
        if ctx is None or getattr(self._local, "epoch", None) != self._epoch:
            self._login_context_locked()  # Worker sessions inherit its login.
            ctx = self._local.ctx = SessionContext(self._open_session_locked(login=False))
            self._local.epoch = self._epoch
        return ctx

    def _evict(self, ctx: SessionContext, cause: Exception, *, on_loop: bool = False) -> None:
        """Close a session the token no longer vouches for and log in again, under the
        module lock (closing is a call into the module too).

        A token that lost its sessions (a restart, a failover) also lost the login, and
        sessions opened afterwards inherit none: the login session is reopened in both
        modes. Closing comes before opening: after a reset the token hands out the dead
        sessions' handle numbers again, so closing a dead handle later could close a new
        session. For the same reason the other workers' sessions are dropped, not closed
        (``_epoch``): at worst a worker's live session stays open until the process ends.
        """
        log.warning("evicting a PKCS#11 session after %s", type(cause).__name__)
        if on_loop and not self._module_lock.acquire(blocking=False):
            # On the event loop, behind a slow call: the pool's thread does it, in turn.
            assert self._executor is not None
            self._executor.submit(self._renew_sessions, ctx)
            return
        if not on_loop:
            self._module_lock.acquire()
        try:
            self._renew_sessions_locked(ctx)
        finally:
            self._module_lock.release()

    def _renew_sessions(self, ctx: SessionContext) -> None:
        with self._module_lock:
            self._renew_sessions_locked(ctx)

    def _renew_sessions_locked(self, ctx: SessionContext) -> None:
        if self._config.mode is DispatchMode.THREADS:
            self._local.ctx = None
            self._epoch += 1
            _close_quietly(ctx.session)
        elif ctx is not self._login:
            return  # Inline: an earlier eviction already renewed the session.
        old, self._login = self._login, None
        if old is not None:  # In inline mode, ``ctx`` itself.
            _close_quietly(old.session)
        try:
            self._login_context_locked()
        except HSMUnavailable:
            log.warning("the token refuses a new session for now; the next call retries")

    def _call(self, fn: Callable[[SessionContext], T], decrypting: bool, *,
              locked: bool = False) -> T:
        """``fn(ctx)`` under the module lock; ``locked``: the caller took it already (it is
        released here all the same)."""
        try:
            if not locked:
                self._module_lock.acquire()
            try:
                if self._config.mode is DispatchMode.THREADS:
                    ctx = self._thread_context_locked()
                else:
                    ctx = self._login_context_locked()
                return fn(ctx)
            finally:
                _clear_openssl_errors()
                self._module_lock.release()
        except _DATA_ERRORS as exc:
            raise HSMDataInvalid(type(exc).__name__) from None
        except (p11e.GeneralError, p11e.FunctionFailed) as exc:
            # SoftHSMv2 answers a GCM tag mismatch with CKR_GENERAL_ERROR and nShield with
            # CKR_FUNCTION_FAILED (aws-kms-xks-proxy PR #30): on decrypt both mean bad data
            # and the session is fine. Anywhere else they mean the session is suspect.
            if decrypting:
                raise HSMDataInvalid(f"{type(exc).__name__} on decrypt") from None
            self._evict(ctx, exc, on_loop=locked)
            raise HSMError(f"the token reported {type(exc).__name__}") from None
        except p11e.ObjectHandleInvalid:
            # Objects are destroyed in the token, for every session: every session's cached
            # handles go (the others drop theirs on their next lookup).
            _handles.generation += 1
            ctx.forget_keys()
            raise HSMKeyMissing("a cached key object is gone") from None
        except _SESSION_ERRORS as exc:
            self._evict(ctx, exc, on_loop=locked)
            raise HSMUnavailable(type(exc).__name__) from None
        except p11e.PKCS11Error as exc:
            # Sessions survive data errors only; anything unexpected costs the session.
            self._evict(ctx, exc, on_loop=locked)
            raise HSMError(type(exc).__name__) from None

    async def run(self, fn: Callable[[SessionContext], T], *, decrypting: bool = False,
                  slow: bool = False) -> T:
        """Run ``fn(context)`` with a logged-in session.

        ``decrypting`` marks calls where vendor "general" errors mean invalid ciphertext;
        ``slow`` ones (key-pair generation) never run on the event loop.

        :raises HSMError: (or a subclass) for any PKCS#11 failure.
        """
        if (self._config.mode is DispatchMode.INLINE and not slow
                and self._module_lock.acquire(blocking=False)):
            return self._call(fn, decrypting, locked=True)
        # Threads mode; or inline, a slow call or one that finds the module busy (with a slow
        # call, or another pool's): it waits on the pool's thread, not on the loop.
        # Only the event loop thread touches the counter, so it needs no lock.
        if self._pending >= self._config.max_pending:
            raise HSMPoolExhausted(f"{self._pending} PKCS#11 calls already waiting")
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._call, fn, decrypting)
        finally:
            self._pending -= 1


def _close_quietly(session: Any) -> None:
    try:
        session.close()
    except p11e.PKCS11Error:
        pass
