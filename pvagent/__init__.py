"""extpv guest agent: loads host-injected eBPF programs and streams their events."""
