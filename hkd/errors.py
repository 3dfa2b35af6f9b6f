"""The exceptions a user sees. `UserError` and its subclasses are problems the user can fix (a wrong option, path,
config value or file): raised where the problem is found, reported by `hkd` as one line with exit code 2. Every
other exception is a bug and keeps its traceback. `RunStopped` is a run stopped by a signal after checkpointing."""

from __future__ import annotations

import signal


def brief(value, limit: int = 80, plain: bool = False) -> str:
    """repr(value) (str(value) if plain) cut to `limit` characters: a one-line error never prints an unbounded value."""
    text = str(value) if plain else repr(value)
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(text)} characters)"


class UserError(Exception):
    """A mistake the user can fix; the message names what is wrong (a file, option or config key)."""


class ConfigError(UserError, ValueError):
    """A config file, section, key or value that cannot be used."""


class CorruptFileError(UserError, ValueError):
    """A file hkd wrote that is truncated, altered or of the wrong kind (a checksum that differs, a pickle)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (or a run needs) that does not exist."""


class MissingExtraError(UserError, ImportError):
    """An optional dependency a command needs is not installed; the message names the extra to install."""


class NonFiniteError(UserError, ArithmeticError):
    """Training diverged: a loss or a weight became NaN or inf. The last good checkpoint is kept."""


class RunStopped(Exception):  # noqa: N818 (a state, not an error: the run stopped as asked)
    """A run stopped by SIGTERM or SIGINT after writing its checkpoint; running the same command again resumes.
    `hkd` exits with 128 + the signal number (143 for SIGTERM, 130 for SIGINT), as a shell does for a killed job."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class TeacherSplitError(UserError, TypeError, ValueError):
    """from_teacher cannot use this teacher's network as HKD's encoder and decoder (raised before any work)."""
