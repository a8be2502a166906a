"""Certificate authorities: the hierarchy, issuance policy, CRL building and publication, moving CA keys."""
