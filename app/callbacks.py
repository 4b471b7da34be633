"""Job callbacks: which URLs a job may name, how a delivery is signed, and the sender the
workers run.

A job names a URL whose host is on the operator's allow-list (`callback_hosts`), so the
service cannot be aimed at arbitrary internal addresses; nothing is resolved at submission,
and the list is checked again before every send (a host taken off it is refused). When the
job ends, its delivery (a row: app/store/callbacks.py) is POSTed with a signature over a
timestamp and the body, keyed by the job's own secret (returned once, at submission),
and retried with exponential back-off until it is answered 2xx or `callback_retry_for_s` has
passed. Redirects are not followed, nor cookies kept; of an answer only the status and its
first characters are kept. A name on the list is never connected to at a link-local,
multicast, unspecified or reserved address: a tenant whose own domain is listed could
otherwise point it at the cloud's metadata service (169.254.169.254).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import random
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import SplitResult, urlsplit

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from app.config import Settings, callback_host_entries
from app.errors import CallbackHostNotAllowed, CallbackRefused, CallbacksDisabled, InvalidCallbackUrl
from app.store import callbacks as store
from app.store.db import Sessions
from app.store.jobs import NewCallback
from app.store.models import CallbackStatus

log = logging.getLogger("aidsafe.callbacks")

SIGNATURE_HEADER = "X-Aidsafe-Signature"  # t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">
DELIVERY_HEADER = "X-Aidsafe-Delivery"  # the delivery's id, the same on every attempt: dedupe by it
SECRET_PREFIX = "aidsafe_cbsec_"
MAX_URL_CHARS = 2000
SNIPPET_CHARS = 200  # of a receiver's answer, kept in the attempt log
BATCH = 20  # deliveries a worker sends at once
_DEFAULT_PORTS = {"http": 80, "https": 443}


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The signature header's value: the receiver recomputes v1 and checks t is recent."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


@dataclass(frozen=True)
class AllowedHosts:
    """The operator's allow-list: (host, port) pairs, port None for any port."""

    entries: frozenset[tuple[str, int | None]]

    @classmethod
    def parse(cls, setting: str) -> AllowedHosts:
        return cls(callback_host_entries(setting))

    def check(self, url: str) -> None:
        """Raise the CallbackRefused that says why `url` may not be called, if it may not."""
        if not self.entries:
            raise CallbacksDisabled("this server takes no callbacks (its AIDSAFE_CALLBACK_HOSTS is empty)")
        parts = _http_url(url)
        host, port = parts.hostname or "", parts.port or _DEFAULT_PORTS[parts.scheme]
        if (host, None) not in self.entries and (host, port) not in self.entries:
            raise CallbackHostNotAllowed(f"{host}:{port} is not on this server's callback allow-list")


