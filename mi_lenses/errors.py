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
