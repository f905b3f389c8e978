-- Bindings: credentials for code without a VPN client (AI agents, serverless
-- functions, CI jobs) to reach an account's network through the edge's fetch
-- gateway. The secret is shown once; only its SHA-256 (32 bytes) is stored.
-- Revoked bindings are kept (their address is never handed out again, and
-- the request log keeps naming them).
CREATE TABLE bindings (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id    INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    public_id     TEXT    NOT NULL UNIQUE,
    name          TEXT    NOT NULL,
    secret_hash   BLOB    NOT NULL,
    ip            TEXT    NOT NULL,
    tags          TEXT    NOT NULL DEFAULT '[]',
    created_at    INTEGER NOT NULL,
    expires_at    INTEGER,
    revoked_at    INTEGER,
    requests      INTEGER NOT NULL DEFAULT 0,
    last_used_at  INTEGER
);

-- One binding of a name per account among those not revoked.
CREATE UNIQUE INDEX bindings_live_name ON bindings(account_id, name) WHERE revoked_at IS NULL;
CREATE INDEX bindings_account ON bindings(account_id);

-- The request log: one row per request through the gateway.
CREATE TABLE requests (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id   INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    binding_id   INTEGER REFERENCES bindings(id) ON DELETE SET NULL,
    binding      TEXT    NOT NULL,
    start_ms     INTEGER NOT NULL,
    duration_ms  INTEGER NOT NULL,
    form         TEXT    NOT NULL,
    method       TEXT    NOT NULL,
    target       TEXT    NOT NULL,
    dst_ip       TEXT,
    dst_port     INTEGER NOT NULL,
    node         TEXT,
    path         TEXT,
    status       INTEGER NOT NULL,
    bytes_up     INTEGER NOT NULL,
    bytes_down   INTEGER NOT NULL,
    decision     TEXT    NOT NULL,
    rule         TEXT,
    error        TEXT
);

CREATE INDEX requests_account_time ON requests(account_id, start_ms);
CREATE INDEX requests_binding ON requests(binding_id);
CREATE INDEX requests_time ON requests(start_ms);
