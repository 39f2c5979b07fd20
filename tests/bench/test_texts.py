"""bench/_texts.py: the out-of-domain texts are there, English, large enough, and not pydoc."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest
from rewriter.models.text import pydoc_text

_PATH = Path(__file__).resolve().parents[2] / "bench" / "_texts.py"
_spec = importlib.util.spec_from_file_location("bench_texts", _PATH)
texts = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("bench_texts", texts)  # dataclasses look their module up there
_spec.loader.exec_module(texts)

# the dozen most frequent English words: real English prose has them at >= ~15% of its words
_COMMON = {"the", "of", "and", "to", "a", "in", "is", "that", "for", "it", "as", "be", "or",
           "this", "by", "with", "on", "not", "are", "you"}
# ~4k tokens per domain at ~4 characters per token, with room to spare
MIN_CHARS = 100_000


def _need(name: str) -> None:
    root = texts.DOMAINS[name].root
    if not root.is_dir():
        pytest.skip(f"{root} does not exist here (not a Debian system)")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def test_domains_declared():
    assert set(texts.DEV_DOMAINS) | {texts.HELD_BACK} == set(texts.DOMAINS)
    assert texts.HELD_BACK not in texts.DEV_DOMAINS
    assert len(texts.DOMAINS) >= 3 and "pydoc" not in texts.DOMAINS
    with pytest.raises(ValueError, match="unknown domain"):
        texts.documents("novels")


@pytest.mark.parametrize("name", sorted(texts.DOMAINS))
def test_domain_text_is_real_english_and_large_enough(name):
    _need(name)
    docs = texts.documents(name)
    assert len(docs) >= 5, [s for s, _ in docs]
    assert len({t for _, t in docs}) == len(docs)  # identical files counted once
    text = texts.domain_text(name)
    assert len(text) >= MIN_CHARS
    words = _words(text)
    common = sum(w in _COMMON for w in words) / len(words)
    assert common >= 0.15, f"{name}: only {common:.1%} common English words"
    ascii_letters = sum(c.isascii() and c.isalpha() for c in text) / len(text)
    assert ascii_letters >= 0.6, f"{name}: {ascii_letters:.1%} ASCII letters"


@pytest.mark.parametrize("name", sorted(texts.DOMAINS))
def test_domain_text_is_not_pydoc_nor_another_domain(name):
    _need(name)
    text = texts.domain_text(name)
    others = {"pydoc": pydoc_text()}
    others.update({o: texts.domain_text(o) for o in texts.DOMAINS if o != name})
    # 200-character passages at 50 evenly spaced places, none found verbatim elsewhere
    step = (len(text) - 200) // 50
    passages = [text[i:i + 200] for i in range(0, 50 * step, step)]
    for other, body in others.items():
        shared = [p for p in passages if p in body]
        assert len(shared) <= 1, f"{name} repeats {other}: {shared[:2]}"


def test_eval_windows_evenly_spaced_within_documents():
    class ByteTokenizer:  # one token per UTF-8 byte: no model needed
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(text.encode("utf-8"))}

    name = texts.DEV_DOMAINS[0]
    _need(name)
    w = texts.eval_windows(ByteTokenizer(), name, 8, seq_len=64)
    assert w.shape == (8, 64)
    assert len({tuple(r.tolist()) for r in w}) == 8
    joined = texts.domain_text(name).encode("utf-8")
    for row in w:  # every window is a contiguous piece of one document
        assert bytes(row.tolist()) in joined
    with pytest.raises(ValueError, match="windows"):
        texts.eval_windows(ByteTokenizer(), name, 10**7, seq_len=64)
