"""No alignment: the pool is merged in the coordinates it came in (the default)."""

from __future__ import annotations

from mergelab.align.base import Alignment
from mergelab.context import RunContext
from mergelab.pool.base import ModelPool


class NoAlign(Alignment):
    """Identity: returns the pool unchanged (no spec needed, so any backbone works)."""

    name = "none"

    def align(self, pool: ModelPool, ctx: RunContext) -> ModelPool:
        self.report = None
        return pool

    def find(self, spec, ref, other, pool, ctx, tasks):  # pragma: no cover — never called
        raise NotImplementedError
