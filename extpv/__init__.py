"""Small pieces that more than one extpv program needs and that are not the wire protocol.

``pvproto`` is the wire protocol and nothing else; what the guest agent (``pvagent``), the host
service (``pvhost``, ``pvctl``) and the VM lab (``vmlab``) share besides lives here, once:

* :mod:`extpv.cli` — ``die(prog, msg, hint=)`` and log set-up for every command line;
* :mod:`extpv.tomlconfig` — loading a TOML file into a pydantic model, one error policy;
* :mod:`extpv.names` — the VM-name rule (runtime directories, cgroups, config keys);
* :mod:`extpv.vcpus` — QEMU's vCPU threads from ``query-cpus-fast``;
* :mod:`extpv.aio` — cancelling a child task without swallowing our own cancellation;
* :mod:`extpv.bpfobj` — the eBPF programs built from ``bpf/`` (the host injects them).
"""
