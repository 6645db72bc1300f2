"""The unique identifier of DreamBooth (Ruiz et al., 2023, section 3.2).

The subject is bound to a rare token so that fine-tuning does not have to
overwrite a strong prior; a common word, or a string that splits into several
tokens, drags in the meaning of its parts.
"""

from __future__ import annotations

import logging
import random
import re
import warnings
from collections.abc import Iterable

from transformers import PreTrainedTokenizerBase

from dreambooth_pl.text.vocab import EOW

logger = logging.getLogger(__name__)

VOWELS = re.compile("[aeiouy]")
# The few English words spelled without a, e, i, o, u or y.
VOWELLESS_WORDS = frozenset({"brr", "cwm", "grr", "hm", "hmm", "mm", "mmm", "nth", "pst", "sh", "shh", "tsk", "zzz"})


def identifier_token_count(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """Token count without BOS/EOS, the quantity that decides whether an identifier is atomic."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def find_rare_token(
    tokenizer: PreTrainedTokenizerBase,
    max_chars: int = 3,
    rare_fraction: float = 0.1,
    seed: int = 0,
    exclude_words: Iterable[str] = (),
) -> str:
    """Pick a short, rare, meaningless whole-word token as the paper prescribes.

    Rarity comes from the BPE rank: the last ``rare_fraction`` of the merged
    (multi-character) tokens by id were learned last, so they were seen least.
    Meaninglessness is enforced by spelling: every English word of this length
    contains a vowel letter (a, e, i, o, u, y) except a handful of interjections
    (``VOWELLESS_WORDS``), so only vowel-free candidates are kept; loaded
    abbreviations can be dropped with ``exclude_words``.
    """
    if not 0.0 < rare_fraction <= 1.0:
        raise ValueError(f"rare_fraction must be in (0, 1], got {rare_fraction}")
    special = set(tokenizer.all_special_tokens)
    merged = sorted(
        (i, token)
        for token, i in tokenizer.get_vocab().items()
        if token not in special and len(token.removesuffix(EOW)) > 1
    )
    band = merged[len(merged) - max(1, round(rare_fraction * len(merged))) :]
    excluded = VOWELLESS_WORDS | {word.lower() for word in exclude_words}
    word = re.compile(f"[a-z]{{1,{max_chars}}}")
    candidates = [
        stem
        for _, token in band
        if token.endswith(EOW)
        and word.fullmatch(stem := token.removesuffix(EOW))
        and not VOWELS.search(stem)
        and stem not in excluded
        and identifier_token_count(tokenizer, stem) == 1
    ]
    if not candidates:
        raise ValueError(
            f"no rare identifier among the last {rare_fraction:.0%} of {len(merged)} merged tokens with at most "
            f"{max_chars} vowel-free letters; raise identifier.rare_fraction or identifier.max_chars, shorten "
            "identifier.exclude_words, or set identifier.token explicitly"
        )
    return random.Random(seed).choice(candidates)


def resolve_identifier(tokenizer: PreTrainedTokenizerBase, token: str | None = None, **search) -> str:
    """Use the configured identifier, or search one when it is null.

    ``search`` is ignored when ``token`` is given so that overriding the token
    on top of the ``auto`` config group works.
    """
    if token is not None:
        pieces = tokenizer.tokenize(token)
        if len(pieces) > 1:
            warnings.warn(
                f"identifier {token!r} splits into {len(pieces)} tokens {pieces}; DreamBooth wants one rare token",
                UserWarning,
                stacklevel=2,
            )
        return token
    token = find_rare_token(tokenizer, **search)
    logger.info("rare-token identifier %r chosen with %s", token, search)
    return token
