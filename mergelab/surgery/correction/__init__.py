"""Per-channel affine correction of a merged model's activations from measured statistics —
the shared machinery of the training-free surgery kinds ``stats`` (Non-local merging, arXiv
2410.12766) and ``repair`` (REPAIR, arXiv 2211.08403):

- :mod:`.sites`     where: the corrected modules of every block, in forward order;
- :mod:`.model`     the correction buffers, the hooks that apply them, per-task routing;
- :mod:`.calibrate` measuring the statistics, site by site with earlier corrections applied;
- :mod:`.io`        the statistics file.
"""
