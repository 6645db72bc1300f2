"""Prompt templates from config, filled with the identifier and class noun."""

from __future__ import annotations

import string


def fill_prompt(template: str, identifier: str = "", class_noun: str = "") -> str:
    """Fill `{identifier}` / `{class_noun}` and collapse spaces, so an empty noun gives "a sks"."""
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    unknown = fields - {"identifier", "class_noun"}
    if unknown:
        raise ValueError(
            f"Prompt template {template!r} uses unknown field(s) {sorted(unknown)}; "
            "use {identifier} and {class_noun}."
        )
    return " ".join(template.format(identifier=identifier, class_noun=class_noun).split())


def require_identifier(template: str, option: str) -> None:
    if "{identifier}" not in template:
        raise ValueError(f"{option}={template!r} must contain {{identifier}}: the subject is bound to it.")
