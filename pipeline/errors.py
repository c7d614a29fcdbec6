"""The one exception type for bad input: the CLI prints it as a one-line error, no traceback."""


class PipelineError(Exception):
    """A user-facing error. Its message names the file, key or value at fault."""
