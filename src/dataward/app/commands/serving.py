"""Commands that hand a ward to others: API keys (create, list, revoke), where the ledger lives (move), serve, and export
(one model per customer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from dataward.app.commands.common import open_ward, parse_ids, ward_group
from dataward.app.terminal import console, out
from dataward.errors import DatawardError
from dataward.store.ledger import ALL_COMPARTMENTS

keys_app = ward_group("API keys for `dataward serve`: each key reaches only its compartments.")


@keys_app.command("create")
def keys_create(
    ctx: typer.Context,
    allow: Optional[str] = typer.Option(None, "--allow", help="Required (optional with --admin): compartments the key may use, e.g. "
                                        "0,2, or all (every compartment, those added later included)."),
    admin: bool = typer.Option(False, "--admin", help="The key may also forget samples (POST /v1/forget)."),
    name: Optional[str] = typer.Option(None, "--name", help="A unique name for the key (default: a random one)."),
) -> None:
    """Create a key and print it once (only its SHA-256 is stored)."""
    import secrets

    w = open_ward(ctx.obj["ward"], resume=False)
    if allow is None and not admin:
        raise DatawardError("--allow is required: the compartments the key may use, e.g. --allow 0,2 (or --allow all)")
    every = (allow or "").strip() == ALL_COMPARTMENTS
    ids = ALL_COMPARTMENTS if every else (parse_ids(allow) or [])
    key_id, raw = w.ledger.create_key(name or f"key-{secrets.token_hex(3)}", ids, admin)
    grant = "every compartment (those added later too)" if every else f"compartments {sorted(set(ids))}"
    console.print(f"created key #{key_id} for {grant}{' (admin)' if admin else ''}. Store it now: it is shown only this once.")
    print(raw)


@keys_app.command("list")
def keys_list(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the keys (names, grants, state; never the keys)."""
    import datetime

    keys = open_ward(ctx.obj["ward"], resume=False).ledger.list_keys()
    if as_json:
        print(json.dumps(keys))
        return
    table = Table()
    for col in ("id", "name", "allow", "admin", "created", "state"):
        table.add_column(col)
    for k in keys:
        created = datetime.datetime.fromtimestamp(k["created_at"]).isoformat(timespec="seconds")
        grant = k["allow"] if k["allow"] == ALL_COMPARTMENTS else ",".join(map(str, k["allow"])) or "-"
        table.add_row(str(k["id"]), escape(k["name"]), grant, "yes" if k["admin"] else "no", created,
                      "revoked" if k["revoked_at"] else "active")
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(ctx: typer.Context, key: str = typer.Argument(..., metavar="KEY", help="The key's ID or name.")) -> None:
    """Revoke a key: refused from the very next request on."""
    record = open_ward(ctx.obj["ward"], resume=False).ledger.revoke_key(key)
    out.print(f"revoked key #{record['id']} ({escape(record['name'])})")


ledger_app = ward_group("Where the ward's ledger lives: its SQLite file, or a PostgreSQL database shared by replicas.")


@ledger_app.command("move")
def ledger_move(
    ctx: typer.Context,
    url: str = typer.Argument(..., metavar="URL", help="An empty PostgreSQL database, e.g. postgresql://dataward@db:5432/ward "
                              "(no password: libpq reads PGPASSWORD or ~/.pgpass)."),
) -> None:
    """Move the ledger into a PostgreSQL database, so that servers on several machines can share the ward (stop its
    servers first; see docs/scale-out.md)."""
    from dataward.config import WardConfig
    from dataward.store.move import move_ledger

    WardConfig.load(ctx.obj["ward"])  # "not a ward" before anything else
    moved = move_ledger(ctx.obj["ward"], url)
    done = "finished the interrupted move" if moved["finished"] else f"copied {moved['rows']} rows"
    out.print(escape(f"{done}; the ledger of {ctx.obj['ward']} now lives in {moved['ledger']} and ledger.sqlite is gone. "
                     "Every machine that opens the ward needs the ward folder (shared storage) and psycopg."))


def serve(
    ward: Path = typer.Argument(..., metavar="WARD", help="The ward folder."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (put TLS in front of anything but loopback)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    workers: int = typer.Option(2, "--workers", help="Generation workers: generations run at once."),
    worker_kind: str = typer.Option("processes", "--worker-kind", help="processes: each worker a process with its own models "
                                    "(throughput grows with --workers); threads: in the server's process, sharing the GIL (less memory)."),
    queue: int = typer.Option(8, "--queue", help="Generations that may wait for a worker; beyond that: 429 with Retry-After."),
    max_n: int = typer.Option(64, "--max-n", help="Most images per request."),
    max_steps: int = typer.Option(250, "--max-steps", help="Most sampling steps per request."),
    timeout: float = typer.Option(120.0, "--timeout", help="Seconds a generation may run (queue wait not counted); then it stops, 503."),
    torch_threads: int = typer.Option(1, "--torch-threads", help="torch intra-op threads per worker (keep workers x threads <= free cores)."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level."),
) -> None:
    """Serve the ward over HTTP (FastAPI + uvicorn; OpenAPI docs at /docs). See docs/service.md."""
    import uvicorn

    from dataward.app.service import ServiceLimits, create_app

    service_app = create_app(ward, pool_size=workers, queue_size=queue, limits=ServiceLimits(max_n=max_n, max_steps=max_steps, generate_timeout_s=timeout),
                             torch_threads=torch_threads, worker_kind=worker_kind)
    console.print(f"serving {escape(str(ward))} on http://{host}:{port} ({workers} worker {worker_kind if workers != 1 else {'processes': 'process', 'threads': 'thread'}.get(worker_kind, worker_kind)}, queue {queue}); API docs at /docs")
    uvicorn.run(service_app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=int(ServiceLimits().shutdown_timeout_s))




def export(
    ward: Path = typer.Argument(..., metavar="WARD", help="The ward folder."),
    allow: str = typer.Option(..., "--allow", help="Compartments whose soup the export holds, e.g. 0,2 (or all)."),
    out_dir: Path = typer.Option(..., "--out", metavar="DIR", help="A new (or empty) folder for the diffusers pipeline."),
    label: Optional[int] = typer.Option(None, "--label", help="The class the exported model draws (class-conditional wards)."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Export the soup of some compartments as a stock diffusers DDPMPipeline folder, with a manifest."""
    from dataward.sampling.export import export_ward

    w = open_ward(ward, resume=False)
    manifest = export_ward(w.read(), out_dir, None if allow.strip() == "all" else parse_ids(allow), label)
    if as_json:
        print(json.dumps(manifest))
        return
    out.print(escape(f"exported compartments {[c['id'] for c in manifest['compartments']]} (soup of their weights"
                     f"{f', class {label}' if label is not None else ''}) to {out_dir.resolve()}; load it with "
                     f"DDPMPipeline.from_pretrained({str(out_dir)!r}). A later forget cannot reach this copy: "
                     "`dataward status` says when it is stale."))
