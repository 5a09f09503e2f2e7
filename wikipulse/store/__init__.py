"""Redis: connecting (one server or a cluster), retrying, leases, the keys, the streams and their bounds."""
