"""Validation of oracle settings: one-line errors that name the field.

:class:`SettingsError` carries the field's path (``("input_data", "ecutwfc")``) so the campaign
spec can report ``campaign.yaml: oracle.input_data.ecutwfc: must be a number > 0, got -1``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

from ase.data import chemical_symbols


class SettingsError(ValueError):
    """An invalid oracle setting; ``field``: its path inside the oracle section."""

    def __init__(self, field: tuple[str, ...] | str, message: str):
        self.field = (field,) if isinstance(field, str) else tuple(field)
        self.message = message
        super().__init__(f"{'.'.join(self.field)}: {message}")


def check_keys(data: Any, known: tuple[str, ...] | list[str], where: tuple[str, ...] = ()) -> dict:
    """``data`` as a dict, refusing unknown keys (the first one is named)."""
    if not isinstance(data, Mapping):
        raise SettingsError(where or ("oracle",), f"must be a mapping, got {data!r}")
    unknown = sorted((k for k in data if k not in known), key=str)
    if unknown:
        raise SettingsError(where + (str(unknown[0]),), f"unknown key (allowed: {', '.join(known)})")
    return dict(data)


def field_value(data: Mapping, key: str, check: Callable[[Any], Any], default: Any,
                where: tuple[str, ...] = ()) -> Any:
    """``check(data[key])``, or ``default`` when the key is absent; errors name the field."""
    if key not in data:
        return default
    try:
        return check(data[key])
    except (TypeError, ValueError) as exc:
        if isinstance(exc, SettingsError):
            raise SettingsError(where + (key,) + exc.field, exc.message) from None
        raise SettingsError(where + (key,), str(exc)) from None


def integer(lo: int = 1) -> Callable[[Any], int]:
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"must be an integer >= {lo}, got {v!r}")
        return v

    return check


def positive_number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise ValueError(f"must be a number > 0, got {v!r}")
    return float(v)


def optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda v: None if v is None else check(v)


def boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"must be true or false, got {v!r}")
    return v


def text(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"must be a non-empty string, got {v!r}")
    return v


def path_text(base: Path | None) -> Callable[[Any], str]:
    """A path, made absolute against ``base`` (the spec file's folder) when relative."""

    def check(v):
        path = Path(text(v)).expanduser()
        if not path.is_absolute() and base is not None:
            path = Path(base).resolve() / path
        return os.path.normpath(path)

    return check


def grid(v: Any) -> list[int]:
    """A k-point grid: three integers >= 1."""
    if not isinstance(v, (list, tuple)) or len(v) != 3 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in v):
        raise ValueError(f"must be three integers >= 1, e.g. [2, 2, 1], got {v!r}")
    return [int(n) for n in v]


def element_files(v: Any) -> dict[str, str]:
    """element symbol → file name."""
    if not isinstance(v, Mapping) or not v:
        raise ValueError(f"must be a mapping element → file name, e.g. {{Cu: Cu.pbe.UPF}}, got {v!r}")
    out = {}
    for element, name in v.items():
        if element not in chemical_symbols[1:]:
            raise SettingsError((str(element),), "not a chemical element symbol")
        if not isinstance(name, str) or not name.strip() or "/" in name:
            raise SettingsError((str(element),), f"must be a file name (no folder), got {name!r}")
        out[str(element)] = name
    return out


def scalar(v: Any) -> Any:
    if isinstance(v, bool) or isinstance(v, (int, float, str)):
        return v
    raise ValueError(f"must be a number, string or true/false, got {v!r}")
