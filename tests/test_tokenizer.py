"""Tokenizers built from GGUF metadata give the same ids as Hugging Face transformers.

The reference is ``transformers.AutoTokenizer.from_pretrained(dir, gguf_file=name)``. Its ids for
the real SmolLM2 file are cached in the aprtrace cache directory, keyed by the file's sha256 and
the transformers version (the cache holds the reference's output, never aprtrace's).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from tokenizers import pre_tokenizers

from aprtrace.errors import InvalidFormatError, ModelLoadError, ValidationError
from aprtrace.formats.gguf import load_gguf, read_gguf
from aprtrace.tokenizer import (
    build_tokenizer,
    byte_alphabet,
    encode,
    merges_from_scores,
    tokenizer_from_gguf_metadata,
)
from conftest import CACHE_DIR

TEXTS = [
    "What is 2+2?",
    "Hello world",
    "  multiple   spaces  here ",
    "line1\nline2\n\n\nline3\r\nend",
    "tabs\tand\t\ttabs",
    "unicode: héllo wörld ñ 日本語 Привет мир",
    "emoji 😀 👍🏽 👨‍👩‍👧 done",
    "digits 1234567890 3.14159 and 42nd, x2y3",
    "  1 12 123 1234 12345",
    "don't I'll we've they're IT'S",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "def f(x):\n    return x**2  # square\n",
    "",
    " ",
    "a",
    "ÀÁÂÃÄÅ ǅ ﬁ",
]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def hf_reference_ids(
    gguf_path: Path,
    texts: list[str],
    cache: bool = True,
    pre_tokenizer: Any = None,
    variant: str = "gguf",
) -> dict[str, list[int]]:
    """ids of ``texts`` from transformers' GGUF tokenizer, cached on disk per file and version.

    With ``pre_tokenizer`` (a ``tokenizers`` pre-tokenizer) transformers' tokenizer gets that
    pre-tokenizer instead of the one its GGUF conversion picks; ``variant`` names it in the cache.
    """
    import transformers

    key = f"{_sha256(gguf_path)[:24]}-transformers{transformers.__version__}"
    cache_file = CACHE_DIR / f"hf-token-ids-{key}.json"
    stored: dict[str, dict[str, list[int]]] = {}
    if cache and cache_file.exists():
        stored = json.loads(cache_file.read_text())
    known = stored.setdefault(variant, {})
    missing = [t for t in texts if t not in known]
    if missing:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        if pre_tokenizer is not None:
            tok.backend_tokenizer.pre_tokenizer = pre_tokenizer
        for text in missing:
            known[text] = tok(text, add_special_tokens=False)["input_ids"]
        if cache:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(stored, ensure_ascii=False))
            tmp.replace(cache_file)
    return {t: known[t] for t in texts}


# --- SmolLM2 (gpt2 model, pre "smollm") ----------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_path):
    return tokenizer_from_gguf_metadata(read_gguf(smollm2_path).metadata, str(smollm2_path))


def test_smollm2_default_prompt(smollm2_tokenizer):
    # What Hugging Face transformers gives for SmolLM2-135M-Instruct.
    assert encode(smollm2_tokenizer, "What is 2+2?") == [1780, 314, 216, 34, 27, 34, 47]
    assert encode(smollm2_tokenizer, "What is 2+2?", add_bos=True, bos_id=1)[0] == 1


# SmolLM2's published tokenizer.json splits every digit off before the byte-level regex (so does
# llama.cpp for pre type "smollm"); transformers' GGUF conversion uses the plain GPT-2 regex. The
# two differ only when whitespace runs meet digits, e.g. "  1": ["ĠĠ", "1"] versus ["Ġ", "Ġ1"...].
SMOLLM2_TOKENIZER_JSON_PRE = pre_tokenizers.Sequence(
    [
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ]
)
GGUF_CONVERSION_DIFFERS = {"  1 12 123 1234 12345"}


@pytest.mark.reference
@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2_path, smollm2_tokenizer):
    published = hf_reference_ids(
        smollm2_path, TEXTS, pre_tokenizer=SMOLLM2_TOKENIZER_JSON_PRE, variant="tokenizer.json"
    )
    converted = hf_reference_ids(smollm2_path, TEXTS)
    for text in TEXTS:
        ids = encode(smollm2_tokenizer, text)
        assert ids == published[text], repr(text)
        assert (ids == converted[text]) is (text not in GGUF_CONVERSION_DIFFERS), repr(text)


def test_smollm2_decodes_back(smollm2_tokenizer):
    for text in TEXTS:
        if "<|" in text:
            continue
        ids = encode(smollm2_tokenizer, text)
        assert smollm2_tokenizer.decode(ids, skip_special_tokens=False) == text


def test_smollm2_specials_are_whole(smollm2_tokenizer):
    ids = encode(smollm2_tokenizer, "<|im_start|>user")
    assert ids[0] == 1 and len(ids) == 2  # <|im_start|> is id 1 in SmolLM2


# --- Tiny vocabularies written with gguf-py, compared with transformers' GGUF conversion ---------


def _write_tokenizer_gguf(
    path: Path,
    arch: str,
    model: str,
    tokens,
    *,
    merges=None,
    scores=None,
    token_types=None,
    pre=None,
) -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    if merges is not None:
        writer.add_token_merges(merges)
    if scores is not None:
        writer.add_token_scores(scores)
    if token_types is not None:
        writer.add_token_types(token_types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _byte_level_vocab() -> tuple[list[str], list[str], list[int]]:
    """A small byte-level BPE: all 256 bytes plus merges learned on a toy corpus."""
    corpus = (
        "the cat sat on the mat. don't stop 123 4567 the theory of everything\n\n"
        "  indented  code\tx = 1_000_000; héllo wörld 日本 'S 'll"
    )
    spell = byte_alphabet()
    tokens = ["<unk>", "<|bos|>", "<|eos|>", "<|user|>"] + [spell[b] for b in range(256)]
    merges: list[str] = []
    words = [[spell[b] for b in w.encode()] for w in corpus.replace(" ", "\0 ").split("\0")]
    for _ in range(120):  # greedy pair-count BPE training (deterministic tie-break)
        counts: dict[tuple[str, str], int] = {}
        for w in words:
            for pair in zip(w, w[1:], strict=False):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = max(sorted(counts), key=lambda p: counts[p])
        merges.append(f"{best[0]} {best[1]}")
        tokens.append(best[0] + best[1])
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == best:
                    w[i : i + 2] = [best[0] + best[1]]
                i += 1
    types = [2, 3, 3, 3] + [1] * (len(tokens) - 4)
    return tokens, merges, types


TINY_TEXTS = [
    "the cat sat on the mat.",
    "don't stop 123 4567 89",
    "  indented  code\tx = 1_000_000;",
    "héllo wörld 日本 THE'S we'll",
    "line\n\nnext\r\n  end  ",
    "<|user|>hi<|eos|>",
    "x1y22z333 12345678",
]


@pytest.mark.slow  # imports transformers (several seconds)
@pytest.mark.reference
@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe", "default", "gpt2"])
def test_byte_level_pre_types_match_transformers(tmp_path, pre):
    tokens, merges, types = _byte_level_vocab()
    path = tmp_path / f"bpe-{pre}.gguf"
    _write_tokenizer_gguf(path, "qwen2", "gpt2", tokens, merges=merges, token_types=types, pre=pre)
    ours = tokenizer_from_gguf_metadata(read_gguf(path).metadata)
    reference = hf_reference_ids(path, TINY_TEXTS, cache=False)
    for text in TINY_TEXTS:
        assert encode(ours, text) == reference[text], (pre, text)


def _sentencepiece_vocab() -> tuple[list[str], list[float], list[int]]:
    """A small SentencePiece-style llama vocabulary: specials, 256 byte tokens, scored pieces."""
    pieces = [
        "▁",
        "e",
        "t",
        "h",
        "a",
        "o",
        "l",
        "r",
        "d",
        "w",
        "n",
        "s",
        "i",
        "c",
        "▁t",
        "he",
        "▁the",
        "ll",
        "▁w",
        "or",
        "ld",
        "▁wor",
        "▁world",
        "▁h",
        "el",
        "▁hel",
        "▁hello",
        "lo",
        "in",
        "▁a",
        "at",
        "▁c",
        "▁cat",
        "▁s",
        "▁sat",
        "on",
        "▁on",
        "▁▁",
        "▁▁▁▁",
        "é",
        "ré",
        "▁ré",
        "1",
        "2",
        "12",
        "▁1",
        "st",
        "▁st",
        "er",
        "▁t",
        ".",
        ",",
    ]
    seen: set[str] = set()
    unique = [p for p in pieces if not (p in seen or seen.add(p))]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + unique
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(unique))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(unique)
    return tokens, scores, types


SPM_TEXTS = [
    "hello world",
    "the cat sat on the mat.",
    " leading space",
    "two  spaces   three",
    "réssumé 12 123",
    "new\nline",
    "日本 ünïcödé",
    "<s>hello</s>",
    "",
]


@pytest.mark.slow  # imports transformers (several seconds)
@pytest.mark.reference
def test_sentencepiece_llama_matches_transformers(tmp_path):
    tokens, scores, types = _sentencepiece_vocab()
    path = tmp_path / "spm.gguf"
    _write_tokenizer_gguf(path, "llama", "llama", tokens, scores=scores, token_types=types)
    ours = load_gguf_tokenizer(path)
    reference = hf_reference_ids(path, SPM_TEXTS, cache=False)
    for text in SPM_TEXTS:
        assert encode(ours, text) == reference[text], text
    # Byte fallback: "日" is not in the vocabulary, so it comes out as its three UTF-8 bytes.
    ids = encode(ours, "日")
    assert ids[-3:] == [3 + 0xE6, 3 + 0x97, 3 + 0xA5]


def load_gguf_tokenizer(path: Path):
    return tokenizer_from_gguf_metadata(read_gguf(path).metadata, str(path))


# --- Builder unit tests (hand-computed expectations) -----------------------------------------


def test_cached_merges_equal_the_recovered_ones_and_a_damaged_cache_is_ignored(
    tmp_path, monkeypatch
):
    from aprtrace.tokenizer import cached_merges_from_scores

    monkeypatch.setenv("APRTRACE_CACHE", str(tmp_path))
    tokens = ["a", "b", "c", "ab", "bc", "abc", "\n", "\n\n"]
    scores = [0.0, 0.0, 0.0, -1.0, -0.5, -2.0, 0.0, -3.0]
    expected = merges_from_scores(tokens, scores)
    assert cached_merges_from_scores(tokens, scores) == expected  # computed, then stored
    (cached,) = (tmp_path / "tokenizer-merges").iterdir()
    assert cached.stat().st_size == 8 * len(expected)
    assert cached_merges_from_scores(tokens, scores) == expected  # read back
    # Another vocabulary never reads this entry; a damaged entry is recomputed.
    assert cached_merges_from_scores(tokens, scores[:-1] + [-4.0]) == merges_from_scores(
        tokens, scores[:-1] + [-4.0]
    )
    cached.write_bytes(b"\xff" * 8 * len(expected))  # ids out of range
    assert cached_merges_from_scores(tokens, scores) == expected
    cached.write_bytes(b"\x00" * 5)  # not whole pairs
    assert cached_merges_from_scores(tokens, scores) == expected


def test_merges_from_scores_rank_by_score_then_length():
    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    scores = [0, 0, 0, -1.0, -0.5, -2.0]
    # bc (score -0.5) before ab (-1.0); abc (-2.0): cut "a|bc" and "ab|c", longer left first.
    assert merges_from_scores(tokens, scores) == [("b", "c"), ("a", "b"), ("ab", "c"), ("a", "bc")]


def test_unknown_tokenizer_model_is_model_load_error():
    with pytest.raises(ModelLoadError, match="bert"):
        build_tokenizer("bert", ["a", "b"], merges=[])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tokens": []},
        {"tokens": ["a", 3]},
        {"tokens": ["a", "b"], "merges": ["ab"]},
        {"tokens": ["a", "b"], "merges": ["a c"]},
        {"tokens": ["a", "b"], "merges": ["a b"], "token_types": [1]},
        {"tokens": ["a", "b"], "merges": ["a b"], "bos_id": 7},
        {"tokens": ["a", "b"], "merges": None},
    ],
)
def test_bad_vocabularies_are_invalid_format(kwargs):
    with pytest.raises(InvalidFormatError):
        build_tokenizer("gpt2", **kwargs)


def test_encode_bos_without_id_is_validation_error():
    tok = build_tokenizer("gpt2", ["a", "b", "ab"], merges=["a b"])
    assert encode(tok, "ab") == [2]
    with pytest.raises(ValidationError):
        encode(tok, "ab", add_bos=True, bos_id=None)


def test_gguf_tokenizer_metadata_errors(tmp_path):
    with pytest.raises(InvalidFormatError):
        tokenizer_from_gguf_metadata({"tokenizer.ggml.tokens": ["a"]})  # no model
    with pytest.raises(InvalidFormatError):
        tokenizer_from_gguf_metadata({"tokenizer.ggml.tokens": "a", "tokenizer.ggml.model": "x"})
    assert tokenizer_from_gguf_metadata({}) is None


def test_smollm2_open_time(smollm2_path):
    import time

    start = time.perf_counter()
    model = load_gguf(smollm2_path)
    ids = encode(model.tokenizer, "What is 2+2?")
    elapsed = time.perf_counter() - start
    print(f"\nSmolLM2 open + tokenizer + encode: {elapsed * 1000:.0f} ms")
    assert ids == [1780, 314, 216, 34, 27, 34, 47]
