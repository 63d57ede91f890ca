"""User-facing errors.

Every error a user can cause (a bad file, an unknown name, an inconsistent run directory) is a
:class:`CMCLError`. The CLI prints its message on one line and exits with status 2; anything else
is a bug and keeps its traceback.
"""


class CMCLError(Exception):
    """An error caused by input the user can fix; the message says what and where."""


class CacheError(CMCLError):
    """A feature-cache file is missing, malformed or inconsistent."""


class ProtocolError(CMCLError):
    """A protocol file is malformed or does not match the feature cache."""


class ConfigError(CMCLError):
    """An invalid option, strategy name or strategy parameter."""


class RunError(CMCLError):
    """A run directory is missing, incomplete or made with a different configuration."""


class DatasetError(CMCLError):
    """A dataset folder is missing, has an unexpected layout, or holds inconsistent metadata."""


class ExtractError(CMCLError):
    """An extraction run cannot start, resume or finish (too many bad media files, mismatched resume)."""


class EncoderError(CMCLError):
    """An encoder cannot be built: a missing or mismatched checkpoint, tokenizer file or media file."""


class IndexFileError(CMCLError):
    """A retrieval index folder is missing, malformed, or does not fit the run or the queries."""


class EmbeddingImportError(CMCLError):
    """Embeddings brought from another tool cannot be imported (shape, values, ids, labels)."""
