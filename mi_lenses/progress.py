"""Progress bars: one helper, so every long computation (lens streaming, DLA, the report, fitting, training, patching)
shows progress the same way: a tqdm bar that appears only once the work has run for ``DELAY`` seconds, so short
calls print nothing.

Example:
    >>> with bar(3, "work", enabled=True) as b:      # finishes before the delay: nothing is printed
    ...     for _ in range(3):
    ...         b.update(1)
    >>> list(track(range(3), "work"))
    [0, 1, 2]
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, TypeVar

T = TypeVar("T")

DELAY = 2.0  # seconds before a bar appears


def bar(total: int | None, desc: str, *, unit: str = "step", enabled: bool = True, leave: bool = False,
        initial: int = 0) -> Any:
    """A tqdm bar (a context manager with ``update``), silent when not ``enabled`` or while under ``DELAY``."""
    from tqdm.auto import tqdm  # deferred: tqdm.auto costs ~0.1 s of start-up (it probes for notebooks)

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, delay=DELAY, leave=leave, initial=initial)


def track(items: Iterable[T], desc: str, *, unit: str = "step", enabled: bool = True,
          total: int | None = None) -> Iterator[T]:
    """``items`` with a :func:`bar` over them (``total`` defaults to ``len(items)`` where it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with bar(total, desc, unit=unit, enabled=enabled) as b:
        for item in items:
            yield item
            b.update(1)
