"""One error type for bad user input, so the CLI can turn it into exit code 2 and one line."""

from __future__ import annotations


class InputError(Exception):
    """Bad input from the user: a missing file, a wrong field, a mismatch.

    ``where`` names the file (or model/SAE path) and ``field`` the key at fault, so the one-line
    message tells the user exactly what to fix.
    """

    def __init__(self, where: str, field: str, problem: str) -> None:
        self.where, self.field, self.problem = where, field, problem
        super().__init__(f"{where}: {field}: {problem}")
