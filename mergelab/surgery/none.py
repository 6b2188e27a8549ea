"""No surgery: the merged model is evaluated as it is (the baseline every table needs)."""

from __future__ import annotations

from mergelab.context import RunContext
from mergelab.pool.base import ModelPool, MultiTaskModel
from mergelab.surgery.base import Surgery


class NoSurgery(Surgery):
    """Identity surgery: returns the merged multi-task model unchanged."""

    name = "none"
    identity = True

    def apply(self, model: MultiTaskModel, pool: ModelPool, ctx: RunContext) -> MultiTaskModel:
        return model
