"""Errors of dsv3.ep: a peer that does not arrive in time surfaces as `EPTimeoutError`, never as a hang."""

from __future__ import annotations

__all__ = ["EPTimeoutError", "translate"]

_TIMEOUT_WORDS = ("timed out", "timeout", "time out", "deadline")
_DEAD_PEER_WORDS = (
    "closed by peer",
    "reset by peer",
    "connection closed",
    "broken pipe",
    "connection refused",
)


class EPTimeoutError(RuntimeError):
    """A dispatch/combine waited longer than the buffer's (or the process group's) timeout for a peer."""


def translate(err: BaseException, what: str, rank: int) -> BaseException:
    """The exception to raise for a failed collective: an `EPTimeoutError` naming the step and the rank when
    the backend reports a timeout, else the original error."""
    text = str(err).lower()
    if isinstance(err, EPTimeoutError):
        return err
    if any(w in text for w in _TIMEOUT_WORDS):
        return EPTimeoutError(f"dsv3.ep: {what} on rank {rank} timed out waiting for a peer: {err}")
    if any(w in text for w in _DEAD_PEER_WORDS):
        return EPTimeoutError(f"dsv3.ep: {what} on rank {rank} lost a peer (it died or left): {err}")
    return err
