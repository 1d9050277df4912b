"""Which udev events open the agent's virtio-serial port (pvagent.port).

A hot-plugged port is added by virtio_console before it is named: the ``name`` attribute and
a ``change`` event follow the host's PORT_NAME message. Seen in CI: under load the agent read
the ``add`` event before the name was there, ignored the ``change``, and never answered the
host again after a libvirt channel was detached and attached once more.
"""

from __future__ import annotations

from pvagent.port import _names_port

NAME = "org.extpv.agent.0"


def test_the_add_event_of_a_port_already_named_opens_it() -> None:
    assert _names_port("add", NAME, "/dev/vport2p1", NAME)


def test_the_change_event_that_names_a_port_added_before_opens_it() -> None:
    assert not _names_port("add", None, "/dev/vport2p1", NAME)
    assert _names_port("change", NAME, "/dev/vport2p1", NAME)


def test_other_ports_and_removals_do_not() -> None:
    assert not _names_port("change", "org.qemu.guest_agent.0", "/dev/vport2p2", NAME)
    assert not _names_port("remove", NAME, "/dev/vport2p1", NAME)
    assert not _names_port("add", NAME, None, NAME)
