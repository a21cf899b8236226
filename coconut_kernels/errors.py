"""The library's error types: one family, so that callers can catch every user error of the library at once.

`CoconutError` subclasses `ValueError`, so code written against the earlier `ValueError`s keeps working (and
`CheckpointNotFoundError` also `FileNotFoundError`). A message names the argument (or file, record, key, flag)
and what was expected.
"""


class CoconutError(ValueError):
    """A bad argument, configuration, file or state given to coconut_kernels."""


class ConfigError(CoconutError):
    """A training/evaluation configuration or command-line value that cannot be used."""


class CheckpointError(CoconutError):
    """A checkpoint, model folder or save folder that cannot be read, written or used as asked."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint folder or one of its files that does not exist (also a FileNotFoundError, as before)."""


def library_error(e: ValueError) -> CoconutError:
    """A kernel's own argument check (a ValueError naming the argument: TORCH_CHECK_VALUE in csrc/, the Triton
    wrappers) as the CoconutError the Python entry points raise."""
    return e if isinstance(e, CoconutError) else CoconutError(str(e))
