"""The errors mi_lenses raises on purpose: each message names the fix. The CLI prints them as one line (exit 2)."""


class MiLensesError(Exception):
    """Base of every deliberate mi_lenses error."""


class LensInputError(MiLensesError, ValueError):
    """Bad input to a lens, attribution or patching call; the message names the fix."""


class ModelLoadError(MiLensesError, ValueError):
    """A model could not be found or converted; the message says what to pass instead."""


class OutputError(MiLensesError, OSError):
    """A path mi_lenses was asked to write cannot be written (a folder where a file goes, a read-only or virtual file
    system, a full disk); the message names the path and the fix, and nothing was written there."""


class VerificationError(MiLensesError, AssertionError):
    """An identity does not hold: the numbers must not be trusted."""


class MissingHookError(LensInputError, KeyError):
    """A cache lacks an activation an analysis reads (also a ``KeyError``, as a missing cache key is); the message
    names the hook and how to cache it."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def quoted(value: object, limit: int = 60) -> str:
    """``repr(value)`` for an error message, cut in the middle past ``limit`` characters (a message stays short
    whatever the user passed).

    >>> quoted("x" * 100, limit=20)
    "'xxxxxxx…xxxxxxxx' (100 characters)"
    """
    text = repr(value)
    if len(text) <= limit:
        return text
    head = (limit - 3) // 2
    size = f" ({len(value)} characters)" if isinstance(value, str) else ""
    return f"{text[:head]}…{text[-(limit - 3 - head):]}{size}"


def check_text(text: str, what: str) -> str:
    """``text`` if it can be tokenised; a string holding lone surrogates (what a file decoded with
    ``errors="surrogateescape"`` gives for bytes that are not UTF-8) is a ``LensInputError`` naming the first one.

    >>> check_text("caf\\udce9", "prompt 0")
    Traceback (most recent call last):
    ...
    mi_lenses.errors.LensInputError: prompt 0 holds a lone surrogate '\\udce9' at character 3 (undecodable bytes...
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise LensInputError(f"{what} holds a lone surrogate {text[err.start]!r} at character {err.start} (undecodable "
                             "bytes, e.g. a file read with errors='surrogateescape'): decode the text as UTF-8 "
                             "(errors='replace' turns bad bytes into U+FFFD).") from None
    return text
