"""Where a ward's ledger lives: an embedded SQLite file (the default) or a PostgreSQL database (several machines).

A :class:`Database` is one connection with the few operations the ledger needs (``execute``, ``executemany``, an
all-or-nothing write transaction, physical erasure); the ledger's queries (:mod:`dataward.store.ledger`) are written
once, in SQL both engines accept, with ``?`` placeholders.

- **SQLite** (``WARD/ledger.sqlite``): WAL journal with ``synchronous=FULL``; a write transaction is ``BEGIN IMMEDIATE``
  (one writer at a time, readers never wait), so a crash (even ``kill -9``) leaves the whole change or none of it.
  ``secure_delete`` zeroes freed pages and folding the write-ahead log back after a forget (:meth:`erase_old_pages`,
  never waiting on a reader) leaves no copy of an erased image.
  Every connection holds a shared ``flock`` on ``WARD/ledger.sqlite-open`` while it is open (the kernel drops it when
  its process dies): ``dataward ledger move`` takes it exclusively, so it refuses while any process has the ledger open,
  and no process opens it while the move runs.
- **PostgreSQL** (``WARD/ledger.url`` names it, see docs/scale-out.md): every write transaction first takes one
  transaction-level advisory lock, so writers are serialised exactly as SQLite's are, and a forget can never interleave
  with a model's registration. The URL never holds a password: libpq reads it from ``PGPASSWORD`` or ``~/.pgpass``.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Protocol

from dataward.errors import DatawardError, LedgerUnavailable
from dataward.store.tables import COUNTED_TABLES, POSTGRES_SCHEMA, SQLITE_SCHEMA, TABLES

LEDGER_FILE = "ledger.sqlite"
OPEN_MARK_FILE = LEDGER_FILE + "-open"  # shared flock of every process that has the SQLite ledger open (see above)
LEDGER_URL_FILE = "ledger.url"  # present when the ward's ledger is a PostgreSQL database
URL_SCHEMES = ("postgresql://", "postgres://")
WRITER_LOCK_KEY = 0x64617461  # the advisory lock that serialises the ledger's writers in PostgreSQL ("data")
COPY_BATCH = 1000
MIN_SQLITE = (3, 24, 0)  # INSERT ... ON CONFLICT
CONNECT_TIMEOUT_S = 5  # a replica whose ledger is down answers 503 after this long, not after libpq's default
BUSY_TIMEOUT_S = 60.0  # how long an SQLite write waits for another writer (never for a reader: erasure does not wait)


class Database(Protocol):
    """One connection to a ledger database (SQLite or PostgreSQL)."""

    where: str  # a file path or a URL without secrets: what error messages name

    def execute(self, sql: str, args: tuple | list = ()): ...
    def insert(self, sql: str, args: tuple | list) -> int: ...
    def executemany(self, sql: str, rows: list) -> None: ...
    def transaction(self) -> Iterator["Database"]: ...
    def create_schema(self) -> None: ...
    def erase_old_pages(self) -> bool: ...
    def close(self) -> None: ...


class SqliteDatabase:
    """The embedded ledger: one SQLite file in the ward folder."""

    def __init__(self, path: Path, create: bool = False):
        if not create and not path.exists():
            raise DatawardError(f"no ledger at {path}: is this a ward? (create one with `dataward init`)")
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise DatawardError(f"the ledger needs SQLite >= {'.'.join(map(str, MIN_SQLITE))} (upserts); this Python has {sqlite3.sqlite_version}")
        self.where = str(path)
        self.open_mark = os.open(path.with_name(OPEN_MARK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.open_mark, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.open_mark)
            raise DatawardError(f"the ledger {path} is being moved into PostgreSQL (`dataward ledger move`): open the ward "
                                "again when the move has finished") from None
        self.db = sqlite3.connect(str(path), isolation_level=None, timeout=BUSY_TIMEOUT_S, check_same_thread=False)
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.execute("PRAGMA secure_delete=ON")  # freed content (a forgotten image) is overwritten with zeros
        except sqlite3.DatabaseError as error:
            self.close()
            raise DatawardError(f"{path} is not a readable dataward ledger ({error}): the file is damaged or not a ledger; "
                                "restore the ward folder from a backup") from None

    def hold_exclusively(self) -> None:
        """Make this connection the only one (``dataward ledger move``): raise while another one, in any process, is open."""
        try:
            fcntl.flock(self.open_mark, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DatawardError(f"the ledger {self.where} is open in another process (a server, a training, a shell): stop "
                                "every process that uses the ward, then move its ledger (a server that went on writing to "
                                "the old file would lose what it records, acknowledged forgets included)") from None

    def execute(self, sql: str, args: tuple | list = ()) -> sqlite3.Cursor:
        """Run one statement."""
        return self.db.execute(sql, args)

    def insert(self, sql: str, args: tuple | list) -> int:
        """Run one INSERT into a table with an ``id`` counter; returns the new row's ID."""
        return self.db.execute(sql, args).lastrowid

    def executemany(self, sql: str, rows: list) -> None:
        """Run one statement for each row."""
        self.db.executemany(sql, rows)

    @contextmanager
    def transaction(self) -> Iterator["SqliteDatabase"]:
        """An IMMEDIATE transaction: all or nothing, even under kill -9."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def create_schema(self) -> None:
        """Create the tables (in the caller's transaction)."""
        for statement in SQLITE_SCHEMA.split(";\n"):
            if statement.strip():
                self.db.execute(statement)

    def erase_old_pages(self) -> bool:
        """Copy the write-ahead log into the database (whose freed space secure_delete zeroed) and truncate it, so no old
        page image of a forgotten sample stays in ``ledger.sqlite-wal``. Never waits: returns False at once when a reader
        of an older snapshot (or another writer) keeps the log from being truncated now (:mod:`dataward.store.erasure`
        tries again)."""
        self.db.execute("PRAGMA busy_timeout=0")
        try:
            busy, _, _ = self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.OperationalError:  # another connection is checkpointing: try again later
            busy = 1
        finally:
            self.db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        return not busy

    def close(self, keep_open_mark: bool = False) -> None:
        """Close the connection (the last one to close folds the write-ahead log into the database) and its open mark
        (``keep_open_mark``: a move deletes the file before it lets other processes in)."""
        self.db.close()
        if self.open_mark >= 0 and not keep_open_mark:
            os.close(self.open_mark)
            self.open_mark = -1


def check_ledger_url(url: str) -> str:
    """``url`` if it names a PostgreSQL database without a password; a clear error otherwise (never echoing a secret)."""
    if not url.startswith(URL_SCHEMES):
        scheme = url.split("://", 1)[0] if "://" in url else url[:0]
        raise DatawardError(f"a ledger URL starts with postgresql://, e.g. postgresql://dataward@db.example:5432/ward"
                            f"{f', not {scheme}://' if scheme else ''}")
    conninfo = psycopg_module().conninfo
    try:
        fields = conninfo.conninfo_to_dict(url)
    except Exception as error:  # psycopg.ProgrammingError, whose message may quote the URL and so a password
        raise DatawardError(f"not a PostgreSQL URL: {' '.join(str(error).replace(url, 'the URL').split())}") from None
    if fields.get("password"):
        raise DatawardError("the ledger URL holds a password: dataward never stores secrets; drop it from the URL and give it "
                            "to libpq in PGPASSWORD or ~/.pgpass (https://www.postgresql.org/docs/current/libpq-pgpass.html)")
    if not fields.get("dbname"):
        raise DatawardError(f"the ledger URL names no database: {url!r} (postgresql://USER@HOST:PORT/DATABASE)")
    return url


def psycopg_module():
    """psycopg 3 (with its conninfo module), or a clear error saying how to install it."""
    try:
        import psycopg
        import psycopg.conninfo  # noqa: F401
    except ImportError:
        raise DatawardError("a ledger in PostgreSQL needs the psycopg driver: pip install 'dataward[postgres]'") from None
    return psycopg


class PostgresDatabase:
    """A ledger in a PostgreSQL database that every replica's machine reaches (psycopg 3)."""

    def __init__(self, url: str):
        psycopg = psycopg_module()
        self.where = check_ledger_url(url)
        self.errors = (psycopg.Error,)
        self._lost = psycopg.OperationalError
        self._in_transaction = False
        self.db = self._connect()

    def _connect(self):
        """A new connection, or :class:`LedgerUnavailable` saying why there is none."""
        psycopg = psycopg_module()
        try:
            return psycopg.connect(self.where, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
        except psycopg.Error as error:
            raise LedgerUnavailable(f"cannot reach the ledger database {self.where}: {' '.join(str(error).split())}") from None

    def execute(self, sql: str, args: tuple | list = ()):
        """Run one statement (``?`` placeholders, as in SQLite). Outside a transaction, a connection the server dropped
        (a restart, a failover, an idle timeout) is made anew once and the statement run again."""
        try:
            return self.db.execute(sql.replace("?", "%s"), args or None)
        except self._lost:
            if self._in_transaction or not self.db.broken:
                raise
            self.db = self._connect()
            return self.db.execute(sql.replace("?", "%s"), args or None)

    def insert(self, sql: str, args: tuple | list) -> int:
        """Run one INSERT into a table with an ``id`` counter; returns the new row's ID."""
        return self.execute(sql + " RETURNING id", args).fetchone()[0]

    def executemany(self, sql: str, rows: list) -> None:
        """Run one statement for each row."""
        rows = list(rows)
        if rows:
            with self.db.cursor() as cursor:
                cursor.executemany(sql.replace("?", "%s"), rows)

    @contextmanager
    def transaction(self) -> Iterator["PostgresDatabase"]:
        """A transaction that first takes the ledger's writer lock: writers run one at a time, as in SQLite. A connection
        lost on the way ends it with :class:`LedgerUnavailable` (the server rolls back what it had not committed)."""
        self.execute("BEGIN")
        self._in_transaction = True
        try:
            self.db.execute("SELECT pg_advisory_xact_lock(%s)", (WRITER_LOCK_KEY,))
            yield self
            self.db.execute("COMMIT")
        except BaseException as error:
            if not self.db.broken:
                self.db.execute("ROLLBACK")
                raise
            if isinstance(error, self._lost):
                raise LedgerUnavailable(f"the connection to the ledger database {self.where} was lost during a change; the "
                                        "server rolled it back unless it had committed it: check, then try again") from error
            raise
        finally:
            self._in_transaction = False

    def create_schema(self) -> None:
        """Create the tables (in the caller's transaction); refuses a database that already holds a ledger."""
        if self.db.execute("SELECT to_regclass('meta')").fetchone()[0] is not None:
            raise DatawardError(f"{self.where} already holds a dataward ledger: give each ward a database of its own")
        for statement in POSTGRES_SCHEMA.split(";\n"):
            if statement.strip():
                self.db.execute(statement)

    def erase_old_pages(self) -> bool:
        """VACUUM the samples table so the rows that held forgotten images are reclaimed. (PostgreSQL does not zero the
        freed space, and its write-ahead log and backups keep old pages until recycled: docs/scale-out.md.)"""
        try:
            self.db.execute("VACUUM samples")
        except self.errors:  # e.g. this connection is inside another transaction: reclaimed at the next forget
            return False
        return True

    def close(self) -> None:
        """Close the connection."""
        self.db.close()


def ledger_location(ward: Path) -> Path | str:
    """Where the ledger of the ward folder ``ward`` lives: the URL in ``ledger.url``, or the path of ``ledger.sqlite``."""
    url_file = ward / LEDGER_URL_FILE
    if url_file.exists():
        if (ward / LEDGER_FILE).exists():
            raise DatawardError(f"{ward} has both {LEDGER_URL_FILE} and {LEDGER_FILE}: a `dataward ledger move` was interrupted; "
                                f"run it again with the same URL to finish it")
        return url_file.read_text().strip()
    return ward / LEDGER_FILE


def connect(location: Path | str, create: bool = False) -> Database:
    """A connection to the ledger at ``location``: a PostgreSQL URL or an SQLite file path."""
    if isinstance(location, str) and location.startswith(URL_SCHEMES):
        return PostgresDatabase(location)
    return SqliteDatabase(Path(location), create)


def copy_tables(source: Database, target: Database) -> int:
    """Copy every row of every ledger table from ``source`` into ``target`` (in the caller's transaction on ``target``),
    keeping IDs, and move PostgreSQL's ID counters past them. Returns the number of rows copied."""
    copied = 0
    for table, columns in TABLES.items():
        insert = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        cursor = source.execute(f"SELECT {', '.join(columns)} FROM {table}")
        while rows := cursor.fetchmany(COPY_BATCH):
            target.executemany(insert, rows)
            copied += len(rows)
        if table in COUNTED_TABLES and isinstance(target, PostgresDatabase):
            target.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), COALESCE(MAX(id), 0) + 1, false) FROM {table}")
    return copied
