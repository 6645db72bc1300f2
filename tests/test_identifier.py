import logging
import re
import warnings
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from transformers import CLIPTokenizer

from dreambooth_pl.text.identifier import (
    find_rare_token,
    identifier_token_count,
    resolve_identifier,
)
from dreambooth_pl.text.vocab import build_clip_tokenizer, clip_vocab_from_bpe, word_vocab
from tests.conftest import CLIP_BPE, CLIP_BPE_MISSING

REPO = Path(__file__).resolve().parents[1]
BPE_PATH = CLIP_BPE
CLIP_MERGES = 48894
RARE_BAND_START = 512 + CLIP_MERGES - round(0.1 * CLIP_MERGES)  # first id of the default rare band

# Short English words, including the real ones that sit in CLIP's rare band
# (ewe, fez, mew, hew, vex, pox, fib, lob, fad, hap, tux) and vowel-free ones.
ENGLISH = set(
    "a an the of to in on at by is it be as or if my we he me do go no so up us am "
    "cat dog car sun sky fly dry why try spy cry shy gym and for you are not but one all any can "
    "ewe fez mew hew vex pox fib lob fad hap tux yak emu gnu elk owl "
    "hmm shh brr tsk nth pst cwm zzz grr".split()
)


@pytest.fixture(scope="module")
def clip_vocab():
    if not BPE_PATH.exists():
        pytest.skip(CLIP_BPE_MISSING)
    return clip_vocab_from_bpe(BPE_PATH)


@pytest.fixture(scope="module")
def clip_tokenizer(clip_vocab):
    return build_clip_tokenizer(*clip_vocab)


def test_clip_vocab_matches_released_tokenizer(clip_vocab, clip_tokenizer):
    vocab, merges = clip_vocab
    assert len(vocab) == 49408
    assert len(merges) == CLIP_MERGES
    assert vocab["sks</w>"] == 48136
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert clip_tokenizer("a sks dog").input_ids == [49406, 320, 48136, 1929, 49407]
    assert clip_tokenizer.model_max_length == 77


def test_sks_is_one_token(clip_tokenizer):
    assert identifier_token_count(clip_tokenizer, "sks") == 1
    assert identifier_token_count(clip_tokenizer, "xyzzyq") > 1


def test_find_rare_token_is_rare_short_and_not_english(clip_tokenizer):
    vocab = clip_tokenizer.get_vocab()
    tokens = [find_rare_token(clip_tokenizer, seed=seed) for seed in range(10)]
    for token in tokens:
        assert re.fullmatch("[a-z]{1,3}", token)
        assert token not in ENGLISH
        assert identifier_token_count(clip_tokenizer, token) == 1
        assert vocab[token + "</w>"] >= RARE_BAND_START
    assert tokens == [find_rare_token(clip_tokenizer, seed=seed) for seed in range(10)]
    assert len(set(tokens)) > 1


def test_find_rare_token_never_picks_english_in_whole_vocab(clip_tokenizer):
    tokens = {find_rare_token(clip_tokenizer, rare_fraction=1.0, seed=seed) for seed in range(20)}
    assert len(tokens) > 5
    assert not tokens & ENGLISH


def test_find_rare_token_honours_options(clip_tokenizer):
    first = find_rare_token(clip_tokenizer, seed=0)
    assert find_rare_token(clip_tokenizer, seed=0, exclude_words=[first]) != first
    assert len(find_rare_token(clip_tokenizer, max_chars=2, seed=0)) == 2
    with pytest.raises(ValueError, match="rare_fraction"):
        find_rare_token(clip_tokenizer, rare_fraction=0.0)


def test_resolve_identifier_warns_only_for_split_tokens(clip_tokenizer):
    with pytest.warns(UserWarning, match="xyzzyq"):
        assert resolve_identifier(clip_tokenizer, "xyzzyq") == "xyzzyq"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_identifier(clip_tokenizer, "sks") == "sks"


def test_identifier_configs(clip_tokenizer, caplog):
    sks = OmegaConf.load(REPO / "conf" / "identifier" / "sks.yaml")
    auto = OmegaConf.load(REPO / "conf" / "identifier" / "auto.yaml")
    assert resolve_identifier(clip_tokenizer, **sks) == "sks"
    with caplog.at_level(logging.INFO, logger="dreambooth_pl.text.identifier"):
        token = resolve_identifier(clip_tokenizer, **auto)
    assert token not in auto.exclude_words and token not in ENGLISH
    assert token == find_rare_token(clip_tokenizer, **{k: v for k, v in auto.items() if k != "token"})
    assert repr(token) in caplog.text


def test_word_vocab_makes_each_word_one_token(tmp_path):
    words = ["a", "photo", "of", "sks", "dog", "dogs", "photograph"]
    vocab, merges = word_vocab(words)
    assert (vocab, merges) == word_vocab(words)
    assert len(vocab) == 512 + len(merges) + 2
    tokenizer = build_clip_tokenizer(vocab, merges)
    ids = tokenizer(" ".join(words)).input_ids
    assert ids == [vocab["<|startoftext|>"], *(vocab[w + "</w>"] for w in words), vocab["<|endoftext|>"]]
    tokenizer.save_pretrained(tmp_path)
    assert CLIPTokenizer.from_pretrained(tmp_path)(" ".join(words)).input_ids == ids
    assert find_rare_token(tokenizer, rare_fraction=1.0) == "sks"


def test_word_vocab_rejects_non_words():
    with pytest.raises(ValueError, match="lowercase"):
        word_vocab(["Dog"])


def test_no_candidate_error_names_options():
    tokenizer = build_clip_tokenizer(*word_vocab(["a", "photo", "of", "dog"]))
    with pytest.raises(ValueError, match="rare_fraction.*max_chars.*exclude_words.*identifier.token"):
        find_rare_token(tokenizer, rare_fraction=1.0)
