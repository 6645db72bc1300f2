"""Keep the console for what the user can act on.

Libraries print messages about optional backends, sales tips and internal deprecations on every command;
each is dropped here by its exact text, so any other message, warning or error still shows.
"""

from __future__ import annotations

import logging
import warnings

# logger name -> substrings of the messages dropped from it
QUIET_LOGS = {
    # diffusers imports CLIPImageProcessor; the PIL fallback it announces is what this project uses on purpose
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back to",),
    "lightning.pytorch.utilities.rank_zero": ("try installing [litlogger]",),
    # matplotlib (imported by a library) announces building its font cache on a fresh install
    "matplotlib.font_manager": ("generated new fontManager",),
    # loading a UNet-only LoRA export: the text encoder has no adapter keys, as intended
    "diffusers.loaders.peft": ("No LoRA keys associated to CLIPTextModel",),
    "diffusers.loaders.lora_pipeline": ("No LoRA keys associated to CLIPTextModel",),
    "diffusers.loaders.lora_base": ("No LoRA keys associated to CLIPTextModel",),
}
# warning message regexes (matched from the start) that come from inside the libraries
QUIET_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    # Lightning 2.6's FitLoop.on_run_start warns about every named_modules() entry in eval mode and offers no
    # switch. The frozen VAE and text encoders are in eval on purpose (T5's dropout would noise the
    # conditioning), and they stay in the module tree, where Lightning moves them to the device, setup() casts
    # them under half precision and DDP/FSDP wrap them: kept outside it, every strategy would need our own
    # device and dtype handling, which the CPU tests cannot check. So the notice is filtered, not fixed.
    r"Found \d+ module\(s\) in eval mode",
    # the datamodule's checkpointed state (training/data.py) makes a mid-epoch resume exact; Lightning's check
    # looks only for a stateful dataloader
    r"You're resuming from a checkpoint that ended before the epoch ended",
    # a run folder is resumed in place by design (runs/resume.py; one run at a time, under its lock)
    r"Checkpoint directory .* exists and is not empty",
)


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def quiet_libraries() -> None:
    """Install the filters; called when the package is imported, before the libraries print anything."""
    for name, fragments in QUIET_LOGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(fragments))
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def quiet_loading_bars() -> None:
    """No "Loading weights" / "Loading pipeline components" bar for each model a run loads from disk: they
    are the libraries' own bars, while downloads (huggingface_hub's bars) still show their progress."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_tqdm_hook(lambda bar, args, kwargs: bar(*args, **{**kwargs, "disable": True}))


def one_console_handler() -> None:
    """Lightning gives its loggers a console handler of their own when imported before logging is set up;
    under Hydra's handlers that prints every Lightning message twice. Let them go through the root's only."""
    if not logging.getLogger().hasHandlers():
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:  # not Hydra's file log
            logger.removeHandler(handler)
        logger.propagate = True
