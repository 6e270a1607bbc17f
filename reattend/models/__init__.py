"""Teacher loading and per-architecture adapters."""
