"""The errors mi_lenses raises on purpose: each message names the fix. The CLI prints them as one line (exit 2)."""


class MiLensesError(Exception):
    """Base of every deliberate mi_lenses error."""


class LensInputError(MiLensesError, ValueError):
    """Bad input to a lens, attribution or patching call; the message names the fix."""


class ModelLoadError(MiLensesError, ValueError):
    """A model could not be found or converted; the message says what to pass instead."""


class VerificationError(MiLensesError, AssertionError):
    """An identity does not hold: the numbers must not be trusted."""
