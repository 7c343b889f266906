"""The ward's ledger: one database that remembers every sample, model, forget request, key and event.

Every public method is one transaction, so a crash (even ``kill -9``) at any point leaves either the whole change or
none of it. The event log is append-only (the schema refuses UPDATE and DELETE). Images live in the ledger too, so
forgetting erases them in the same transaction that takes the forget into effect. The database is an SQLite file in the
ward (the default) or a PostgreSQL database that several machines share (:mod:`dataward.store.database`); the queries
below are the same for both.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from dataward.errors import DatawardError
from dataward.store.database import Database, connect, copy_tables
from dataward.store.tables import SCHEMA_VERSION

UNERASED = "unerased-forget:"  # meta key prefix: a forget request whose images may still be in the ledger's files
ALL_COMPARTMENTS = "all"  # an API key's grant stored as such: every compartment at each request, those added later included


@dataclass(frozen=True)
class ModelRecord:
    """One row of the models table."""

    id: int
    kind: str
    compartment: int | None
    stage: int
    path: str
    ids_hash: str
    status: str
    public: bool
    metadata: dict


class Ledger:
    """Access to a ward's ledger at ``location``: an SQLite file path or a PostgreSQL URL. Every public method is one
    transaction."""

    def __init__(self, location: Path | str, create: bool = False):
        self.db: Database = connect(location, create)
        try:
            if create:
                with self.transaction() as db:
                    db.create_schema()
                    db.execute("INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT (key) DO NOTHING", (str(SCHEMA_VERSION),))
            version = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except DatawardError:
            self.db.close()
            raise
        except Exception as error:  # sqlite3.DatabaseError or psycopg.Error: not a ledger, or a damaged one
            self.db.close()
            raise DatawardError(f"{self.db.where} is not a readable dataward ledger ({str(error).strip()}): it is damaged or "
                                "not a ledger; restore the ward from a backup") from None
        if version is None or int(version[0]) != SCHEMA_VERSION:
            self.db.close()
            raise DatawardError(f"{self.db.where}: ledger schema version {version and version[0]} is not the supported {SCHEMA_VERSION}")

    def close(self) -> None:
        """Close the connection."""
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[Database]:
        """A write transaction: all or nothing, even under kill -9; writers run one at a time."""
        with self.db.transaction() as db:
            yield db

    def copy_into(self, location: str) -> int:
        """Copy this whole ledger into a new, empty ledger database at ``location`` in one transaction (see
        ``dataward ledger move``). Returns the number of rows copied."""
        target = connect(location)
        try:
            with target.transaction():
                target.create_schema()
                return copy_tables(self.db, target)
        finally:
            target.close()

    # events -------------------------------------------------------------------------------------------------------
    @staticmethod
    def log(db: Database, kind: str, **detail) -> None:
        """Append an event inside the caller's transaction."""
        db.execute("INSERT INTO events (at, kind, detail) VALUES (?, ?, ?)", (time.time(), kind, json.dumps(detail, sort_keys=True)))

    def record_event(self, kind: str, **detail) -> None:
        """Append one event in its own transaction."""
        with self.transaction() as db:
            self.log(db, kind, **detail)

    def events_of(self, kind: str) -> list[dict]:
        """Every event of ``kind``, oldest first."""
        rows = self.db.execute("SELECT id, at, detail FROM events WHERE kind=? ORDER BY id", (kind,)).fetchall()
        return [{"id": r[0], "at": r[1], "detail": json.loads(r[2])} for r in rows]

    def latest_model_id(self) -> int:
        """The newest model's ID (0 when none): it changes whenever a model is registered."""
        return self.db.execute("SELECT COALESCE(MAX(id), 0) FROM models").fetchone()[0]

    def events(self, limit: int = 50) -> list[dict]:
        """The newest events, newest first."""
        rows = self.db.execute("SELECT id, at, kind, detail FROM events ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [{"id": r[0], "at": r[1], "kind": r[2], "detail": json.loads(r[3])} for r in rows]

    # samples ------------------------------------------------------------------------------------------------------
    def add_samples(self, rows: list[tuple], compartments: dict[int, str], event: str, **detail) -> None:
        """Insert samples ``(id, label, compartment, slice, source, owner, image float32 array)`` and new compartments."""
        now = time.time()
        with self.transaction() as db:
            existing = {r[0] for r in db.execute("SELECT id FROM compartments")}
            for cid, source in sorted(compartments.items()):
                if cid not in existing:
                    db.execute("INSERT INTO compartments VALUES (?, ?, ?)", (cid, source, now))
            clash = []
            for sample_id, *_ in rows:
                if db.execute("SELECT 1 FROM samples WHERE id=?", (sample_id,)).fetchone():
                    clash.append(sample_id)
                    if len(clash) >= 5:
                        break
            if clash:
                raise DatawardError(f"sample ID(s) already in the ward: {', '.join(clash)}")
            db.executemany(
                "INSERT INTO samples (id, label, compartment, slice, source, owner, image, added_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(i, l, c, s, src, o, np.ascontiguousarray(img, dtype=np.float32).tobytes(), now) for i, l, c, s, src, o, img in rows],
            )
            self.log(db, event, count=len(rows), **detail)

    def compartments(self) -> list[int]:
        """All compartment IDs, in order."""
        return [r[0] for r in self.db.execute("SELECT id FROM compartments ORDER BY id")]

    def compartment_sources(self) -> dict[int, str]:
        """Compartment ID -> the source or owner it was made from."""
        return dict(self.db.execute("SELECT id, source FROM compartments ORDER BY id").fetchall())

    def samples(self, compartment: int | None = None, max_slice: int | None = None, include_forgotten: bool = False,
                images: bool = True) -> list[tuple]:
        """``(id, label, compartment, slice, image bytes)`` sorted by ID (without the image unless ``images``); live samples
        unless ``include_forgotten``."""
        query = f"SELECT id, label, compartment, slice{', image' if images else ''} FROM samples WHERE 1=1"
        args: list = []
        if not include_forgotten:
            query += " AND forgotten_at IS NULL"
        if compartment is not None:
            query += " AND compartment=?"
            args.append(compartment)
        if max_slice is not None:
            query += " AND slice<=?"
            args.append(max_slice)
        return self.db.execute(query + " ORDER BY id", args).fetchall()

    def sample_rows(self, ids: list[str]) -> dict[str, tuple]:
        """``id -> (compartment, slice, forgotten_at)`` for the known IDs among ``ids``."""
        out = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for r in self.db.execute(f"SELECT id, compartment, slice, forgotten_at FROM samples WHERE id IN ({marks})", chunk):
                out[r[0]] = r[1:]
        return out

    def counts(self) -> dict[int, dict]:
        """Per compartment: live sample count, forgotten count, label histogram."""
        out: dict[int, dict] = {c: {"samples": 0, "forgotten": 0, "labels": {}} for c in self.compartments()}
        for c, label, forgotten, n in self.db.execute(
            "SELECT compartment, label, forgotten_at IS NOT NULL, COUNT(*) FROM samples GROUP BY compartment, label, forgotten_at IS NOT NULL"
        ):
            if forgotten:
                out[c]["forgotten"] += n
            else:
                out[c]["samples"] += n
                if label is not None:
                    out[c]["labels"][int(label)] = n
        return out

    # models -------------------------------------------------------------------------------------------------------
    def register_model(self, kind: str, compartment: int | None, stage: int, path: str, sample_ids: list[str], ids_hash: str,
                       metadata: dict, public: bool = False) -> int:
        """Record a finished model as ready, with the exact IDs it saw; one transaction."""
        with self.transaction() as db:
            # a forget accepted while this model trained: it is born quarantined, never served
            forgotten = self._any_forgotten(db, sample_ids)
            status = "quarantined" if forgotten else "ready"
            model_id = db.insert(
                "INSERT INTO models (kind, compartment, stage, path, ids_hash, status, public, metadata, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (kind, compartment, stage, path, ids_hash, status, int(public), json.dumps(metadata, sort_keys=True), time.time()),
            )
            db.executemany("INSERT INTO model_samples VALUES (?, ?)", [(model_id, s) for s in sample_ids])
            self.log(db, "model-ready" if not forgotten else "model-quarantined", model=model_id, model_kind=kind, compartment=compartment,
                     stage=stage, ids_hash=ids_hash)
        return model_id

    @staticmethod
    def _any_forgotten(db: Database, sample_ids: list[str]) -> bool:
        for start in range(0, len(sample_ids), 500):
            chunk = sample_ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            if db.execute(f"SELECT 1 FROM samples WHERE forgotten_at IS NOT NULL AND id IN ({marks}) LIMIT 1", chunk).fetchone():
                return True
        return False

    def models(self, kind: str | None = None, compartment: int | None = None, status: str | None = "ready", any_compartment: bool = False) -> list[ModelRecord]:
        """Models, filtered; newest stage last."""
        query = "SELECT id, kind, compartment, stage, path, ids_hash, status, public, metadata FROM models WHERE 1=1"
        args: list = []
        if kind is not None:
            query += " AND kind=?"
            args.append(kind)
        if not any_compartment and compartment is None:
            query += " AND compartment IS NULL"
        elif not any_compartment:
            query += " AND compartment=?"
            args.append(compartment)
        if status is not None:
            query += " AND status=?"
            args.append(status)
        rows = self.db.execute(query + " ORDER BY stage, id", args).fetchall()
        return [ModelRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], bool(r[7]), json.loads(r[8])) for r in rows]

    def set_status(self, model_ids: list[int], status: str, event: str) -> None:
        """Change models' status in one transaction."""
        if not model_ids:
            return
        with self.transaction() as db:
            db.executemany("UPDATE models SET status=? WHERE id=?", [(status, m) for m in model_ids])
            self.log(db, event, models=model_ids)

    def ready_models(self, model_ids: list[int]) -> set[int]:
        """Those of ``model_ids`` whose status is ready (not quarantined, deleted or retired)."""
        ids = sorted(set(model_ids))
        if not ids:
            return set()
        return {r[0] for r in self.db.execute(f"SELECT id FROM models WHERE id IN ({','.join('?' * len(ids))}) AND status='ready'", ids)}

    def tainted_models(self, model_ids: list[int]) -> list[int]:
        """Those of ``model_ids`` no longer servable after a forget (quarantined/deleted) or trained on a forgotten ID, sorted."""
        ids = sorted(set(model_ids))
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        bad = {r[0] for r in self.db.execute(f"SELECT id FROM models WHERE id IN ({marks}) AND status NOT IN ('ready', 'retired')", ids)}
        bad |= {r[0] for r in self.db.execute(
            f"SELECT DISTINCT ms.model_id FROM samples s JOIN model_samples ms ON ms.sample_id = s.id "
            f"WHERE s.forgotten_at IS NOT NULL AND ms.model_id IN ({marks})", ids)}
        return sorted(bad)

    # forgetting ---------------------------------------------------------------------------------------------------
    def accept_forget(self, request_id: str, ids: list[str]) -> list[int]:
        """Take a forget into effect in ONE transaction: record it, erase the images (NULL; physically once
        :meth:`erase_forgotten` succeeds), quarantine every model that saw them. Returns the quarantined model IDs."""
        now = time.time()
        with self.transaction() as db:
            db.execute("INSERT INTO forget_requests VALUES (?, ?, 'accepted', ?, NULL)", (request_id, json.dumps(ids), now))
            db.execute("INSERT INTO meta VALUES (?, '')", (UNERASED + request_id,))
            db.executemany("UPDATE samples SET forgotten_at=?, image=NULL WHERE id=?", [(now, i) for i in ids])
            marks = ",".join("?" * len(ids))
            tainted = [r[0] for r in db.execute(f"SELECT DISTINCT m.id FROM models m JOIN model_samples s ON s.model_id=m.id "
                                                 f"WHERE s.sample_id IN ({marks}) AND m.status IN ('ready', 'retired')", ids)]
            db.executemany("UPDATE models SET status='quarantined' WHERE id=?", [(m,) for m in tainted])
            self.log(db, "forget-accepted", request=request_id, count=len(ids), quarantined=tainted)
        return tainted

    def unerased_forgets(self) -> list[str]:
        """Forget requests whose images may still be in the ledger's files (a reader of an older snapshot delays it)."""
        return [r[0][len(UNERASED):] for r in self.db.execute("SELECT key FROM meta WHERE key LIKE ? ORDER BY key", (UNERASED + "%",))]

    def erase_forgotten(self) -> bool:
        """One attempt, never waiting, to make the erasure of every accepted forget physical
        (:meth:`dataward.store.database.SqliteDatabase.erase_old_pages`); on success the requests are marked erased (a
        ``forget-erased`` event). Returns whether nothing is left to erase."""
        pending = self.unerased_forgets()
        if not pending:
            return True
        if not self.db.erase_old_pages():
            return False
        with self.transaction() as db:
            db.executemany("DELETE FROM meta WHERE key=?", [(UNERASED + r,) for r in pending])
            self.log(db, "forget-erased", requests=pending)
        return True

    def pending_forgets(self) -> list[tuple[str, list[str]]]:
        """Forget requests in effect whose retraining has not finished."""
        return [(r[0], json.loads(r[1])) for r in self.db.execute("SELECT id, ids FROM forget_requests WHERE state='accepted' ORDER BY created_at")]

    def finish_forgets(self, request_ids: list[str]) -> None:
        """Mark forget requests done."""
        with self.transaction() as db:
            db.executemany("UPDATE forget_requests SET state='done', finished_at=? WHERE id=?", [(time.time(), r) for r in request_ids])
            self.log(db, "forget-done", requests=request_ids)

    def forget_request(self, request_id: str) -> dict | None:
        """One forget request's state (``erased``: no copy of its images is left in the ledger's files), or None if unknown."""
        r = self.db.execute("SELECT id, ids, state, created_at, finished_at FROM forget_requests WHERE id=?", (request_id,)).fetchone()
        if r is None:
            return None
        erased = self.db.execute("SELECT 1 FROM meta WHERE key=?", (UNERASED + request_id,)).fetchone() is None
        return {"id": r[0], "ids": json.loads(r[1]), "state": r[2], "created_at": r[3], "finished_at": r[4], "erased": erased}

    def forgotten_ids(self) -> list[str]:
        """Every forgotten sample ID, sorted."""
        return [r[0] for r in self.db.execute("SELECT id FROM samples WHERE forgotten_at IS NOT NULL ORDER BY id")]

    def forget_count(self) -> int:
        """How many forget requests were ever accepted: it changes exactly when a forget takes effect."""
        return self.db.execute("SELECT COUNT(*) FROM forget_requests").fetchone()[0]

    # meta ---------------------------------------------------------------------------------------------------------
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        """A value from the meta table."""
        r = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if r is None else r[0]

    def set_meta(self, key: str, value: str, event: str | None = None) -> None:
        """Set a meta value (and log an event) in one transaction."""
        with self.transaction() as db:
            db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value=excluded.value", (key, value))
            if event:
                self.log(db, event, key=key, value=value)

    # api keys (the service: dataward.app.service) ---------------------------------------------------------------------
    # Only the SHA-256 of a key is stored; the raw key is returned once by create_key and never again.
    KEY_PREFIX = "dw_"

    @staticmethod
    def hash_key(key: str) -> str:
        """SHA-256 hex digest of a raw API key (what the ledger stores and looks up)."""
        return hashlib.sha256(key.encode("utf-8")).hexdigest()

    def create_key(self, name: str, allow: list[int] | str, admin: bool = False) -> tuple[int, str]:
        """Make an API key reaching compartments ``allow``, or :data:`ALL_COMPARTMENTS` (admin keys may also forget); returns ``(id, raw key)``.

        The raw key is shown once: only its hash is stored. Names are unique among keys that are not revoked.
        """
        name = name.strip()
        if not name or len(name) > 100:
            raise DatawardError(f"key name must be 1-100 characters, got {name!r}")
        if name.isdigit():
            raise DatawardError(f"key name {name!r} must not be a number (numbers name key IDs in `keys revoke`)")
        allow = allow if allow == ALL_COMPARTMENTS else sorted({int(c) for c in allow})
        if allow != ALL_COMPARTMENTS and (unknown := sorted(set(allow) - set(self.compartments()))):
            raise DatawardError(f"--allow names unknown compartment(s) {unknown}: this ward has {self.compartments()}")
        if not allow and not admin:
            raise DatawardError("--allow must name at least one compartment (only an --admin key may have none)")
        raw = self.KEY_PREFIX + secrets.token_urlsafe(32)
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM api_keys WHERE name=? AND revoked_at IS NULL", (name,)).fetchone():
                raise DatawardError(f"a key named {name!r} already exists: choose another --name or revoke it first")
            key_id = db.insert("INSERT INTO api_keys (name, key_hash, allow, admin, created_at) VALUES (?, ?, ?, ?, ?)",
                               (name, self.hash_key(raw), json.dumps(allow), int(admin), time.time()))
            self.log(db, "key-created", key=key_id, name=name, allow=allow, admin=bool(admin))
        return key_id, raw

    def list_keys(self, include_revoked: bool = True) -> list[dict]:
        """Every key's record (never the key or its hash), oldest first; ``allow`` is a list of compartments or ``"all"``."""
        query = "SELECT id, name, allow, admin, created_at, revoked_at FROM api_keys"
        if not include_revoked:
            query += " WHERE revoked_at IS NULL"
        return [{"id": r[0], "name": r[1], "allow": json.loads(r[2]), "admin": bool(r[3]), "created_at": r[4], "revoked_at": r[5]}
                for r in self.db.execute(query + " ORDER BY id")]

    def revoke_key(self, key: int | str) -> dict:
        """Revoke a key by ID (a number) or name; effective for the very next request. Returns its record."""
        with self.transaction() as db:
            if isinstance(key, int) or str(key).isdigit():
                rows = db.execute("SELECT id, revoked_at FROM api_keys WHERE id=?", (int(key),)).fetchall()
            else:
                rows = db.execute("SELECT id, revoked_at FROM api_keys WHERE name=? AND revoked_at IS NULL", (key,)).fetchall()
            if not rows:
                raise DatawardError(f"no active key with ID or name {key!r} (see `dataward keys WARD list`)")
            key_id, revoked_at = rows[0]
            if revoked_at is None:
                db.execute("UPDATE api_keys SET revoked_at=? WHERE id=?", (time.time(), key_id))
                self.log(db, "key-revoked", key=key_id)
        return next(k for k in self.list_keys() if k["id"] == key_id)

    def key_for_hash(self, key_hash: str) -> dict | None:
        """The key record whose stored hash equals ``key_hash`` (revoked ones too: check ``revoked_at``), or None.

        The stored hash is compared with :func:`hmac.compare_digest` after the indexed lookup.
        """
        r = self.db.execute("SELECT id, name, key_hash, allow, admin, revoked_at FROM api_keys WHERE key_hash=?", (key_hash,)).fetchone()
        if r is None or not hmac.compare_digest(r[2], key_hash):
            return None
        allow = json.loads(r[3])  # "all": every compartment the ward has now
        return {"id": r[0], "name": r[1], "allow": self.compartments() if allow == ALL_COMPARTMENTS else allow, "admin": bool(r[4]), "revoked_at": r[5]}

    def model_sample_ids(self, model_id: int) -> set[str]:
        """The sample IDs a model was trained on."""
        return {r[0] for r in self.db.execute("SELECT sample_id FROM model_samples WHERE model_id=?", (model_id,))}
