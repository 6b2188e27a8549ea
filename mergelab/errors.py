"""One exception type per kind of bad input, each carrying a message that names the thing
that was wrong and what was expected. The CLI turns them into a one-line error and exit 2."""


class MergelabError(Exception):
    """Base class: a user-facing error (bad config, bad file, bad checkpoint)."""


class ConfigError(MergelabError):
    """Unknown method / task / model name, or an invalid hyperparameter."""


class CheckpointError(MergelabError):
    """A checkpoint that is missing, unsafe, non-finite, or does not match the backbone."""
