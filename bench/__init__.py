"""Tessera benchmarks: `python -m bench [keygen] [sign] [tls]`."""
