"""The edge: where every request is checked once (tokens and roles, size limits, TLS) and gRPC's
plumbing. It does not import Ray."""
