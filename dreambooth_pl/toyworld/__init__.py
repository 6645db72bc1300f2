"""A small world made by the project: a renderer, toy subjects and pretrained toy models (docs/toy_world.md)."""
