"""TOML configuration files validated by a pydantic model, with one error policy.

Every problem becomes one line naming the file and the key, e.g.
``/etc/extpv/pvhost.toml: placement.pool: malformed CPU list '1-x'``; all the model's
validation errors are reported at once, so a user fixes a file in one round.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import TypeVar

import pydantic

__all__ = ["load_toml_model"]

M = TypeVar("M", bound=pydantic.BaseModel)

#: A configuration file is small; a larger one is a mistake (or an attack on the parser).
MAX_CONFIG_BYTES = 1 << 20


def load_toml_model(
    path: Path | None, default_path: Path, model: type[M], error: type[Exception]
) -> M:
    """Read and validate ``path`` (None: ``default_path`` if it exists, else the defaults).

    Raises ``error`` (the caller's config error class) with a message naming file and key;
    the underlying exception is kept as its cause.
    """
    if path is None:
        if not default_path.exists():
            return model()
        path = default_path
    try:
        raw = path.read_bytes()
        if len(raw) > MAX_CONFIG_BYTES:
            raise error(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; is this a config file?")
        data = tomllib.loads(raw.decode("utf-8"))
    except OSError as err:
        raise error(f"{path}: cannot read: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text (byte {err.start})") from err
    except tomllib.TOMLDecodeError as err:
        raise error(f"{path}: not valid TOML: {err}") from err
    except RecursionError as err:
        raise error(f"{path}: nested too deeply to be a configuration file") from err
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as err:
        lines = [
            f"{path}: {'.'.join(str(p) for p in e['loc']) or '(top)'}: "
            f"{e['msg'].removeprefix('Value error, ')}"
            for e in err.errors(include_url=False)
        ]
        raise error("\n".join(lines)) from err
