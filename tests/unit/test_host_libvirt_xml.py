"""Which libvirt domains take part, and the names pvhost gives them (no libvirtd needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from extpv.names import is_vm_name
from pvhost.libvirt import DomainSkipped, channel_xml, parse_domain, safe_name

UUID = "8fdda6ac-9fa5-4bd6-b3fa-8001947df3a3"


def xml(devices: str, extra: str = "") -> str:
    return f"<domain type='qemu'><name>d</name>{extra}<devices>{devices}</devices></domain>"


CHANNEL = (
    "<channel type='unix'><source mode='bind' path='/run/x/agent.sock'/>"
    "<target type='virtio' name='org.extpv.agent.0'/></channel>"
)


@pytest.mark.parametrize(
    "name",
    ["db1", "my vm", "web.example.com", "Größe ünïcødé", "日本語", "x" * 200, "...", "-a-"],
)
def test_any_domain_name_maps_to_a_valid_unique_vm_name(name: str) -> None:
    vm = safe_name(name, UUID)
    assert is_vm_name(vm), vm
    assert vm.startswith("lv-") and vm.endswith("8fdda6ac")
    assert safe_name(name, "00000000-9fa5-4bd6-b3fa-8001947df3a3") != vm


def test_the_channel_gives_the_socket_path_from_the_live_xml() -> None:
    d = parse_domain(xml(CHANNEL), "my vm", UUID)
    assert d is not None
    assert d.agent == Path("/run/x/agent.sock")
    assert d.name == "lv-my_vm-8fdda6ac" and d.domain == "my vm" and d.static_pins is None


def test_a_domain_without_the_channel_does_not_take_part() -> None:
    other = "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
    assert parse_domain(xml(other), "d", UUID) is None


@pytest.mark.parametrize(
    ("devices", "reason"),
    [
        (CHANNEL + CHANNEL, "2 channels"),
        (CHANNEL.replace("type='unix'", "type='pty'"), "must be <channel type='unix'>"),
        (CHANNEL.replace("mode='bind'", "mode='connect'"), "served by QEMU"),
        (CHANNEL.replace(" path='/run/x/agent.sock'", ""), "no absolute socket path"),
    ],
)
def test_a_malformed_or_foreign_channel_is_skipped_with_a_reason(devices: str, reason: str) -> None:
    with pytest.raises(DomainSkipped, match=reason):
        parse_domain(xml(devices), "d", UUID)


def test_unreadable_xml_is_skipped() -> None:
    with pytest.raises(DomainSkipped, match="unreadable"):
        parse_domain("<domain>", "d", UUID)


def test_static_vcpupin_is_left_alone_and_says_why() -> None:
    pinned = xml(CHANNEL, "<cputune><vcpupin vcpu='0' cpuset='1'/></cputune>")
    d = parse_domain(pinned, "db", UUID, persistent_xml=pinned)
    assert d is not None and d.static_pins is not None
    assert "<cputune><vcpupin>" in d.static_pins


def test_live_pins_alone_are_not_static() -> None:
    # extpv's own pins (and any live `virsh vcpupin --live`) show in the live XML only.
    live = xml(CHANNEL, "<cputune><vcpupin vcpu='1' cpuset='1'/></cputune>")
    d = parse_domain(live, "db", UUID, persistent_xml=xml(CHANNEL))
    assert d is not None and d.static_pins is None


def test_guest_topology_from_the_cpu_element() -> None:
    topo = "<cpu><topology sockets='1' dies='1' cores='2' threads='2'/></cpu>"
    d = parse_domain(xml(CHANNEL, topo), "db", UUID)
    assert d is not None and d.topology == (1, 1, 2, 2)


def test_the_channel_pvctl_adds_lets_libvirt_choose_the_path() -> None:
    assert "path=" not in channel_xml()
    d = parse_domain(xml(channel_xml(Path("/p/a.sock"))), "d", UUID)
    assert d is not None and d.agent == Path("/p/a.sock")
