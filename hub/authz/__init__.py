"""Authorization: principals (devices, the hub, service identities), roles as data, the policy every broker reads."""
