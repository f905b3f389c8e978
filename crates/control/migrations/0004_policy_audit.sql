-- Policies (versioned, per account), join-token revocation and the audit log.

-- Every version of every account's policy. A change adds a version; nothing
-- is ever rewritten. The newest version is in force. `rules` is the number of
-- rules the text holds (counted when it was validated). Accounts that exist
-- when this migration runs get version 1 (trellis_policy::DEFAULT_POLICY,
-- allow all) from Store::open_sqlite, which keeps that text in one place.
CREATE TABLE policies (
    account_id  INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    version     INTEGER NOT NULL,
    text        TEXT    NOT NULL,
    rules       INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL,
    author      TEXT    NOT NULL,
    PRIMARY KEY (account_id, version)
);

-- A revoked join token enrolls nothing any more (unix seconds; NULL: not revoked).
ALTER TABLE join_tokens ADD COLUMN revoked_at INTEGER;

-- Every admin change: who (the credential that acted), when (unix ms), what.
-- No foreign key: the record outlives what it talks about.
CREATE TABLE audit_log (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id  INTEGER NOT NULL,
    at_ms       INTEGER NOT NULL,
    actor       TEXT    NOT NULL,
    action      TEXT    NOT NULL,
    target      TEXT    NOT NULL,
    detail      TEXT    NOT NULL DEFAULT ''
);

CREATE INDEX audit_log_account ON audit_log(account_id, id);
CREATE INDEX audit_log_account_time ON audit_log(account_id, at_ms);

CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END;

CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END;
