"""How much memory one call may ask for, checked before anything is allocated.

A call whose arrays would exceed the limit is refused with an ``InvalidInputError`` that names the size,
instead of ending in a ``MemoryError`` (or the kernel's out-of-memory killer) halfway through. The limit is
process-wide: by default half of the machine's physical memory, overridden by the environment variable
``FASTLSTM_MAX_ALLOCATION_BYTES`` at import or by ``set_allocation_limit`` at any time.
"""

from __future__ import annotations

import os

from .errors import InvalidInputError

ENVIRONMENT_VARIABLE = "FASTLSTM_MAX_ALLOCATION_BYTES"


def _physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system: assume a modest machine
        return 8 << 30


def _initial_limit() -> int:
    configured = os.environ.get(ENVIRONMENT_VARIABLE)
    if configured:
        try:
            return _checked_limit(int(configured))
        except (ValueError, InvalidInputError):
            raise InvalidInputError(
                f"{ENVIRONMENT_VARIABLE}: expected a positive whole number of bytes, got {configured!r}") from None
    return _physical_memory_bytes() // 2


def _checked_limit(nbytes) -> int:
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1:
        raise InvalidInputError(f"allocation limit: expected a positive whole number of bytes, got {nbytes!r}")
    return nbytes


_limit = _initial_limit()


def allocation_limit() -> int:
    """The most bytes one ``predict``, ``stream`` or pool call may allocate."""
    return _limit


def set_allocation_limit(nbytes: int) -> int:
    """Set the most bytes one call may allocate; returns the previous limit (to restore it later)."""
    global _limit
    previous, _limit = _limit, _checked_limit(nbytes)
    return previous


def check_allocation(nbytes: int, what: str) -> None:
    """Refuse ``what`` if it would allocate more than the limit (``nbytes`` is an estimate from shapes)."""
    if nbytes > _limit:
        raise InvalidInputError(
            f"{what} would allocate about {format_bytes(nbytes)}, more than fastlstm's limit of "
            f"{format_bytes(_limit)}; split the work into smaller calls, or raise the limit with "
            f"fastlstm.set_allocation_limit(nbytes) or the {ENVIRONMENT_VARIABLE} environment variable")


def format_bytes(nbytes: int) -> str:
    value = float(nbytes)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
