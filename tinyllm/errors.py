"""The one exception type users see: a clear message, no traceback dump from the CLI."""


class TinyLLMError(Exception):
    """Bad input or an unsupported model: the message says what and why."""


class FormatError(TinyLLMError):
    """A .q4 (or GGUF) file is not what it claims: wrong magic, truncated, corrupted."""


class UnsupportedError(TinyLLMError):
    """An architecture, config option or tensor type tinyllm does not implement."""


class ShapeError(TinyLLMError, ValueError):
    """A backend op was called with arrays that break its contract (kernels/backend.py): every
    backend raises this one class for it (a ValueError too, as NumPy would raise)."""


# Python errors that a value of the wrong type, shape or size provokes while untrusted input
# (a model file, a checkpoint's config.json, GGUF metadata) is being interpreted.
MALFORMED_INPUT_ERRORS = (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError,
                          RecursionError, ZeroDivisionError, UnicodeError, MemoryError)


class reading:
    """Context manager for the boundary where untrusted input is interpreted: the explicit
    checks there raise clear errors; whatever they did not foresee still leaves as a
    FormatError naming the input, never as a raw Python exception.

        with reading(path):
            config = parse(untrusted)
    """

    def __init__(self, where):
        self.where = str(where)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None or not issubclass(exc_type, MALFORMED_INPUT_ERRORS) or issubclass(exc_type, TinyLLMError):
            return False
        if issubclass(exc_type, MemoryError):
            raise FormatError(f"{self.where}: too large to load") from None
        raise FormatError(f"{self.where}: malformed ({exc_type.__name__}: {exc})") from None
        return False
