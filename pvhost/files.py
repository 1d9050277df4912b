"""Files pvhost writes whole: replaced atomically, so a kill -9 at any moment leaves the old
content or the new one, never a mix.

The bytes go to a fresh file in the same directory (``mkstemp``: O_CREAT|O_EXCL, so never
through a symlink, and its mode set before any byte is written), are flushed to the disk
(``fsync``: the rename must not reach the disk before the data), and the file is renamed over
the old one: an old file's mode is not kept, and a symlink at the path is replaced, not followed.
On tmpfs (pvhost's state under /run) the fsync costs nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

__all__ = ["load_model", "replace_file"]

M = TypeVar("M", bound=BaseModel)


def replace_file(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Make ``path`` a new file holding ``data`` with ``mode`` (see the module docstring)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_model(path: Path, model: type[M], log: logging.Logger) -> M | None:
    """The model saved at ``path``; None when there is none, or when it cannot be read: such a
    file is renamed ``<name>.unreadable`` (kept for the operator, logged) and pvhost goes on
    as if nothing had been saved."""
    try:
        return model.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValidationError) as err:
        aside = path.with_name(path.name + ".unreadable")
        # An expected condition, its cause in the message: no traceback.
        log.error("%s is unreadable (%s): kept aside as %s", path, err, aside)  # noqa: TRY400
        os.replace(path, aside)
        return None
