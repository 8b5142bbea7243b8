"""Bad input, as one family: the CLI prints the message on one line and exits with code 2.

    lorabench run --models gpt-17        # a ModelError, an InputError: one line, exit 2

Each module raises its own kind (CellError, DataError, ModelError, MethodError, RunDirError,
OptionsError) so callers can tell them apart; `lorabench.cli.main` catches the family once.
"""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none: for one-line reports."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class InputError(ValueError):
    """Something a user asked for cannot be done as asked; the message says why and what is accepted."""
