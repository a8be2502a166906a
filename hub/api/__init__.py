"""The HTTPS fleet API: operators by client certificate, devices, bulk actions, OpenAPI, metrics."""
