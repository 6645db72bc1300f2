"""Prompt templates from config, filled with the identifier and class noun."""

from __future__ import annotations

import string

from dreambooth_pl.util.config import ConfigError


def check_template(template: str, option: str = "prompt template") -> None:
    """A template fills only `{identifier}` and `{class_noun}`; errors name the option that holds it."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:  # "Single '}' encountered in format string"
        raise ConfigError(f"{option}={template!r}: {err}; write a literal brace as {{{{ or }}}}.") from None
    unknown = fields - {"identifier", "class_noun"}
    if unknown:
        raise ConfigError(
            f"{option}={template!r} uses unknown field(s) {sorted(unknown)}; use {{identifier}} and {{class_noun}}."
        )


def fill_prompt(template: str, identifier: str = "", class_noun: str = "") -> str:
    """Fill `{identifier}` / `{class_noun}` and collapse spaces, so an empty noun gives "a sks"."""
    check_template(template)
    return " ".join(template.format(identifier=identifier, class_noun=class_noun).split())


def require_identifier(template: str, option: str) -> None:
    if "{identifier}" not in template:
        raise ConfigError(f"{option}={template!r} must contain {{identifier}}: the subject is bound to it.")
