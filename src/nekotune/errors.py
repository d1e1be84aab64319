"""The one exception type for a user's mistakes.

Anything raised as UserError is printed by the CLI as a single line and exits 2.
Every other exception is a bug in nekotune and keeps its traceback.
"""

import re


class UserError(Exception):
    """A problem with the user's input: file, row, field, key or value, and what to do."""

    def __init__(self, message: str):
        # Library messages we quote (YAML, JSON, peft) may span lines; the user gets one.
        super().__init__(re.sub(r"\s*[\r\n]+\s*", " ", str(message)).strip())
