"""The exchange errors the engine handles, translated from ccxt at the adapter boundary.

Three kinds, each saying what the caller does; the subclasses refine the action.
Messages never carry API keys, secrets or request signatures.
"""
from __future__ import annotations

from lifecycle.errors import OrderAlreadyGone


class ExchangeError(Exception):
    """Base of every exchange failure the adapter raises."""

    code: int | None = None  # the venue's numeric error code, when it sent one


class Retryable(ExchangeError):
    """Transient: network, timeout, 5xx, maintenance, an expired listen key. Retry with backoff.
    An order request may or may not have reached the venue, and Binance refuses a repeated client id
    only while the first order is still open: before placing again, look the order up by its client
    id (or reconcile), never just resend."""


class RateLimited(Retryable):
    """429 (back off) or 418 (IP banned for a while). Slow down before retrying."""


class Rejected(ExchangeError):
    """The venue understood and refused this request. Do not retry it unchanged: feed the rejection
    to the position's machine (e.g. close_failed) or take the path the subclass names."""


class StopWouldTrigger(Rejected):
    """Binance -2021: the stop is already crossed by the mark. Close at market (reason stop_crossed)."""


class ReduceOnlyRejected(Rejected):
    """Binance -2022: a reduce-only order would not reduce (the position is gone or smaller). Reconcile."""


class OrderNotFound(Rejected, OrderAlreadyGone):
    """Binance -2011/-2013: the order is not open (filled, cancelled, expired). A cancel is moot: reconcile."""


class DuplicateOrder(Rejected):
    """Binance -4116: an open order already has this client id. The first attempt arrived: reconcile."""


class InsufficientMargin(Rejected):
    """Binance -2019 and kin: not enough margin for the order."""


class Fatal(ExchangeError):
    """Configuration or permission problem (bad key or signature, IP not allowed, unknown symbol).
    Stop sending orders for the account and alert a person; retrying will not help."""


class NotOwner(Fatal):
    """This process no longer holds the account's lease (by its own clock, with the margin): nothing that
    changes the venue is sent; another process acts on the account now (see `lifecycle.app.leases`)."""
