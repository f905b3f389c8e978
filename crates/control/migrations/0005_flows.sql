-- Flow logs: every connection the nodes saw, shipped over their control streams.
-- Times are unix milliseconds. Counters are stored as signed 64-bit integers
-- (saturated). No foreign key to nodes: the logs of a deleted node are kept
-- until retention removes them.

CREATE TABLE flows (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id   INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    node_id      INTEGER NOT NULL,
    node_name    TEXT    NOT NULL,
    start_ms     BIGINT  NOT NULL,
    end_ms       BIGINT  NOT NULL,
    proto        TEXT    NOT NULL,
    src_ip       TEXT    NOT NULL,
    src_port     INTEGER NOT NULL,
    src_node     TEXT    NOT NULL DEFAULT '',
    dst_ip       TEXT    NOT NULL,
    dst_port     INTEGER NOT NULL,
    dst_node     TEXT    NOT NULL DEFAULT '',
    direction    TEXT    NOT NULL,
    packets_out  BIGINT  NOT NULL,
    bytes_out    BIGINT  NOT NULL,
    packets_in   BIGINT  NOT NULL,
    bytes_in     BIGINT  NOT NULL,
    path         TEXT    NOT NULL,
    decision     TEXT    NOT NULL,
    rule         TEXT    NOT NULL DEFAULT '',
    count        BIGINT  NOT NULL DEFAULT 1,
    end_reason   TEXT    NOT NULL,
    received_ms  BIGINT  NOT NULL
);

-- Newest-first pages and cursors of one account.
CREATE INDEX flows_account_id ON flows(account_id, id);
-- `since`/`until` of one account.
CREATE INDEX flows_account_end ON flows(account_id, end_ms);
-- Retention.
CREATE INDEX flows_end ON flows(end_ms);

-- The last flow batch stored per node: a batch numbered at or below it is a
-- resend (its ack was lost) and is acknowledged without being stored again.
CREATE TABLE node_flow_seq (
    node_id   INTEGER PRIMARY KEY REFERENCES nodes(id) ON DELETE CASCADE,
    last_seq  BIGINT  NOT NULL
);
