"""Errors that report a user's mistake rather than a bug: a missing or malformed dataset, an
unreadable image, an incompatible checkpoint, a bad flag. The task scripts print their
message alone (`cli.run`), without a traceback; every other exception keeps its traceback.

Each also derives from the built-in type that describes it, so `except ValueError` and
`except FileNotFoundError` keep working.
"""
import signal


class UserError(Exception):
    """Base class: the message says what was expected and where."""


class DatasetNotFoundError(UserError, FileNotFoundError):
    """The dataset folder, or a file its layout needs, is missing (or could not be downloaded)."""


class DownloadError(UserError, RuntimeError):
    """The dataset download failed, or what it fetched is not the expected archive."""


class DatasetError(UserError, ValueError):
    """The dataset is there but its layout or annotations are not what the reader expects."""


class ImageDecodeError(UserError, ValueError):
    """An image file is corrupt, truncated or not a JPEG/PNG."""


class MissingPackageError(UserError, ImportError):
    """An optional package the chosen option needs is not installed (e.g. --backend dali)."""


class ConfigError(UserError, ValueError):
    """Flags that cannot work together, or that this machine cannot honour."""


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped training, after last.pt was saved (common/engine.fit);
    cli.run then exits with 128 + the signal's number, as a process killed by it would."""

    def __init__(self, signum: int, epoch: int, step: int, partial: dict[str, float]) -> None:
        self.signum, self.epoch, self.step, self.partial = int(signum), epoch, step, partial
        super().__init__(f"{self.name} in epoch {epoch + 1} at batch {step}")

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name
