"""User-facing errors: each names where the problem is (file, line, field) and what was expected."""

from __future__ import annotations


class ZotuneError(Exception):
    """An error caused by the user's input; the CLI prints it without a traceback and exits non-zero."""


class ConfigError(ZotuneError):
    pass


class DataError(ZotuneError):
    def __init__(
        self, message: str, *, file: str | None = None, line: int | None = None, field: str | None = None
    ):
        where = ", ".join(
            p
            for p in (
                file and f"file {file}",
                line is not None and f"line {line}",
                field and f"field '{field}'",
            )
            if p
        )
        super().__init__(f"{where}: {message}" if where else message)
        self.file, self.line, self.field = file, line, field


class ModelError(ZotuneError):
    pass
