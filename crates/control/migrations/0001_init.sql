-- Trellis control plane, initial schema. Times are unix seconds.
-- Secrets (API keys, join tokens, node secrets) are stored only as SHA-256 hex digests.

CREATE TABLE accounts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT    NOT NULL UNIQUE,
    cidr        TEXT    NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE api_keys (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    key_hash    TEXT    NOT NULL UNIQUE,
    account_id  INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    operator    INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL
);

CREATE TABLE join_tokens (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    token_hash  TEXT    NOT NULL UNIQUE,
    account_id  INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    reusable    INTEGER NOT NULL DEFAULT 0,
    expires_at  INTEGER NOT NULL,
    uses        INTEGER NOT NULL DEFAULT 0,
    tags        TEXT    NOT NULL DEFAULT '[]',
    created_at  INTEGER NOT NULL
);

CREATE TABLE nodes (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id   INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    name         TEXT    NOT NULL,
    public_key   TEXT    NOT NULL UNIQUE,
    ip           TEXT    NOT NULL,
    secret_hash  TEXT    NOT NULL UNIQUE,
    hostname     TEXT    NOT NULL DEFAULT '',
    os           TEXT    NOT NULL DEFAULT '',
    version      TEXT    NOT NULL DEFAULT '',
    tags         TEXT    NOT NULL DEFAULT '[]',
    listen_port  INTEGER,
    local_addrs  TEXT    NOT NULL DEFAULT '[]',
    observed_ip  TEXT,
    created_at   INTEGER NOT NULL,
    last_seen    INTEGER,
    UNIQUE (account_id, name),
    UNIQUE (account_id, ip)
);

CREATE INDEX nodes_account ON nodes(account_id);

CREATE TABLE revoked_keys (
    public_key  TEXT    PRIMARY KEY,
    account_id  INTEGER,
    revoked_at  INTEGER NOT NULL
);
