"""The one exception type that reaches users as a single line, never a traceback."""


class ClipxError(Exception):
    """A user-facing failure: what was wrong, where, and what to do.

    The CLI prints ``error: <message>`` and exits with status 2. Library code raises it for bad
    input (missing files, unknown config keys, wrong types); genuine bugs stay ordinary exceptions.
    """
