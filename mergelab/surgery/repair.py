"""REPAIR surgery: the variance-collapse correction of Jordan et al., "REPAIR: REnormalizing
Permuted Activations for Interpolation Repair" (ICLR 2023, arXiv 2211.08403), for N experts.
Training-free; the single-shared-statistics baseline that Non-local merging (arXiv
2410.12766) compares its per-task correction against.

One set of statistics for every task: at each site, per channel,

    x̂ = (x − μ_merged) / σ_merged · σ̄ + μ̄,   μ̄ = mean_e μ_e,  σ̄ = mean_e σ_e,

all measured on the pooled unlabeled data of every task (``num_samples`` per task), μ_e, σ_e
being expert e's moments there and μ_merged, σ_merged the merged model's with the corrections
of earlier sites already applied (REPAIR's exact variant, which re-measures the repaired
network). For two models at interpolation weight α, REPAIR's target is
(1−α)·(μ_1, σ_1) + α·(μ_2, σ_2) with both endpoints measured on the same data; the uniform
merge of N experts is α_e = 1/N on the pooled data. Averaging each expert's statistics on its
own task only would mix moments of different input distributions and is not REPAIR.
"""

from __future__ import annotations

from collections.abc import Sequence

from mergelab.surgery.correction.sites import PAPER_SITES
from mergelab.surgery.stats import StatsSurgery

SHARED = "shared"


class RepairSurgery(StatsSurgery):
    """REPAIR (arXiv 2211.08403) for N experts: the :class:`StatsSurgery` correction with ONE
    set of statistics shared by all tasks, measured on their pooled unlabeled data, target =
    the mean over experts of each expert's (μ, σ) on that data (equation above).

    Args: as :class:`StatsSurgery`; ``num_samples`` is per task (the pool holds
    ``num_samples`` images of every task).
    """

    name = "repair"
    paper = "arXiv 2211.08403"

    def __init__(
        self,
        sites: Sequence[str] = PAPER_SITES,
        num_samples: int | None = 1024,
        batch_size: int = 128,
        eps: float = 1e-5,
        seed: int = 0,
        save_stats: bool = True,
        stats_file: str = "repair_stats.safetensors",
        replay: bool = True,
        load_from: str | None = None,
    ):
        super().__init__(
            sites, num_samples, batch_size, eps, seed, save_stats, stats_file, replay, load_from
        )

    def groups(self, tasks: Sequence[str]) -> dict[str, list[str]]:
        """One group, every task."""
        return {SHARED: list(tasks)}
