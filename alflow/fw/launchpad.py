"""A FireWorks LaunchPad from a launchpad file whose ``${VARIABLE}``s come from the environment
(``fw_configs/my_launchpad.yaml``: host, database and credentials never sit in a file)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

_VARIABLE = re.compile(r"\$\{(\w+)\}")


def launchpad_settings(path: str | Path) -> dict:
    """The launchpad file as a dict, ``${VARIABLE}`` replaced from the environment; a variable that
    is not set is an error naming it (never its value)."""
    path = Path(path)
    if not path.is_file():
        raise OSError(f"{path}: launchpad file not found")
    text = path.read_text()
    missing = sorted({v for v in _VARIABLE.findall(text) if v not in os.environ})
    if missing:
        raise ValueError(f"{path}: environment variable{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(missing)} not set")
    try:
        settings = yaml.safe_load(_VARIABLE.sub(lambda m: os.environ[m.group(1)], text)) or {}
    except yaml.YAMLError as exc:  # the message quotes no line: it could hold a substituted secret
        mark = getattr(exc, "problem_mark", None)
        raise ValueError(f"{path}: YAML syntax error{f' at line {mark.line + 1}' if mark else ''}") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: not a launchpad file (expected a mapping of FireWorks LaunchPad settings)")
    return settings


def launchpad_from_file(path: str | Path):
    """The LaunchPad of a MongoDB server described by ``path`` (FireWorks' embedded mode refused)."""
    settings = launchpad_settings(path)
    os.environ.pop("MONGOMOCK_SERVERSTORE_FILE", None)  # before FireWorks reads it on import
    from fireworks import LaunchPad, fw_config

    if fw_config.MONGOMOCK_SERVERSTORE_FILE:
        raise RuntimeError("FireWorks is in its embedded (mongomock) mode in this process: use --store DIR, not -l")
    try:
        return LaunchPad.from_dict(settings)
    except (KeyError, TypeError, ValueError) as exc:  # e.g. no host, a port that is not a number
        detail = f"missing key {exc}" if isinstance(exc, KeyError) else type(exc).__name__
        raise ValueError(f"{path}: not a usable launchpad file ({detail})") from None
