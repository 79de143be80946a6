"""User-facing errors: each names where the problem is (file, line, field) and what was expected.

`reading` is the one place where what a file reader raises on undecodable or malformed content
becomes such an error."""

from __future__ import annotations

import contextlib
import struct


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


class FormatError(DataError):
    """A file that cannot be decoded or parsed as what its reader expects."""


class Where:
    """How far a reader got in its file: it sets `line` (1-based) or `key` as it goes, and an error
    raised meanwhile names that place."""

    def __init__(self):
        self.line: int | None = None
        self.key: str | None = None


def _format_errors() -> tuple[type[BaseException], ...]:
    """What decoders and parsers raise on malformed content (JSON errors are ValueErrors; a
    deeply nested document raises RecursionError, a RuntimeError)."""
    import yaml
    from safetensors import SafetensorError

    return (
        UnicodeError,
        ValueError,
        yaml.YAMLError,
        SafetensorError,
        KeyError,
        IndexError,
        TypeError,
        AttributeError,
        ArithmeticError,
        EOFError,
        OSError,
        RuntimeError,
        struct.error,
    )


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split()).rstrip(". ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reason(e: BaseException) -> str:
    import json

    import yaml

    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})"
    if isinstance(e, json.JSONDecodeError):
        at = f"line {e.lineno} column {e.colno}" if e.lineno > 1 else f"column {e.colno}"
        return f"malformed JSON ({e.msg.removesuffix(' at')} at {at})"
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        m = e.problem_mark
        return f"invalid YAML ({_one_line(e.problem)} at line {m.line + 1} column {m.column + 1})"
    if isinstance(e, KeyError):
        return f"missing key {_one_line(repr(e.args[0]) if e.args else '')}"
    if isinstance(e, OSError) and e.strerror:
        return f"cannot be read ({e.strerror})"
    if type(e).__name__ in ("SafetensorError", "PanicException"):
        return f"not a valid safetensors file ({_one_line(e)})"
    return f"{type(e).__name__}: {_one_line(e)}" if str(e).strip() else type(e).__name__


@contextlib.contextmanager
def reading(
    path, expected: str, also: tuple[type[BaseException], ...] = (), error: type[FormatError] = FormatError
):
    """Wraps a reader of `path`: what decoding and parsing raise (UnicodeDecodeError, JSON, YAML
    and safetensors errors, struct / ValueError / KeyError / TypeError ... from format parsing)
    becomes one FormatError naming the file, the line or key the reader reached (`Where`, yielded)
    and what was expected; `also` adds exception types (a library that raises any), `error` is
    the FormatError subclass raised. ZotuneErrors pass through unchanged.

        with reading(path, "one JSON object per line") as at:
            for at.line, raw in enumerate(f, 1): ...
    """
    at = Where()
    try:
        yield at
    except ZotuneError:
        raise
    except BaseException as e:
        # The Rust bindings (safetensors) turn a panic into pyo3's PanicException, a BaseException.
        if not isinstance(e, _format_errors() + also) and type(e).__name__ != "PanicException":
            raise
        raise error(
            f"{_reason(e)}; expected {expected}", file=str(path), line=at.line, field=at.key
        ) from None
