"""Moving a ward's ledger from its SQLite file into a PostgreSQL database, so that service replicas on several machines
can share it (``dataward ledger WARD move URL``; docs/scale-out.md).

The order makes a crash at any point safe: (1) copy every row into the new database in one transaction (a crash
leaves it empty), (2) write ``WARD/ledger.url`` atomically (from now on every process that opens the ward uses the
database), (3) delete ``ledger.sqlite`` and its write-ahead files. A ward found between (2) and (3) refuses to open
until the move is run again with the same URL, which only does step (3).
"""

from __future__ import annotations

import os
from pathlib import Path

from dataward.errors import DatawardError
from dataward.store.database import LEDGER_FILE, LEDGER_URL_FILE, OPEN_MARK_FILE, check_ledger_url
from dataward.store.ledger import Ledger
from dataward.store.lock import WriterLock

SQLITE_FILES = (LEDGER_FILE, LEDGER_FILE + "-wal", LEDGER_FILE + "-shm", OPEN_MARK_FILE)


def move_ledger(ward: Path, url: str) -> dict:
    """Move the ledger of the ward folder ``ward`` into the empty PostgreSQL database ``url`` (no password in it).

    Every process that uses the ward must be stopped first (servers, training): the move refuses while any process has
    the SQLite ledger open (:meth:`~dataward.store.database.SqliteDatabase.hold_exclusively`). Returns
    ``{"ledger": url, "rows": copied, "finished": bool}``.
    """
    url = check_ledger_url(url.strip())
    url_file = ward / LEDGER_URL_FILE
    if url_file.exists():
        current = url_file.read_text().strip()
        if current != url:
            raise DatawardError(f"the ledger of {ward} already lives in {current}, not {url}")
        if not (ward / LEDGER_FILE).exists():
            raise DatawardError(f"the ledger of {ward} already lives in {url}: nothing to move")
        _remove_sqlite(ward)  # an interrupted move: the copy is complete and in use; finish it
        return {"ledger": url, "rows": 0, "finished": True}
    if not (ward / LEDGER_FILE).exists():
        raise DatawardError(f"no ledger at {ward / LEDGER_FILE}: is this a ward? (create one with `dataward init`)")
    with WriterLock(ward):
        rows = switch_to_database(ward, url)
    return {"ledger": url, "rows": rows, "finished": False}


def switch_to_database(ward: Path, url: str) -> int:
    """Steps (1)-(3) above on a ward folder whose writer lock the caller holds (or that no one else can see yet, as
    ``Ward.create --ledger`` builds it). Returns the number of rows copied."""
    source = Ledger(ward / LEDGER_FILE)
    try:
        source.db.hold_exclusively()  # no other process has it open, and none opens it until it is gone
        rows = source.copy_into(url)
        source.db.close(keep_open_mark=True)  # the file is closed before it is deleted, and no one opens it meanwhile
        _switch(ward, url)
    finally:
        source.close()
    return rows


def _switch(ward: Path, url: str) -> None:
    """Steps (2) and (3): name the database in ``ledger.url``, then delete the SQLite files."""
    url_file = ward / LEDGER_URL_FILE
    tmp = url_file.with_suffix(".tmp")
    tmp.write_text(url + "\n")
    with open(tmp) as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, url_file)
    _remove_sqlite(ward)


def _remove_sqlite(ward: Path) -> None:
    """Delete the SQLite ledger and its write-ahead files (their images now live in the database)."""
    for name in SQLITE_FILES:
        (ward / name).unlink(missing_ok=True)