def _http_url(url: str) -> SplitResult:
    """The URL's parts, if it is an absolute http(s) URL with a host and no credentials."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (a port out of range raises here)
    except ValueError as exc:
        raise InvalidCallbackUrl(f"the callback URL is malformed: {exc}") from exc
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise InvalidCallbackUrl("the callback URL must be an absolute http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise InvalidCallbackUrl("the callback URL may not carry credentials")
    return parts


class Sender:
    """Sends due deliveries, one batch per call; one per worker process."""

    def __init__(self, settings: Settings, sessions: Sessions) -> None:
        self._settings = settings
        self._sessions = sessions
        self._http: aiohttp.ClientSession | None = None  # made on first use, in the event loop

    async def send_due(self) -> int:
        """Claim up to BATCH due deliveries and send them; how many were claimed."""
        settings = self._settings
        # The lease outlasts an attempt, so no other worker sends the same one meanwhile.
        claimed = await store.claim_due(self._sessions, BATCH, lease_s=settings.callback_timeout_s + 30)
        if claimed:
            allowed = AllowedHosts.parse(settings.callback_hosts)  # read now: it may have changed
            await asyncio.gather(*(self._send(due, allowed) for due in claimed))
        return len(claimed)

    async def _send(self, due: store.Due, allowed: AllowedHosts) -> None:
        """Attempt the delivery and record how it went. A failure to record (Postgres away)
        stays this delivery's: logged, and the delivery is due again once its claim's lease
        runs out (at least once: receivers dedupe by its id). Raised, it escaped the batch's
        gather while the other sends ran on, unawaited, into the next round."""
        outcome, status, retry_in_s = await self._attempt(due, allowed)
        try:
            await store.record_attempt(self._sessions, due, outcome, status, retry_in_s)
        except Exception:
            log.warning(
                "callback delivery %s attempt %d not recorded: sent again after its lease",
                due.id,
                due.attempt,
                exc_info=True,
            )

    async def _attempt(
        self, due: store.Due, allowed: AllowedHosts
    ) -> tuple[store.Outcome, CallbackStatus, float | None]:
        """Send the delivery, unless its host left the allow-list: the attempt's outcome, the
        delivery's status after it and, if it stays pending, when to try again."""
        started, attempted_at = time.monotonic(), datetime.now(UTC)
        try:
            allowed.check(due.url)
        except CallbackRefused as exc:
            log.warning("callback delivery %s refused: %s", due.id, exc)
            return store.Outcome(attempted_at, 0.0, error=f"refused: {exc}"), CallbackStatus.REFUSED, None
        outcome = await self._post(due, attempted_at, started)
        if outcome.error is None:
            return outcome, CallbackStatus.DELIVERED, None
        retry_in = self._backoff_s(due.attempt)
        elapsed = (due.claimed_at - due.created_at).total_seconds() + retry_in
        status = (
            CallbackStatus.GAVE_UP
            if elapsed > self._settings.callback_retry_for_s
            else CallbackStatus.PENDING
        )
        log.info("callback delivery %s attempt %d failed: %s", due.id, due.attempt, outcome.error)
        return outcome, status, retry_in

    async def _post(self, due: store.Due, attempted_at: datetime, started: float) -> store.Outcome:
        def took() -> float:
            return (time.monotonic() - started) * 1000

        try:
            body = orjson.dumps(due.payload)
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "aidsafe-callbacks/1",
                DELIVERY_HEADER: str(due.id),
                SIGNATURE_HEADER: sign(due.secret, body, int(time.time())),
            }
            async with self._client().post(
                due.url, data=body, headers=headers, allow_redirects=False
            ) as answer:
                snippet = (await answer.content.read(SNIPPET_CHARS)).decode("utf-8", errors="replace")
                error = None if 200 <= answer.status < 300 else f"answered HTTP {answer.status}"
                return store.Outcome(attempted_at, took(), answer.status, error, snippet[:SNIPPET_CHARS])
        except TimeoutError:
            return store.Outcome(
                attempted_at, took(), error=f"no answer within {self._settings.callback_timeout_s} s"
            )
        except aiohttp.ClientError as exc:  # refused, reset, DNS, bad framing
            return store.Outcome(attempted_at, took(), error=f"{type(exc).__name__}: {exc}"[:500])
        # Not sendable at all (a host label too long for IDNA, a payload orjson refuses): a
        # failed attempt, retried and given up on like any other, not claimed again for ever.
        except Exception as exc:
            log.warning("callback delivery %s could not be sent", due.id, exc_info=True)
            error = f"could not send: {type(exc).__name__}: {exc}"[:500]
            return store.Outcome(attempted_at, took(), error=error)

    def _backoff_s(self, attempt: int) -> float:
        settings = self._settings
        delay = min(settings.callback_retry_max_s, settings.callback_retry_base_s * 2.0 ** (attempt - 1))
        return delay * random.uniform(0.5, 1.0)  # receivers back after an outage are not hit at once

    def _client(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._settings.callback_timeout_s),
                # Every key's deliveries share the session: a cookie one receiver set went with
                # the others' to that host (any port), and theirs came back to it.
                cookie_jar=aiohttp.DummyCookieJar(),
                connector=aiohttp.TCPConnector(resolver=ListedNameResolver()),
            )
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()


class ListedNameResolver(AbstractResolver):
    """The default resolver, less the addresses a listed name must not lead to: link-local
    (the cloud's metadata service), multicast, unspecified and reserved ones; OSError if none
    is left. Loopback and private addresses stay: an operator's own receivers live there. An
    address the operator listed as such is connected to without being resolved."""

    def __init__(self) -> None:
        self._resolver = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        resolved = await self._resolver.resolve(host, port, family)
        kept = [address for address in resolved if not _never_connected(address["host"])]
        if not kept:
            raise OSError(f"{host} resolves to no address a callback may be sent to")
        return kept

    async def close(self) -> None:
        await self._resolver.close()


def _never_connected(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone, as in fe80::1%eth0
    return ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved


def requested(url: str | None, settings: Settings) -> NewCallback | None:
    """The callback a submission names, if it names one: its URL checked against the
    allow-list (CallbackRefused otherwise), with a new secret."""
    if url is None:
        return None
    AllowedHosts.parse(settings.callback_hosts).check(url)
    return NewCallback(url, new_secret())
