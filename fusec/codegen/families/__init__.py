"""Kernel families: one module per template family; each registers itself with ``@family``."""
