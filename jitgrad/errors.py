"""jitgrad's exceptions. Every message names the problem and, where known, the user's line."""


class JitgradError(ValueError):
    """Base class of jitgrad's errors (a ValueError, so bad input reads as bad input)."""


class UndefinedGradientError(JitgradError):
    """A requested gradient flows through a primitive whose derivative is undefined."""


class TracingError(JitgradError):
    """A traced value was used where a concrete one is needed (e.g. Python `if`)."""


class NonFiniteError(JitgradError):
    """`check_finite` found a NaN or Inf; names the first instruction that produced one."""


class CacheSecurityError(JitgradError):
    """The cache holds code another user could have written; jitgrad will not run it."""


class NoLoweringError(JitgradError):
    """The Numba backend has no code for a primitive, or for a dtype of one (the
    interpreter runs it); raised before anything is compiled. ``instr``: the instruction,
    where the code that found out knows it."""

    def __init__(self, message: str, instr: object = None):
        super().__init__(message)
        self.instr = instr


class JitgradWarning(UserWarning):
    """Code that runs but probably not as meant (np.random inside a traced function)."""
