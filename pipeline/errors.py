"""The user's mistakes, told apart from the pipeline's bugs.

A :class:`UserError` (a mistyped config key, a missing manifest or checkpoint, a checkpoint of
another model or from a stranger) is printed by the launchers as one line, ``error: ...``, from
rank 0 only, and every rank exits with :data:`EXIT_USER_ERROR` without a traceback (``--debug``
or ``VIT_PIPELINE_DEBUG=1`` shows it). Anything else is a bug and keeps its traceback.
"""

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in what the user asked for, in one sentence that names what and where."""


class MissingInput(UserError, FileNotFoundError):
    """A file or directory the user named does not exist (a manifest, a shard, a checkpoint)."""


class WrongInput(UserError, ValueError):
    """An input that exists but cannot be used (a checkpoint of another model, an empty spec)."""
