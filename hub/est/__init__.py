"""The hub's EST service (RFC 7030 on top of est/), its HTTPS server, rate limits and factory bundles."""
