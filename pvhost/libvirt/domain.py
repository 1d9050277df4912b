"""A domain as pvhost sees it: the extpv channel in its XML, its static pins, a safe name.

Pure functions of libvirt's XML (no connection): :func:`parse_domain` says whether a running
domain takes part and where its agent socket is, :func:`safe_name` gives it a VM name for
cgroups, state and status, and :func:`channel_xml` is the channel ``pvctl libvirt enable`` adds.
"""

from __future__ import annotations

import re
import unicodedata
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from extpv.names import VM_NAME_MAX
from pvhost.errors import HostError

__all__ = [
    "AGENT_CHANNEL",
    "NAME_PREFIX",
    "DomainSkipped",
    "LibvirtDomain",
    "channel_element",
    "channel_xml",
    "parse_domain",
    "safe_name",
]

AGENT_CHANNEL = "org.extpv.agent.0"
#: Prefix of the VM name pvhost gives a libvirt domain (kept apart from runtime-dir names).
NAME_PREFIX = "lv-"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


class DomainSkipped(HostError):
    """A domain's XML names the extpv channel in a way pvhost cannot use (the reason)."""


@dataclass(frozen=True)
class LibvirtDomain:
    """A running domain that takes part, as its live XML describes it."""

    #: pvhost's name for it (:func:`safe_name`): cgroup, state and status key.
    name: str
    #: libvirt's name, any characters libvirt allows.
    domain: str
    uuid: str
    #: The extpv channel's unix socket (QEMU serves it).
    agent: Path
    #: Why extpv leaves its vCPUs alone (static ``<cputune><vcpupin>``), or None.
    static_pins: str | None = None
    #: Guest topology: (dies, clusters, cores, threads) per socket.
    topology: tuple[int, int, int, int] = (1, 1, 1, 1)


def safe_name(domain: str, uuid: str) -> str:
    """A VM name (``extpv.names`` rule) for any libvirt domain name, unique by its UUID.

    ``lv-<name folded to ASCII, unsafe runs as _>-<first 8 hex digits of the UUID>``; the
    readable part is cut so the whole stays within the VM-name limit.
    """
    folded = unicodedata.normalize("NFKD", domain).encode("ascii", "ignore").decode()
    readable = _UNSAFE.sub("_", folded).strip("_.-")
    tag = uuid.replace("-", "")[:8].lower()
    room = VM_NAME_MAX - len(NAME_PREFIX) - 1 - len(tag)
    readable = readable[:room].rstrip("_.-")
    return f"{NAME_PREFIX}{readable}-{tag}" if readable else f"{NAME_PREFIX}{tag}"


def channel_xml(path: Path | None = None) -> str:
    """The extpv channel as a device XML (libvirt picks the socket path when ``path`` is None)."""
    source = f"<source mode='bind' path='{path}'/>" if path else "<source mode='bind'/>"
    return f"<channel type='unix'>{source}<target type='virtio' name='{AGENT_CHANNEL}'/></channel>"


def _int(element: ET.Element | None, attr: str, default: int = 1) -> int:
    if element is None or element.get(attr) is None:
        return default
    try:
        value = int(element.get(attr, ""))
    except ValueError as err:
        raise DomainSkipped(f"<cpu><topology {attr}=…> is not a number") from err
    return max(value, 1)


def parse_domain(
    xml: str, domain: str, uuid: str, persistent_xml: str | None = None
) -> LibvirtDomain | None:
    """The domain as pvhost sees it (``xml``: live); None without the extpv channel.

    Static pinning is read from ``persistent_xml`` (the domain's definition): the live XML
    also lists the live pins, extpv's own among them. A transient domain has no definition, so
    none of its pins counts as static.

    Raises DomainSkipped (the reason) for a channel pvhost cannot use: not a unix socket
    QEMU serves, no path yet, or more than one.
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as err:
        raise DomainSkipped(f"unreadable domain XML: {err}") from err
    found: list[ET.Element] = []
    for channel in root.iterfind("./devices/channel"):
        target = channel.find("target")
        if target is not None and target.get("name") == AGENT_CHANNEL:
            found.append(channel)
    if not found:
        return None
    if len(found) > 1:
        raise DomainSkipped(f"{len(found)} channels named {AGENT_CHANNEL}; one is allowed")
    channel = found[0]
    target = channel.find("target")
    source = channel.find("source")
    if channel.get("type") != "unix" or target is None or target.get("type") != "virtio":
        raise DomainSkipped(
            f"the {AGENT_CHANNEL} channel must be <channel type='unix'> with a virtio target "
            f"(found type={channel.get('type')!r})"
        )
    if source is None or source.get("mode", "bind") != "bind":
        raise DomainSkipped(
            f"the {AGENT_CHANNEL} channel's socket must be served by QEMU (<source mode='bind'>)"
        )
    path = source.get("path")
    if not path or not path.startswith("/"):
        raise DomainSkipped(f"the {AGENT_CHANNEL} channel has no absolute socket path")
    static = None
    try:
        defined = ET.fromstring(persistent_xml) if persistent_xml else None
    except ET.ParseError as err:
        raise DomainSkipped(f"unreadable persistent domain XML: {err}") from err
    if defined is not None and defined.find("./cputune/vcpupin") is not None:
        static = (
            f"domain {domain!r} pins its vCPUs statically (<cputune><vcpupin>): extpv leaves "
            "its placement to libvirt"
        )
    topo = root.find("./cpu/topology")
    topology = (
        _int(topo, "dies"),
        _int(topo, "clusters"),
        _int(topo, "cores"),
        _int(topo, "threads"),
    )
    return LibvirtDomain(
        name=safe_name(domain, uuid),
        domain=domain,
        uuid=uuid,
        agent=Path(path),
        static_pins=static,
        topology=topology if topo is not None else (1, 1, 1, 1),
    )


def channel_element(xml: str) -> str | None:
    """The extpv channel element of a domain XML, serialised, or None."""
    root = ET.fromstring(xml)
    for channel in root.iterfind("./devices/channel"):
        target = channel.find("target")
        if target is not None and target.get("name") == AGENT_CHANNEL:
            return ET.tostring(channel, encoding="unicode")
    return None
