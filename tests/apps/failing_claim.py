"""The recording app (``tests.apps.recording``) in a relay whose claim fails once with ``MemoryError``.

``--app tests.apps.failing_claim:registry``. Importing this module wraps
:meth:`relay._claim.ClaimQueries.claim_batch`: the claim that returns rows for the ``N``-th time
(``OUTBOX_TEST_FAIL_CLAIM_AFTER``, default 2) runs and commits as usual, then raises ``MemoryError``, as a
claim does that fails reading a large result after the server committed it. Its rows are in flight under
the relay's lease, and the process never sees them: the rows must come back after the lease, and the relay
must not live on without its claim thread.
"""

from __future__ import annotations

import os
from typing import Any

from relay._claim import ClaimedRow, ClaimQueries
from tests.apps.recording import registry

FAIL_AFTER_ENV = "OUTBOX_TEST_FAIL_CLAIM_AFTER"

__all__ = ["registry"]

_claim_batch = ClaimQueries.claim_batch
_claims_with_rows = 0


def _failing_claim_batch(self: ClaimQueries, *args: Any, **kwargs: Any) -> list[ClaimedRow]:
    global _claims_with_rows
    rows = _claim_batch(self, *args, **kwargs)
    if rows:
        _claims_with_rows += 1
        if _claims_with_rows == int(os.environ.get(FAIL_AFTER_ENV, "2")):
            raise MemoryError(f"test: lost a claim of {len(rows)} row(s) after the server committed it")
    return rows


ClaimQueries.claim_batch = _failing_claim_batch  # type: ignore[method-assign]
