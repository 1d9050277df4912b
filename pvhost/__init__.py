"""extpv host service: turns guest affinity requests into isolated host placements."""
