"""The errors the CLI turns into exit codes: bad user input (2, one line) and a failed calibration
(1, with the table of what was tried)."""

from __future__ import annotations

from typing import Any


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


class CalibrationFailed(Exception):
    """No point met the gates on validation rows, or a concept has none: exit 1 with the table of
    what was tried (exit 2 stays for malformed input)."""

    def __init__(self, message: str, table: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.table = table


class RankExit(Exception):
    """Under torchrun: a peer rank failed (and printed why); this rank ends with the same ``code``."""

    def __init__(self, code: int) -> None:
        super().__init__(f"another rank failed (exit {code})")
        self.code = code
