"""Domains libvirt runs: found through libvirt's own events, never through its monitor.

- :mod:`~pvhost.libvirt.domain`: what a domain's XML says (the extpv channel, static pins, a
  safe VM name);
- :mod:`~pvhost.libvirt.link`: the connection to libvirtd and its domain events;
- :mod:`~pvhost.libvirt.vcpus`: a domain's vCPU threads from libvirt's ``vcpuN`` cgroups, and
  their hot-plug;
- :mod:`~pvhost.libvirt.enable`: ``pvctl libvirt enable|disable``.

Placement through libvirt is :mod:`pvhost.placement.libvirt`.
"""

from pvhost.libvirt.domain import (
    AGENT_CHANNEL,
    DomainSkipped,
    LibvirtDomain,
    channel_xml,
    parse_domain,
    safe_name,
)
from pvhost.libvirt.enable import set_channel
from pvhost.libvirt.link import LibvirtLink
from pvhost.libvirt.vcpus import (
    LibvirtVcpus,
    VcpuCgroupWatch,
    domain_cgroup,
    qemu_pid_of_domain,
    vcpu_threads,
)

__all__ = [
    "AGENT_CHANNEL",
    "DomainSkipped",
    "LibvirtDomain",
    "LibvirtLink",
    "LibvirtVcpus",
    "VcpuCgroupWatch",
    "channel_xml",
    "domain_cgroup",
    "parse_domain",
    "qemu_pid_of_domain",
    "safe_name",
    "set_channel",
    "vcpu_threads",
]
