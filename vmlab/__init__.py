"""extpv's VM lab: boot guest images wired to pvhost, for tests, benchmarks and the demo.

Utilities for testing, not part of the host service: pvhost never starts VMs.
"""
