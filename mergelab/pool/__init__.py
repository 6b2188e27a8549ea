"""Backbones, checkpoints, heads and the model pool."""

from mergelab.pool.base import ModelPool, MultiTaskModel
from mergelab.pool.heads import ClassificationHead
from mergelab.pool.state import LazyStateDict, load_into, save_state_dict

__all__ = [
    "ClassificationHead",
    "LazyStateDict",
    "ModelPool",
    "MultiTaskModel",
    "load_into",
    "save_state_dict",
]
