"""Paravirtual services as plugins (issue #12; docs/services.md).

* :mod:`pvhost.services.base` — :class:`ServicePlugin`, the interface a service implements,
  and what it is given (:class:`ServiceContext`) and sees of a VM (:class:`VmHandle`);
* :mod:`pvhost.services.discovery` — the ``extpv.services`` entry points;
* :mod:`pvhost.services.manager` — which services run in which VM, every call guarded;
* :mod:`pvhost.services.affinity` — the affinity service, the built-in first plugin;
* :mod:`pvhost.services.memory` — guest memory pressure → virtio-balloon (off by default).
"""

from __future__ import annotations

from pvhost.services.base import QMP_ALLOWED, EventError, ServiceContext, ServicePlugin, VmHandle
from pvhost.services.discovery import ENTRY_POINT_GROUP, Found, discover
from pvhost.services.manager import ServiceManager, ServicesSettings

__all__ = [
    "ENTRY_POINT_GROUP",
    "QMP_ALLOWED",
    "EventError",
    "Found",
    "ServiceContext",
    "ServiceManager",
    "ServicePlugin",
    "ServicesSettings",
    "VmHandle",
    "discover",
]
