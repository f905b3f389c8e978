-- The dashboard: its admins (people who log in with email and password),
-- their server-side sessions, the one-time setup token and the wizard's progress.

-- A dashboard admin acts on one account. Passwords are stored as argon2id PHC
-- strings; emails are kept lower-case and are unique across the server.
CREATE TABLE dashboard_admins (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id     INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    email          TEXT    NOT NULL UNIQUE,
    password_hash  TEXT    NOT NULL,
    created_at     INTEGER NOT NULL
);

CREATE INDEX dashboard_admins_account ON dashboard_admins(account_id);

-- A logged-in browser. The cookie holds the session id; only its SHA-256 is
-- stored. csrf is the token every form of this session must send back.
CREATE TABLE dashboard_sessions (
    id_hash     TEXT    PRIMARY KEY,
    admin_id    INTEGER NOT NULL REFERENCES dashboard_admins(id) ON DELETE CASCADE,
    csrf        TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL
);

CREATE INDEX dashboard_sessions_admin ON dashboard_sessions(admin_id);

-- The one-time setup token (SHA-256), made at each start while no admin
-- exists; deleted when the first admin is created with it.
CREATE TABLE dashboard_setup (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    token_hash  TEXT    NOT NULL,
    created_at  INTEGER NOT NULL
);

-- How far each account's admins got in the first-run wizard.
CREATE TABLE dashboard_wizard (
    account_id        INTEGER PRIMARY KEY REFERENCES accounts(id) ON DELETE CASCADE,
    network_named_at  INTEGER,
    done_at           INTEGER
);
