"""The ledger's SQLite schema: one table per thing the ward remembers, and the append-only event log."""

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS compartments (
    id INTEGER PRIMARY KEY,               -- 0..K-1, never reused
    source TEXT NOT NULL,                 -- the data source spec or owner it was made from
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS samples (
    id TEXT PRIMARY KEY,                  -- stable sample ID, e.g. digits:0042
    label INTEGER,                        -- class label or NULL
    compartment INTEGER NOT NULL REFERENCES compartments(id),
    slice INTEGER NOT NULL,               -- SISA slice within the compartment
    source TEXT NOT NULL,
    owner TEXT,
    image BLOB,                           -- float32 (C, H, W) in [-1, 1]; NULL once forgotten
    added_at REAL NOT NULL,
    forgotten_at REAL                     -- NULL while the sample is part of the ward
);
CREATE INDEX IF NOT EXISTS samples_by_compartment ON samples (compartment, slice);
CREATE TABLE IF NOT EXISTS models (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,                   -- denoiser | router | guard | public-denoiser | autoencoder
    compartment INTEGER,                  -- NULL for models that span compartments (router) or none (public)
    stage INTEGER NOT NULL,               -- SISA stage: trained on slices 0..stage
    path TEXT NOT NULL,                   -- folder under the ward
    ids_hash TEXT NOT NULL,               -- sha256 of the sorted sample IDs it was trained on
    status TEXT NOT NULL,                 -- ready | quarantined | retired | deleted
    public INTEGER NOT NULL DEFAULT 0,    -- 1 when trained on public data only
    metadata TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS model_samples (
    model_id INTEGER NOT NULL REFERENCES models(id),
    sample_id TEXT NOT NULL,
    PRIMARY KEY (sample_id, model_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS forget_requests (
    id TEXT PRIMARY KEY,
    ids TEXT NOT NULL,                    -- JSON list of sample IDs
    state TEXT NOT NULL,                  -- accepted (in effect, retraining pending) | done
    created_at REAL NOT NULL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS api_keys (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,        -- sha256 of the key; the key itself is never stored
    allow TEXT NOT NULL,                  -- JSON list of compartment IDs
    admin INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL                  -- JSON
);
CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
"""
