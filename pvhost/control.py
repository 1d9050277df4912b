"""Control plane: a root-only unix socket speaking JSON lines, and its client.

Request ``{"cmd": "status"}`` → response ``{"ok": true, "result": {...}}`` or
``{"ok": false, "error": "...", "hint": "..."}``. Commands: ``status``, ``verify``,
``remap`` (vm, on), ``release`` (vm), ``program-load`` (vm, path), ``program-unload`` (vm, program),
``service-list``, ``service-enable`` / ``service-disable`` (vm, service).
The socket is mode 0600 and every peer's uid is checked (SO_PEERCRED) to be 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
from pathlib import Path
from typing import Any, TypeVar

from pvhost.errors import ControlError, HostError

__all__ = ["BadRequest", "ControlServer", "request"]

_MAX_LINE = 64 * 1024


class ControlServer:
    def __init__(self, service: Any, path: Path) -> None:
        self.service = service
        self.path = path
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._client, str(self.path), limit=_MAX_LINE
            )
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _, uid, _ = struct.unpack("3i", creds)
            if uid != 0:
                await self._reply(writer, {"ok": False, "error": "the control socket is root-only"})
                return
            while line := await reader.readline():
                await self._reply(writer, await self._handle(line))
        except (ValueError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, response: dict[str, Any]) -> None:
        writer.write(json.dumps(response).encode() + b"\n")
        await writer.drain()

    async def _handle(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                return {"ok": False, "error": "bad request: not a JSON object"}
            cmd = req.get("cmd")
            svc = self.service
            if cmd == "status":
                result = svc.status()
            elif cmd == "verify":
                result = await svc.verify()
            elif cmd == "remap":
                result = await svc.set_remap(_field(req, "vm", str), _field(req, "on", bool))
            elif cmd == "release":
                result = await svc.release(_field(req, "vm", str))
            elif cmd == "program-load":
                result = await svc.load_program(
                    _field(req, "vm", str), Path(_field(req, "path", str))
                )
            elif cmd == "program-unload":
                result = await svc.unload_program(
                    _field(req, "vm", str), _field(req, "program", str)
                )
            elif cmd == "service-list":
                result = svc.service_list()
            elif cmd in ("service-enable", "service-disable"):
                vm, service = _field(req, "vm", str), _field(req, "service", str)
                if cmd == "service-enable":
                    result = await svc.service_enable(vm, service)
                else:
                    result = await svc.service_disable(vm, service)
            else:
                return {"ok": False, "error": f"unknown command {cmd!r}"}
        except ValueError as err:  # BadRequest, or a line that is not JSON
            return {"ok": False, "error": f"bad request: {err}"}
        except HostError as err:
            return {"ok": False, "error": str(err)}
        return {"ok": True, "result": result}


class BadRequest(ValueError):
    """A request field is missing or of the wrong JSON type."""


_JSON_TYPE = {bool: "true or false", str: "a string"}


_T = TypeVar("_T", bool, str)


def _field(req: dict[str, Any], key: str, kind: type[_T]) -> _T:
    """``req[key]`` if it is exactly of JSON type ``kind``: ``"false"`` is no boolean, and a
    string is not coerced (``bool("false")`` is True: an operator's "off" must not mean on)."""
    if key not in req:
        raise BadRequest(f"{key!r} is missing")
    value = req[key]
    if type(value) is not kind:
        raise BadRequest(f"{key!r} must be {_JSON_TYPE[kind]}, not {json.dumps(value)[:80]}")
    result: _T = value
    return result


def request(path: Path, message: dict[str, Any], timeout: float = 90.0) -> Any:
    """Send one request to the daemon and return its ``result`` (raises ControlError)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps(message).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
    except FileNotFoundError as err:
        raise ControlError(f"no pvhost control socket at {path}: is `pvhost run` running?") from err
    except PermissionError as err:
        raise ControlError(f"{path}: permission denied (the control socket is root-only)") from err
    except TimeoutError as err:
        raise ControlError(f"pvhost did not answer within {timeout:g} s") from err
    except OSError as err:
        raise ControlError(f"cannot talk to pvhost at {path}: {err.strerror or err}") from err
    try:
        response = json.loads(data)
    except ValueError as err:
        raise ControlError(f"pvhost answered something that is not JSON: {data[:200]!r}") from err
    if not response.get("ok"):
        raise ControlError(str(response.get("error", "request failed")))
    return response.get("result")
