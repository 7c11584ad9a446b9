"""One error type for bad user input, so the CLI can turn it into exit code 2 and one line."""

from __future__ import annotations


class InputError(Exception):
    """Bad input from the user: a missing file, a wrong field, a mismatch.

    ``where`` names the file (or model/SAE path) and ``field`` the key at fault, so the one-line
    message tells the user exactly what to fix. A multi-line ``problem`` (a library's message) is
    joined into that one line.
    """

    def __init__(self, where: str, field: str, problem: str) -> None:
        problem = " ".join(problem.split())
        self.where, self.field, self.problem = where, field, problem
        super().__init__(f"{where}: {field}: {problem}")


def first_line(err: BaseException) -> str:
    """A library exception's first non-empty line (the rest is usually advice or a traceback)."""
    return next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)


def unpickling_problem(err: BaseException) -> str:
    """torch's ``weights_only`` refusal in a few words: the global it refused, not its advice."""
    for line in str(err).splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].split(". ")[0].strip()
    return first_line(err)
