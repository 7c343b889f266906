"""The HTTP service: a ward behind an API, one key per customer, each key reaching only its compartments.

``create_app(ward_path)`` returns a FastAPI app (``dataward serve`` runs it under uvicorn). See docs/service.md.
Modules: :mod:`~.http` (the app, auth, routes, errors, body limit), :mod:`~.core` (the wards and threads one app holds,
forget acceptance, what a key may see), :mod:`~.pool` (the generation pool, admission, the forget check and re-runs),
:mod:`~.workers` (what runs in a generation worker, and the clock that stops it), :mod:`~.render` (response bodies), :mod:`~.retraining` (background training after forgets), :mod:`~.api` (limits,
request bodies, errors).

Design, in short:

- **Auth.** Every endpoint but ``/healthz`` (and the OpenAPI schema) needs a key (``Authorization: Bearer KEY`` or
  ``X-API-Key: KEY``). The SHA-256 of the presented key is looked up in the ledger on *every* request and compared with
  :func:`hmac.compare_digest`, so revoking a key takes effect on the very next request.
- **Grants.** Generation composes over the key's compartments only (``Ward.sample(..., allowed=key.allow)``); nothing in
  a request can widen that (unknown body fields are refused). The joint router saw every compartment's data, so it is
  used only for keys that reach every compartment; other keys get compartment-pure density weights.
- **Workers.** Sampling (CPU-bound torch) runs in a bounded pool of worker processes (or threads); each worker has its
  own :class:`Ward` (its own SQLite connection and model cache) and reads the ledger on every generation. At most ``pool_size + queue_size`` generations are admitted; the rest get 429 with
  Retry-After. Forget acceptance runs on its own thread with its own Ward, retraining on another (one at a time).
  The event loop has a Ward of its own for key checks and the final forget check (short indexed reads; WAL readers
  never wait for writers).
- **Forgetting during generation.** Each generation ward records every model it uses (denoisers, router, guards:
  a ``WardHooks.on_load`` hook). A response is released by the event loop only after a check, *on the event loop, with
  no await between the check and the return*, that none of those models is quarantined/deleted or saw a forgotten ID.
  The forget's 202 is also returned on the event loop, after its ledger transaction committed. So a generation response
  returned after the 202 ran its check after the commit and saw it; if a model it used is tainted, it is re-run (on the
  models now served) and, after ``max_attempts``, answered 503 with Retry-After. The retraining ward's
  ``WardHooks.before_register`` hook refuses (and deletes) a trained model when one of its IDs was forgotten while it
  trained; a forget that commits after that check makes the ledger register the model as quarantined, in the same
  transaction, so no tainted model is ever marked ready.
"""

from dataward.app.service.http import create_app
from dataward.app.service.retraining import StaleTraining, open_retraining_ward
from dataward.app.service.api import ServiceLimits

__all__ = ["ServiceLimits", "StaleTraining", "create_app", "open_retraining_ward"]
