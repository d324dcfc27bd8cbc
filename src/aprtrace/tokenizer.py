"""Tokenizers built from a model file's embedded vocabulary (GGUF or APR metadata).

Two vocabulary kinds are supported, as llama.cpp names them in ``tokenizer.ggml.model``:

- ``gpt2``: byte-level BPE with merges. How text is split before BPE depends on
  ``tokenizer.ggml.pre`` (``llama-bpe``, ``qwen2``, ``smollm``, ...); the regexes are those of
  the models' own ``tokenizer.json`` files.
- ``llama``: SentencePiece BPE with per-token scores and byte fallback. Merges are recovered from
  the scores as Hugging Face's conversion does; spaces become ``"▁"`` and a dummy prefix is
  added to the first word.

Control (type 3) and user-defined (type 4) tokens are added whole so they are never split.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from aprtrace.errors import InvalidFormatError, ModelLoadError, ValidationError
from aprtrace.safeio import path_text, read_regular_file

TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6

# Split regexes of the byte-level BPE families (from the models' tokenizer.json files).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre -> regex applied before the byte-level mapping. "gpt2" means the GPT-2
# regex built into ByteLevel; "smollm" splits every digit first (Digits(individual_digits)).
_PRE_SPLITS: dict[str, str] = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
    "megrez": _QWEN2_SPLIT,
    "gpt-4o": _GPT4O_SPLIT,
    "llama4": _GPT4O_SPLIT,
}
_DIGIT_PRES = {"smollm"}
SUPPORTED_MODELS = ("gpt2", "llama")


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character mapping used by byte-level BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@lru_cache(maxsize=1)
def _outside_byte_alphabet() -> re.Pattern[str]:
    return re.compile("[^" + re.escape("".join(byte_alphabet().values())) + "]")


def byte_level_pre_tokenizer(pre: str | None) -> Any:
    """The pre-tokenizer of a byte-level vocabulary with llama.cpp pre type ``pre``."""
    key = pre.strip().lower() if isinstance(pre, str) else pre
    if key in _PRE_SPLITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_PRE_SPLITS[key]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if key in _DIGIT_PRES:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    # "default", "gpt2" and unknown types: the GPT-2 regex (what Hugging Face's GGUF
    # conversion uses for a pre type it does not know).
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _merge_pairs(merges: Sequence[str], where: str) -> list[tuple[str, str]]:
    """``"left right"`` strings -> pairs (the hot path: ~50k merges per vocabulary)."""
    if set(map(type, merges)) - {str}:
        raise InvalidFormatError(f"{where}: the tokenizer merges hold non-string entries")
    pairs = [(left, right) for left, _, right in map(str.partition, merges, repeat(" "))]
    for i, (left, right) in enumerate(pairs):
        if not left or not right:
            raise InvalidFormatError(
                f"{where}: merge #{i} {merges[i]!r} is not two tokens separated by a space"
            )
    return pairs


def merges_from_scores(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """Recover BPE merges from a SentencePiece vocabulary with scores.

    Every token that can be cut into two vocabulary tokens yields that merge, ranked by the
    token's score (higher first), then by the longer left piece, then the longer right piece,
    as Hugging Face's ``generate_merges`` does.
    """
    vocab = {tok: i for i, tok in enumerate(tokens)}
    score_of = dict(zip(tokens, scores, strict=True))
    found: list[tuple[float, int, int, int, str, str]] = []
    order = 0
    for tok, score in score_of.items():
        cuts = [
            (vocab[tok[:k]], vocab[tok[k:]], tok[:k], tok[k:])
            for k in range(1, len(tok))
            if tok[:k] in vocab and tok[k:] in vocab
        ]
        for _, _, left, right in sorted(cuts):
            found.append((float(score), len(left), len(right), -order, left, right))
            order += 1
    # Descending on (score, len(left), len(right)); ties keep discovery order.
    found.sort(key=lambda m: (m[0], m[1], m[2], m[3]), reverse=True)
    return [(m[4], m[5]) for m in found]


# Bump when merges_from_scores changes what it returns: cached merge lists are keyed by it.
_MERGES_ALGORITHM = b"merges_from_scores v1"


def cached_merges_from_scores(
    tokens: Sequence[str], scores: Sequence[float]
) -> list[tuple[str, str]]:
    """``merges_from_scores``, remembered on disk per vocabulary.

    Recovering the merges of a 262,144-token vocabulary (Gemma 3) costs about 2-4 s of pure
    Python, 80% of a whole Gemma 3 270M trace; the cached list (token-id pairs, int32) loads in
    milliseconds. The key is the sha256 of the algorithm version, every token and every
    score, so any change of vocabulary or algorithm misses. A damaged or unwritable cache
    only costs the recomputation (benchmarks/RESULTS.md, "Tokenizer").
    """
    import hashlib

    from aprtrace.trace import cache_dir

    digest = hashlib.sha256(_MERGES_ALGORITHM)
    digest.update("\x00".join(tokens).encode("utf-8", "surrogatepass"))
    digest.update(np.asarray(scores, dtype=np.float64).tobytes())
    path = cache_dir() / "tokenizer-merges" / f"{digest.hexdigest()}.i32"
    ids = _read_merge_ids(path, len(tokens))
    if ids is not None:
        return [(tokens[left], tokens[right]) for left, right in ids.tolist()]
    pairs = merges_from_scores(tokens, scores)
    index = {tok: i for i, tok in enumerate(tokens)}
    flat = np.array([index[t] for pair in pairs for t in pair], dtype="<i4")
    try:
        from aprtrace.atomic import write_bytes_atomic

        write_bytes_atomic(path, flat.tobytes())
    except OSError:
        pass  # a read-only home: recompute next time
    return pairs


def _read_merge_ids(path: Path, n_tokens: int) -> np.ndarray | None:
    """The cached ``[n, 2]`` token-id pairs at ``path``, or None if absent or not valid."""
    try:
        if not path.is_file() or path.stat().st_size % 8 or path.stat().st_size > 64 << 20:
            return None
        ids = np.fromfile(path, dtype="<i4").reshape(-1, 2)
    except (OSError, ValueError):
        return None
    if ids.size and (ids.min() < 0 or ids.max() >= n_tokens):
        return None
    return ids


def _add_marked_tokens(
    tok: Tokenizer, tokens: Sequence[str], token_types: Sequence[int] | None, byte_level: bool
) -> None:
    if token_types is None:
        return
    alphabet = set(byte_alphabet().values()) if byte_level else None
    control = []
    user = []
    for token, kind in zip(tokens, token_types, strict=True):
        if kind == TOKEN_TYPE_CONTROL and token and (alphabet is None or set(token) <= alphabet):
            control.append(AddedToken(token, special=True, normalized=False))
        elif kind == TOKEN_TYPE_USER_DEFINED and token:
            user.append(AddedToken(token, special=False, normalized=False))
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)


def build_tokenizer(
    model: str,
    tokens: Sequence[str],
    merges: Sequence[str] | None = None,
    scores: Sequence[float] | None = None,
    token_types: Sequence[int] | None = None,
    pre: str | None = None,
    bos_id: int | None = None,
    eos_id: int | None = None,
    add_space_prefix: bool = True,
    where: str = "tokenizer",
) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` from an embedded vocabulary (GGUF or APR metadata).

    ``model`` is ``gpt2`` (byte-level BPE; needs ``merges``) or ``llama`` (SentencePiece; merges
    from ``merges`` or recovered from ``scores``). ``bos_id``/``eos_id`` are only range-checked
    here; :func:`encode` adds BOS on request.
    """
    if not isinstance(tokens, Sequence) or not tokens:
        raise InvalidFormatError(f"{where}: the tokenizer vocabulary is empty or not a list")
    if set(map(type, tokens)) - {str}:
        raise InvalidFormatError(f"{where}: the tokenizer vocabulary holds non-string entries")
    n = len(tokens)
    for label, seq in (("token_type", token_types), ("scores", scores)):
        if seq is not None and len(seq) != n:
            raise InvalidFormatError(
                f"{where}: tokenizer {label} has {len(seq)} entries but the vocabulary has {n}"
            )
    for label, value in (("bos", bos_id), ("eos", eos_id)):
        if value is not None and not 0 <= value < n:
            raise InvalidFormatError(
                f"{where}: tokenizer {label} token id {value} is outside the vocabulary "
                f"(0..{n - 1})"
            )
    kind = model.strip().lower() if isinstance(model, str) else ""
    try:
        if kind == "gpt2":
            tok = _byte_level_bpe(tokens, merges, pre, where)
        elif kind == "llama":
            tok = _sentencepiece_bpe(tokens, merges, scores, token_types, add_space_prefix, where)
        else:
            raise ModelLoadError(
                f"{where}: tokenizer model '{model}' is not supported",
                hint=f"supported: {', '.join(SUPPORTED_MODELS)}; or pass --tokens to give ids",
            )
        _add_marked_tokens(tok, tokens, token_types, byte_level=kind == "gpt2")
    except (InvalidFormatError, ModelLoadError):
        raise
    except Exception as exc:  # tokenizers reports bad vocabularies with its own exceptions
        raise InvalidFormatError(f"{where}: cannot build the tokenizer: {exc}") from None
    return tok


