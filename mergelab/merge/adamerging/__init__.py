"""AdaMerging and AdaMerging++ (Yang et al., "AdaMerging: Adaptive Model Merging for
Multi-Task Learning", ICLR 2024, arXiv:2310.02575).

The merged weights are a learnable combination of task vectors τt = θt − θ0:

    task-wise   θ(λ)   = θ0   + Σt clamp(λt)   τt       (one λ per task)
    layer-wise  θ_l(λ) = θ0_l + Σt clamp(λt,l) τt,l     (one λ per task per float tensor l)

with λ initialised to 0.3 and clamped to [0, 1] where it is used. λ is learned by minimising,
summed over tasks, the mean Shannon entropy H(p) = −Σc pc log pc of the softmax of the task's
head logits on that task's unlabeled test batches. AdaMerging++ is the same with the
TIES-processed task vectors (trim, elect sign, disjoint) in place of τt.

One concern per file:

- :mod:`.vectors`   the task vectors as one ``(T, P)`` float32 matrix;
- :mod:`.objective` the entropy surrogate;
- :mod:`.module`    the LightningModule that builds θ(λ) and trains λ;
- :mod:`.data`      the per-task unlabeled batches;
- :mod:`.outputs`   the coefficients json and heatmap;
- :mod:`.method`    the merge method the ``merge=adamerging`` config instantiates.
"""

from mergelab.merge.adamerging.method import VECTORS, AdaMerging
from mergelab.merge.adamerging.module import GRANULARITIES, AdaMergingModule
from mergelab.merge.adamerging.objective import mean_entropy
from mergelab.merge.adamerging.outputs import COEFFICIENTS_JSON, COEFFICIENTS_PNG
from mergelab.merge.adamerging.vectors import (
    VECTOR_DTYPE,
    TaskVectors,
    plain_task_vectors,
    ties_vectors,
)

__all__ = [
    "COEFFICIENTS_JSON",
    "COEFFICIENTS_PNG",
    "GRANULARITIES",
    "VECTORS",
    "VECTOR_DTYPE",
    "AdaMerging",
    "AdaMergingModule",
    "TaskVectors",
    "mean_entropy",
    "plain_task_vectors",
    "ties_vectors",
]
