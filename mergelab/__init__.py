"""mergelab: multi-task model merging with Representation Surgery and SurgeryV2."""

__version__ = "0.1.0"
