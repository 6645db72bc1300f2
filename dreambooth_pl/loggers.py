"""Weights & Biases that never blocks a run: offline when no credentials are found."""

from __future__ import annotations

import logging
import netrc
import os

from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)
_said_offline = False


def wandb_credentials_present() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_logger(mode: str = "auto", **kwargs) -> WandbLogger:
    """mode: auto | online | offline. WANDB_MODE in the environment still wins, as wandb itself decides."""
    global _said_offline
    if mode not in ("auto", "online", "offline"):
        raise ValueError(f"logger.wandb.mode={mode!r}: use auto, online or offline.")
    offline = mode == "offline" or (mode == "auto" and not wandb_credentials_present())
    if offline and mode == "auto" and not _said_offline:
        log.warning(
            "No W&B credentials found: logging offline under %s/wandb; upload later with `wandb sync`.",
            kwargs.get("save_dir", "."),
        )
        _said_offline = True
    return WandbLogger(offline=offline, **kwargs)
