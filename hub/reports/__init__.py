"""Fleet reports computed from the registry (the certificate expiry report: hub/reports/expiry.py)."""
