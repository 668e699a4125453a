"""Multi-host test harness: hosts in network namespaces, faults, and real gpud nodes."""
