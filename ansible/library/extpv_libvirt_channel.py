#!/usr/bin/python
# Copyright extpv developers. Licensed under the Apache License, Version 2.0.
"""Ansible module: libvirt domains get the extpv channel, as ``pvctl libvirt enable`` does."""

# Ansible's module layout puts DOCUMENTATION/EXAMPLES/RETURN above the imports.
# ruff: noqa: E402

from __future__ import annotations

DOCUMENTATION = r"""
---
module: extpv_libvirt_channel
short_description: Give libvirt domains the extpv agent channel (persistent XML and live)
description:
  - What C(pvctl libvirt enable DOM) does, for each domain named. The extpv channel (a unix
    socket QEMU serves, target C(org.extpv.agent.0)) is added to the domain's persistent XML,
    for its next start, and hot-attached to it when it runs. libvirt picks the socket path;
    pvhost reads it from the live XML.
  - A domain that has a channel of that name already (in whichever form) is left as it is, so a
    second run changes nothing. Talks to libvirt with C(virsh) (libvirt-clients); no Python
    binding is needed on the host.
options:
  domains:
    description: Domain names, or C(all) for every domain libvirt knows (running or not).
    type: list
    elements: str
    required: true
  uri:
    description: libvirt connection URI.
    type: str
    default: qemu:///system
author: extpv developers
"""

EXAMPLES = r"""
- name: Turn extpv on for two domains
  extpv_libvirt_channel:
    domains: [web-1, "db primary"]

- name: Turn extpv on for every domain
  extpv_libvirt_channel:
    domains: [all]
"""

RETURN = r"""
domains:
  description: Domain name to what was done (empty list when nothing changed for it).
  returned: always
  type: dict
"""

import os
import subprocess
import tempfile
import xml.etree.ElementTree as ET

from ansible.module_utils.basic import AnsibleModule

AGENT_CHANNEL = "org.extpv.agent.0"
CHANNEL_XML = (
    "<channel type='unix'><source mode='bind'/>"
    f"<target type='virtio' name='{AGENT_CHANNEL}'/></channel>"
)


class VirshError(Exception):
    pass


def virsh(uri, *args):
    try:
        proc = subprocess.run(
            ["virsh", "-q", "-c", uri, *args],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as err:
        raise VirshError(f"virsh {' '.join(args)}: {err}") from err
    if proc.returncode != 0:
        raise VirshError(f"virsh {' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def has_channel(xml):
    root = ET.fromstring(xml)
    for channel in root.iterfind("./devices/channel"):
        target = channel.find("target")
        if target is not None and target.get("name") == AGENT_CHANNEL:
            return True
    return False


def all_domains(uri):
    return [line for line in virsh(uri, "list", "--all", "--name").splitlines() if line.strip()]


def enable(uri, domain, check_mode):
    """What was (or, in check mode, would be) done for ``domain``."""
    info = virsh(uri, "dominfo", "--domain", domain)
    fields = {
        key.strip(): value.strip()
        for key, _, value in (line.partition(":") for line in info.splitlines())
    }
    places = []
    if fields.get("Persistent") == "yes":
        places.append(
            ("--config", virsh(uri, "dumpxml", "--inactive", "--domain", domain), "persistent XML")
        )
    if fields.get("Id", "-") != "-":  # an inactive domain has no id
        places.append(("--live", virsh(uri, "dumpxml", "--domain", domain), "running domain"))
    done = []
    for flag, xml, where in places:
        if has_channel(xml):
            continue
        if not check_mode:
            with tempfile.NamedTemporaryFile("w", suffix=".xml", delete=False) as f:
                f.write(CHANNEL_XML)
            try:
                virsh(uri, "attach-device", "--domain", domain, "--file", f.name, flag)
            finally:
                os.unlink(f.name)
        done.append(f"channel added to the {where}")
    return done


def main():
    module = AnsibleModule(
        argument_spec={
            "domains": {"type": "list", "elements": "str", "required": True},
            "uri": {"type": "str", "default": "qemu:///system"},
        },
        supports_check_mode=True,
    )
    uri, wanted = module.params["uri"], module.params["domains"]
    try:
        known = all_domains(uri)
    except VirshError as err:
        module.fail_json(msg=f"cannot list libvirt's domains at {uri}: {err}")
    if wanted == ["all"]:
        wanted = known
    missing = [d for d in wanted if d not in known]
    if missing:
        module.fail_json(
            msg=f"libvirt ({uri}) has no domain named {', '.join(map(repr, missing))}; "
            f"it knows: {', '.join(map(repr, known)) or 'none'}"
        )
    result = {}
    for domain in wanted:
        try:
            result[domain] = enable(uri, domain, module.check_mode)
        except (VirshError, ET.ParseError) as err:
            module.fail_json(msg=f"domain {domain!r}: {err}", domains=result)
    module.exit_json(changed=any(result.values()), domains=result)


if __name__ == "__main__":
    main()
