"""The one exception type for errors a user can cause."""


class KVCompressError(Exception):
    """A problem with the user's input (path, model, recipe, checkpoint).

    The CLI prints its message as one line and exits non-zero; library callers catch it.
    """
