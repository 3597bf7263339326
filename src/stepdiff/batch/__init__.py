"""``stepdiff batch``: prompt files to images, resumable, in this process or on a Ray cluster.

    from stepdiff.batch import BatchConfig, run_batch
    result = run_batch(BatchConfig(input=Path("prompts.jsonl"), out=Path("out")))

Modules, in the order data flows: :mod:`.rows` (read, check, key), :mod:`.runner` (plan, run, record),
:mod:`.worker` (one pipeline making chunks), :mod:`.ray_runner` (the same worker on Ray Data actors),
:mod:`.manifest` (the append-only record).
"""

from __future__ import annotations

from .manifest import MANIFEST_NAME, Manifest
from .rows import FIELDS, BatchDefaults, BatchRow, RowError, read_rows
from .runner import BatchConfig, BatchResult, plan_batch, run_batch

__all__ = [
    "FIELDS", "MANIFEST_NAME", "BatchConfig", "BatchDefaults", "BatchResult", "BatchRow", "Manifest", "RowError",
    "plan_batch", "read_rows", "run_batch",
]
