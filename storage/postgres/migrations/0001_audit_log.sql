-- Audit log: one hash chain per writer (a process instance), append-only.
-- time_ns holds Record.Time as Unix nanoseconds: the record hash covers
-- nanoseconds, which timestamptz (microseconds) would lose. Certificate
-- validity reaches year 9999, beyond int64 nanoseconds, so it is kept as
-- seconds plus nanoseconds (NULL when absent).
CREATE TABLE audit_log (
    writer             text    NOT NULL,
    seq                bigint  NOT NULL CHECK (seq > 0),
    time_ns            bigint  NOT NULL,
    kind               text    NOT NULL,
    request_id         text    NOT NULL DEFAULT '',
    peer               text    NOT NULL DEFAULT '',
    auth_method        text    NOT NULL DEFAULT '',
    caller             text    NOT NULL DEFAULT '',
    cluster_id         text    NOT NULL DEFAULT '',
    requested_identity text    NOT NULL DEFAULT '',
    granted_identity   text    NOT NULL DEFAULT '',
    outcome            text    NOT NULL,
    reason             text    NOT NULL DEFAULT '',
    code               text    NOT NULL DEFAULT '',
    serial             text    NOT NULL DEFAULT '',
    not_before_s       bigint,
    not_before_ns      integer,
    not_after_s        bigint,
    not_after_ns       integer,
    cert_sha256        text    NOT NULL DEFAULT '',
    signer             text    NOT NULL DEFAULT '',
    issuer_key_id      text    NOT NULL DEFAULT '',
    detail             text    NOT NULL DEFAULT '',
    prev_hash          text    NOT NULL,
    hash               text    NOT NULL,
    PRIMARY KEY (writer, seq)
);

-- Inventory indexes. Results are ordered by (writer, seq); the indexes of
-- filters that can match millions of rows (identity, issuer, outcome) end in
-- (writer, seq) so that a filtered, paged query is one ordered index range
-- scan that stops at LIMIT. Serial and fingerprint match one row or two.
CREATE INDEX audit_log_granted   ON audit_log (granted_identity, writer, seq) WHERE granted_identity <> '';
CREATE INDEX audit_log_requested ON audit_log (requested_identity, writer, seq) WHERE requested_identity <> '';
CREATE INDEX audit_log_serial    ON audit_log (serial) WHERE serial <> '';
CREATE INDEX audit_log_cert      ON audit_log (cert_sha256) WHERE cert_sha256 <> '';
CREATE INDEX audit_log_issuer    ON audit_log (issuer_key_id, writer, seq) WHERE issuer_key_id <> '';
CREATE INDEX audit_log_outcome   ON audit_log (outcome, writer, seq);
CREATE INDEX audit_log_time      ON audit_log (time_ns);

-- Signed prune checkpoints (storage.Checkpoint); writers is the JSON array of
-- its entries.
CREATE TABLE audit_checkpoint (
    id        bigint PRIMARY KEY,
    time_ns   bigint NOT NULL,
    before_ns bigint NOT NULL,
    writers   text   NOT NULL,
    key_id    text   NOT NULL,
    signature text   NOT NULL
);
