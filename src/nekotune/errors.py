"""The one exception type for a user's mistakes.

Anything raised as UserError is printed by the CLI as a single line and exits 2.
Every other exception is a bug in nekotune and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: file, row, field, key or value, and what to do."""
