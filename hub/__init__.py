"""Tessera hub: fleet CA hierarchy, device registry, EST enrollment service, broker control, fleet CLI."""
