"""The one exception type for bad input: the CLI prints it as a one-line error, no traceback;
and `mask`, which keeps passwords out of such messages.

Only the standard library here: the CLI uses this module also when Ctrl-C came while
TensorFlow or MLflow were still being imported (a second import of those would fail)."""

import re

_PASSWORD = re.compile(r"(://[^:/@]*:)([^@]*)(@)")


def mask(url: str) -> str:
    """Hide the password of a storage URL: postgresql://u:secret@h/db -> postgresql://u:***@h/db."""
    return _PASSWORD.sub(r"\1***\3", url)


class PipelineError(Exception):
    """A user-facing error. Its message names the file, key or value at fault."""