def _byte_level_bpe(
    tokens: Sequence[str], merges: Sequence[str] | None, pre: str | None, where: str
) -> Tokenizer:
    if merges is None:
        raise InvalidFormatError(f"{where}: a byte-level BPE (gpt2) tokenizer needs merges")
    vocab = dict(zip(tokens, range(len(tokens)), strict=True))
    if _outside_byte_alphabet().search("".join(tokens)):
        # Tokens outside the byte alphabet (rare, e.g. raw UTF-8 specials) are respelled.
        spell = byte_alphabet()
        vocab = {}
        for i, token in enumerate(tokens):
            if _outside_byte_alphabet().search(token):
                token = "".join(spell[b] for b in token.encode("utf-8"))
            vocab[token] = i
    key = pre.strip().lower() if isinstance(pre, str) else pre
    bpe = models.BPE(
        vocab=vocab,
        merges=_merge_pairs(merges, where),
        ignore_merges=key in ("llama-bpe", "llama3", "llama-v3"),
    )
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = byte_level_pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(
    tokens: Sequence[str],
    merges: Sequence[str] | None,
    scores: Sequence[float] | None,
    token_types: Sequence[int] | None,
    add_space_prefix: bool,
    where: str,
) -> Tokenizer:
    if merges is not None:
        pairs = _merge_pairs(merges, where)
    elif scores is not None:
        pairs = cached_merges_from_scores(tokens, scores)
    else:
        raise InvalidFormatError(f"{where}: a SentencePiece (llama) tokenizer needs scores")
    vocab = {token: i for i, token in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(bpe)
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _as_list(value: Any) -> list | None:
    if value is None:
        return None
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return list(value)
    return None


def _as_id(value: Any) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: a float id of +-inf
        return None


def tokenizer_from_gguf_metadata(meta: Mapping[str, Any], where: str = "gguf") -> Tokenizer | None:
    """The tokenizer described by ``tokenizer.ggml.*`` keys, or None if there is none."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        return None
    if not isinstance(tokens, list):
        raise InvalidFormatError(f"{where}: tokenizer.ggml.tokens is not an array of strings")
    model = meta.get("tokenizer.ggml.model")
    if not isinstance(model, str):
        raise InvalidFormatError(f"{where}: tokenizer.ggml.model is missing or not a string")
    merges = meta.get("tokenizer.ggml.merges")
    if merges is not None and not isinstance(merges, list):
        raise InvalidFormatError(f"{where}: tokenizer.ggml.merges is not an array of strings")
    add_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    return build_tokenizer(
        model=model,
        tokens=tokens,
        merges=merges,
        scores=_as_list(meta.get("tokenizer.ggml.scores")),
        token_types=_as_list(meta.get("tokenizer.ggml.token_type")),
        pre=meta.get("tokenizer.ggml.pre")
        if isinstance(meta.get("tokenizer.ggml.pre"), str)
        else None,
        bos_id=_as_id(meta.get("tokenizer.ggml.bos_token_id")),
        eos_id=_as_id(meta.get("tokenizer.ggml.eos_token_id")),
        add_space_prefix=bool(add_prefix) if isinstance(add_prefix, (bool, int)) else True,
        where=where,
    )


def load_tokenizer_json(path: str | Path) -> Tokenizer:
    """A Hugging Face ``tokenizer.json`` file (safetensors model directories)."""
    path = Path(path)
    text = read_tokenizer_json(path)
    try:
        return Tokenizer.from_str(text)
    except BaseException as exc:
        if not isinstance(exc, Exception) and not is_rust_panic(exc):
            raise
        raise InvalidFormatError(f"{path_text(path)}: not a valid tokenizer.json: {exc}") from None


def is_rust_panic(exc: BaseException) -> bool:
    """A panic inside the tokenizers library (pyo3's PanicException, a BaseException)."""
    return type(exc).__name__ == "PanicException"


# The largest real tokenizer.json files (250k-token vocabularies) are 20-40 MB.
MAX_TOKENIZER_JSON = 256 << 20


def read_tokenizer_json(path: Path) -> str:
    """The text of a ``tokenizer.json``, read with the bounded reader (regular file, size
    cap, UTF-8); the tokenizers library parses it."""

    def bad(why: str) -> InvalidFormatError:
        return InvalidFormatError(f"{path_text(path)}: not a valid tokenizer.json: {why}")

    raw = read_regular_file(path, MAX_TOKENIZER_JSON, bad)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None


def encode(
    tokenizer: Tokenizer, text: str, add_bos: bool = False, bos_id: int | None = None
) -> list[int]:
    """Token ids of ``text``, without special tokens added, BOS first only if ``add_bos``."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if add_bos:
        if bos_id is None:
            raise ValidationError(
                "--bos was given but the model names no BOS token",
                hint="drop --bos or pass the ids with --tokens",
            )
        ids = [bos_id, *ids]
    return ids
