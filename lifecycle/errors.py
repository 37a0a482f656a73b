"""Domain errors of the lifecycle engine. None of them carries secrets or exchange payloads."""
from __future__ import annotations


class LifecycleError(Exception):
    """Base of every error the engine raises on purpose."""


class InvalidEvent(LifecycleError, ValueError):
    """An event's data is malformed (negative quantity, missing price): fix the caller."""


class TransitionRefused(LifecycleError):
    """The machine refused an event; the position is unchanged. Logged and counted by the engine."""

    def __init__(self, position_id: str, state: str, event: str, reason: str) -> None:
        self.position_id = position_id
        self.state = state
        self.event = event
        self.reason = reason
        super().__init__(f"position {position_id}: event {event!r} refused in state {state}: {reason}")


class UndefinedTransition(TransitionRefused):
    """The (state, event) pair is not in the transition table."""

    def __init__(self, position_id: str, state: str, event: str) -> None:
        super().__init__(position_id, state, event, "no such transition in the table")


class GuardRefused(TransitionRefused):
    """The pair exists but its guards did not hold for this event's data."""

    def __init__(self, position_id: str, state: str, event: str, failed_guards: list[str]) -> None:
        self.failed_guards = failed_guards
        super().__init__(position_id, state, event, "guard failed: " + ", ".join(failed_guards))


class UnknownPosition(LifecycleError, KeyError):
    """No live position has this id (never existed, or already terminal and dropped)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "unknown position"


class ConcurrentModification(LifecycleError):
    """The position's row changed under us (another process or a stale copy); nothing was written."""


class StoreRefused(LifecycleError):
    """The database refused a write for good (a constraint failed): retrying cannot help, so it is not
    queued (a failure of the database itself is; see `lifecycle.books`)."""


class LeaseLost(StoreRefused):
    """The write's account lease is no longer this process's (taken over, released or expired): the write was
    fenced off and nothing was written. The process stops acting on the account."""


class DuplicateLivePosition(LifecycleError):
    """A live position already exists for this account, symbol and side; a new one is not opened."""


class EngineStopping(LifecycleError):
    """The engine is shutting down: no new position, close or adoption is started."""


class AccountStarting(LifecycleError):
    """The account's restart recovery has not finished (just started, or just taken over from another
    process): a command would send an order before the venue's word was taken, so it is refused, nothing sent;
    retried a moment later it goes through."""


class OrderAlreadyGone(LifecycleError):
    """A cancel found the order no longer working (filled, cancelled or expired meanwhile).

    Exchange adapters raise a subclass of it, so terminal cleanup can tell "nothing left to cancel"
    from a failure without importing any exchange code.
    """


class StorageUnavailable(LifecycleError):
    """The database cannot take a write that must precede an order (a new position): nothing was sent.

    Writes that follow an order (a transition, an order row) never raise this: they are queued and
    written once the database is back (see `lifecycle.books`).
    """


class PositionConflict(LifecycleError):
    """The venue nets one symbol's positions (one-way mode): an opposite-side open would reduce or flip a
    live position of ours, so it is refused."""
