"""Errors the engine raises for bad input.

`InputError` is the one exception type that means "the user's input is wrong": its message
is a single line that names the input and says what to do. The CLI prints it without a
traceback and exits with status 2; the Scipion protocols show it in `_validate`.
"""


class InputError(ValueError):
    """Bad user input; the message is one line naming the input and the fix."""
