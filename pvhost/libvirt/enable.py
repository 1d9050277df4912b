"""``pvctl libvirt enable|disable DOM``: the extpv channel added to or removed from a domain."""

from __future__ import annotations

from typing import Any

try:
    import libvirt
except ImportError:  # optional: pvhost serves plain-QEMU VMs without it
    libvirt = None

from pvhost.errors import HostError
from pvhost.libvirt.domain import channel_element, channel_xml

__all__ = ["set_channel"]


def set_channel(uri: str, domain: str, on: bool) -> str:
    """``pvctl libvirt enable|disable DOM``: add or remove the extpv channel.

    The persistent XML changes (for the next start) and, on a running domain, the channel is
    hot-attached (libvirt picks its socket path) or hot-detached. Returns what was done;
    HostError says why not.
    """
    if libvirt is None:
        raise HostError(
            "the libvirt Python binding is not installed (python3-libvirt or libvirt-python)"
        )
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as err:
        raise HostError(f"cannot connect to libvirt at {uri}: {err}") from err
    try:
        try:
            dom = conn.lookupByName(domain)
        except libvirt.libvirtError as err:
            raise HostError(f"libvirt has no domain named {domain!r}") from err
        return _set_channel(dom, domain, on)
    except libvirt.libvirtError as err:
        raise HostError(f"domain {domain!r}: libvirt refused: {err}") from err
    finally:
        conn.close()


def _set_channel(dom: Any, domain: str, on: bool) -> str:
    active = bool(dom.isActive())
    persistent = bool(dom.isPersistent())
    done: list[str] = []
    places = []
    if persistent:
        inactive = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        places.append((libvirt.VIR_DOMAIN_AFFECT_CONFIG, inactive, "persistent XML"))
    if active:
        places.append((libvirt.VIR_DOMAIN_AFFECT_LIVE, dom.XMLDesc(0), "running domain"))
    for flag, xml, where in places:
        existing = channel_element(xml)
        if on and existing is None:
            dom.attachDeviceFlags(channel_xml(), flag)
            done.append(f"added to the {where}")
        elif not on and existing is not None:
            dom.detachDeviceFlags(existing, flag)
            done.append(f"removed from the {where}")
    verb = "enabled" if on else "disabled"
    if not done:
        return f"domain {domain!r}: extpv already {verb} (nothing changed)"
    return f"domain {domain!r}: extpv {verb}: channel {' and '.join(done)}"
