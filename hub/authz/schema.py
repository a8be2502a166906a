"""The registry tables behind authorization, and the one view every broker-side enforcement point reads.

`authz_credentials` answers the plugin's only per-connect question with one indexed lookup: "which principal is
(issuer, serial), what is its role, its groups, and are it and this certificate still good?". `authz_events` is
written in the same transaction as every change that can alter a live session's rights (status, supersession,
groups, roles, identity revocation); the plugin follows it (each broker tick, and at once when the hub rings on
$CONTROL), so a commit alone is enough for a change to bite.
"""

from __future__ import annotations

#: Statements run at every registry open (idempotent).
AUTHZ_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS roles (name TEXT PRIMARY KEY, description TEXT NOT NULL DEFAULT '')""",
    """CREATE TABLE IF NOT EXISTS role_rules (
        role TEXT NOT NULL REFERENCES roles(name) ON DELETE CASCADE,
        action TEXT NOT NULL CHECK (action IN ('publish', 'retain', 'subscribe', 'receive')),
        pattern TEXT NOT NULL, PRIMARY KEY (role, action, pattern)) WITHOUT ROWID""",
    # Service identities and the hub itself (kind 'hub'): certificates from the service CA.
    """CREATE TABLE IF NOT EXISTS identities (
        name TEXT PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('service', 'hub')),
        role TEXT NOT NULL REFERENCES roles(name),
        status TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
        created TEXT NOT NULL, revoked_at TEXT, description TEXT NOT NULL DEFAULT '')""",
    """CREATE TABLE IF NOT EXISTS identity_certificates (
        serial TEXT PRIMARY KEY, identity TEXT NOT NULL REFERENCES identities(name), subject TEXT NOT NULL,
        not_before TEXT NOT NULL, not_after TEXT NOT NULL, fingerprint_sha256 TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('active', 'superseded', 'revoked')),
        grace_until TEXT, revoked_at TEXT, revocation_reason TEXT, issued_at TEXT NOT NULL, pem TEXT NOT NULL)""",
    """CREATE INDEX IF NOT EXISTS identity_certificates_identity ON identity_certificates(identity)""",
    # principal NULL: re-check every live session (a role changed).
    """CREATE TABLE IF NOT EXISTS authz_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL, principal TEXT, reason TEXT NOT NULL)""",
    """CREATE INDEX IF NOT EXISTS certificates_revoked ON certificates(status, revoked_at) WHERE status = 'revoked'""",
    """DROP VIEW IF EXISTS authz_credentials""",
    """CREATE VIEW authz_credentials AS
        SELECT 'device' AS issuer, c.serial AS serial, c.device_id AS principal, 'device' AS kind, 'device' AS role,
               c.status AS cert_status, d.status AS principal_status, c.not_before AS not_before,
               c.not_after AS not_after, c.grace_until AS grace_until, d.groups AS groups
        FROM certificates c JOIN devices d ON d.id = c.device_id
        UNION ALL
        SELECT 'service', ic.serial, CASE i.kind WHEN 'hub' THEN i.name ELSE 'svc.' || i.name END, i.kind, i.role,
               ic.status, i.status, ic.not_before, ic.not_after, ic.grace_until, '[]'
        FROM identity_certificates ic JOIN identities i ON i.name = ic.identity""",
)

#: Schema 1 -> 2: superseded certificates keep working until `grace_until` (NULL: not superseded).
MIGRATE_1_TO_2 = (
    """ALTER TABLE certificates ADD COLUMN grace_until TEXT""",
    """UPDATE certificates SET grace_until = issued_at WHERE status = 'superseded'""",
)

#: The plugin's lookup (kept here so tests can check its query plan stays an index lookup).
CREDENTIAL_QUERY = ("SELECT principal, kind, role, cert_status, principal_status, not_before, not_after, "
                    "grace_until, groups FROM authz_credentials WHERE issuer = ?1 AND serial = ?2")
RULES_QUERY = "SELECT action, pattern FROM role_rules WHERE role = ?1"
