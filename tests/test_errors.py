"""worker.errors.detached: an exception fit to keep, no frames (nor cycles) attached."""

from __future__ import annotations

from worker.errors import DecodeError, detached


def _raise(exc: BaseException) -> None:
    raise exc


def raised(exc: BaseException) -> BaseException:
    """``exc`` as caught, with the traceback that raising it gave."""
    try:
        _raise(exc)
    except BaseException as caught:  # noqa: BLE001 - any exception, as given
        return caught
    raise AssertionError("not raised")


def test_the_exception_and_its_whole_chain_lose_their_tracebacks() -> None:
    """Its own traceback, its cause's and its context's are dropped; the chain is cut."""
    cause, context = raised(ValueError("bad byte")), raised(KeyError("k"))
    exc = raised(DecodeError("not a request"))
    assert isinstance(exc, DecodeError)
    exc.__cause__, exc.__context__ = cause, context
    assert all(e.__traceback__ is not None for e in (exc, cause, context))
    kept = detached(exc)
    assert kept is exc
    assert (kept.__traceback__, kept.__cause__, kept.__context__) == (None, None, None)
    assert cause.__traceback__ is None
    assert context.__traceback__ is None
    assert kept.message == "not a request", "the message is what is reported"


def test_a_looping_chain_ends_and_a_groups_members_lose_their_tracebacks() -> None:
    """A context loop ends; an exception group's members lose their tracebacks too."""
    first, second = raised(ValueError("a")), raised(ValueError("b"))
    first.__context__, second.__context__ = second, first
    member = raised(OSError("disk"))
    group = raised(ExceptionGroup("many", [member]))  # type: ignore[type-var]
    first.__cause__ = group
    detached(first)
    assert second.__traceback__ is None
    assert group.__traceback__ is None
    assert member.__traceback__ is None
