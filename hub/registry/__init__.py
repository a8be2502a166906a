"""The device registry: schema, migrations and every read and write of device, certificate and audit state."""
