"""Tokens and prompts: the identifier, prompt templates and the CLIP vocabulary."""
