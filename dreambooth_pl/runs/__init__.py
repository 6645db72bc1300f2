"""The run folder: atomic files, exports, checkpoints, resume, loggers and sweep plumbing."""
