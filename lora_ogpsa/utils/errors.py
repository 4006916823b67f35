"""The one exception type that means "the user's input is wrong" (the command exits 2 on it)."""


class InputError(ValueError):
    """Bad input: a missing or malformed file, row or field, a model path that is not a model, a flag out of
    range. The message is one line that names what is wrong, where (file, row, field) and how to fix it."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (the type name when it has none): for one-line errors."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
