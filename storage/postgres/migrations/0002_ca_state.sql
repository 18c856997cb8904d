-- CA rotation state (ca/rotation): the CAs with their phases, the version
-- every change compare-and-swaps on, and per CA an upper bound of the
-- NotAfter of every certificate it issued. Private keys are stored only as
-- sealed_key, AES-256-GCM ciphertext under a key-encryption key that never
-- enters the database.
CREATE TABLE ca_state (
    id      boolean PRIMARY KEY DEFAULT true CHECK (id),
    version bigint  NOT NULL
);

CREATE TABLE ca_authority (
    key_id         text        PRIMARY KEY,
    role           text        NOT NULL,
    root_id        text        NOT NULL,
    source         text        NOT NULL,
    phase          text        NOT NULL,
    cert_der       bytea       NOT NULL,
    sealed_key     bytea,
    prepared_at    timestamptz,
    activated_at   timestamptz,
    deactivated_at timestamptz,
    retired_at     timestamptz
);

CREATE TABLE ca_dependents (
    key_id    text        PRIMARY KEY,
    not_after timestamptz NOT NULL
);
