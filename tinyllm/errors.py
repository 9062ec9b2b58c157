"""The one exception type users see: a clear message, no traceback dump from the CLI."""


class TinyLLMError(Exception):
    """Bad input or an unsupported model: the message says what and why."""


class FormatError(TinyLLMError):
    """A .q4 (or GGUF) file is not what it claims: wrong magic, truncated, corrupted."""


class UnsupportedError(TinyLLMError):
    """An architecture, config option or tensor type tinyllm does not implement."""
