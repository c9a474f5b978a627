"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class BitblendError(Exception):
    """A user-facing error: bad recipe, bad data, bad path. Printed as one line, exit 2.

    The message names the file, the field or line, and what was expected, e.g.
    ``recipe.yaml: tasks[0].head: expected one of classification, regression, got 'clf'``.
    """
