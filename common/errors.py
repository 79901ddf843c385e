"""Errors that report a user's mistake rather than a bug: a missing or malformed dataset, an
unreadable image, an incompatible checkpoint, a bad flag. The task scripts print their
message alone (`cli.run`), without a traceback; every other exception keeps its traceback.

Each also derives from the built-in type that describes it, so `except ValueError` and
`except FileNotFoundError` keep working.
"""


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
