"""Manufacturer CAs and factory birth certificates (IEEE 802.1AR IDevIDs): trust, allowlist, first use."""
