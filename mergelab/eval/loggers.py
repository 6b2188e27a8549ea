"""Logger factories. W&B runs offline unless the user is logged in, and never fails a run."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

log = logging.getLogger(__name__)


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc(os.path.expanduser("~/.netrc")).authenticators("api.wandb.ai")
        return auth is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_logger(save_dir: str, project: str = "mergelab", mode: str | None = None, **kwargs):
    """A Lightning ``WandbLogger``; ``mode`` defaults to "online" only when credentials exist.

    Any failure to start W&B (package missing, no network) degrades to a warning and no W&B
    logger, so a run is never lost for lack of network.
    """
    mode = mode or ("online" if wandb_logged_in() else "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        from lightning.pytorch.loggers import WandbLogger

        Path(save_dir).mkdir(parents=True, exist_ok=True)
        lg = WandbLogger(project=project, save_dir=save_dir, mode=mode, **kwargs)
        _ = lg.experiment  # start now, so failures surface here and not mid-run
        return lg
    except Exception as e:  # noqa: BLE001 — a logger must never fail the run
        log.warning(
            "W&B logger disabled (%s: %s); results are still written to the run dir",
            type(e).__name__,
            e,
        )
        return None
