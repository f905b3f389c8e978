-- Mesh nodes (subnet routers) and names.

-- Tokens that approve the routes their nodes advertise; a node remembers the
-- flag of the token it enrolled with, so later advertisements are approved too.
ALTER TABLE join_tokens ADD COLUMN routes_auto_approve INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN routes_auto_approve INTEGER NOT NULL DEFAULT 0;

-- Subnets a node advertises (or advertised: a withdrawn route keeps its row,
-- with advertised = 0, so that its approval survives re-advertisement).
-- approved_seq orders approvals (the first approved online node is primary);
-- NULL means not approved.
CREATE TABLE routes (
    node_id       INTEGER NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
    cidr          TEXT    NOT NULL,
    advertised    INTEGER NOT NULL DEFAULT 1,
    approved_seq  INTEGER,
    approved_at   INTEGER,
    created_at    INTEGER NOT NULL,
    PRIMARY KEY (node_id, cidr)
);

CREATE INDEX routes_cidr ON routes(cidr);

-- Extra names of an account: NAME.ACCOUNT.SUFFIX → addr.
CREATE TABLE dns_records (
    account_id  INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    name        TEXT    NOT NULL,
    addr        TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (account_id, name)
);
