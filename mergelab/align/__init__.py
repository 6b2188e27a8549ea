"""Permutation alignment of experts (and bases) before merging: Git Re-Basin weight and
activation matching (arXiv 2209.04836) over the permutation symmetries of a backbone.

(The functions ``weight_matching`` / ``activation_matching`` live in the submodules of the
same names; they are not re-exported here, so that ``mergelab.align.weight_matching`` stays
the module Hydra's ``_target_`` paths resolve through.)
"""

from mergelab.align.activation_matching import ActivationMatching
from mergelab.align.archs import spec_for, spec_for_factory
from mergelab.align.base import Alignment
from mergelab.align.none import NoAlign
from mergelab.align.spec import Perms, PermutationSpec, PermutedStateDict
from mergelab.align.weight_matching import WeightMatching

__all__ = [
    "ActivationMatching",
    "Alignment",
    "NoAlign",
    "PermutationSpec",
    "PermutedStateDict",
    "Perms",
    "WeightMatching",
    "spec_for",
    "spec_for_factory",
]
