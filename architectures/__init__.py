"""Our own implementations of published architectures; each family module exports FAMILY."""
