"""APR v2 model files (aprender's `.apr`): reader, writer and `inspect` description.

Layout (FORMATS.md section 5): 64-byte header, compact JSON metadata, a tensor index sorted by
name, 64-byte-aligned tensor data, a CRC-32 footer over everything before it. Every count,
offset and size is checked against the file size before anything is allocated or mapped.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from aprtrace import quant
from aprtrace.atomic import atomic_path
from aprtrace.config import ModelConfig, normalize_architecture
from aprtrace.errors import InvalidFormatError, ModelLoadError, NotFoundError, OutputError
from aprtrace.formats.gguf import check_tensors
from aprtrace.formats.gguf import hf_tensor_name as gguf_hf_name
from aprtrace.mapping import gguf_qk_permuted, hf_config_fields, split_fused
from aprtrace.mapping import moe as moe_mapping
from aprtrace.model import LazyTensor, Model
from aprtrace.safeio import loads_json

MAGIC = b"APR\x00"
VERSION = (2, 0)
HEADER_SIZE = 64
FOOTER_SIZE = 4
ALIGN = 64
MAX_METADATA_SIZE = 16 * 1024 * 1024
MAX_NDIM = 8
_HEADER = struct.Struct("<4sBBHIQIQQI20s")  # 64 bytes; CRC at offset 40
_MIN_ENTRY_SIZE = 2 + 1 + 1 + 8 + 8  # empty name, ndim 0

FLAG_BITS = {
    "LZ4": 0x0001,
    "ZSTD": 0x0002,
    "ENCRYPTED": 0x0004,
    "SIGNED": 0x0008,
    "SHARDED": 0x0010,
    "QUANTIZED": 0x0020,
    "HAS_FILTERBANK": 0x0040,
    "HAS_MODEL_CARD": 0x0080,
    "STREAMING": 0x0100,
    "HAS_VOCAB": 0x0200,
    "LAYOUT_ROW_MAJOR": 0x0400,
    "LAYOUT_COLUMN_MAJOR": 0x0800,
}
_UNUSABLE_FLAGS = ("LZ4", "ZSTD", "ENCRYPTED", "LAYOUT_COLUMN_MAJOR")

# dtype code -> name as the spec's table calls it (for `inspect`).
DTYPE_NAMES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "F64",
    4: "I32",
    5: "I64",
    6: "I8",
    7: "U8",
    8: "Q8_0",
    12: "Q4_K",
    13: "Q5_K",
    14: "Q6_K",
    30: "BF16",
    128: "APR_Q4",
    129: "APR_Q8",
}
# The codes aprtrace's writer emits, by LazyTensor.qtype.
WRITER_DTYPE_CODES = {"F32": 0, "F16": 1, "BF16": 30, "Q4_K": 12, "Q6_K": 14, "Q8_0": 8}

# The metadata fields aprender's writer emits, in its order, with the default written when
# unknown. Fields typed non-optionally in aprender's reader must never be null.
STANDARD_FIELDS: tuple[tuple[str, Any], ...] = (
    ("model_type", ""),
    ("name", None),
    ("description", None),
    ("author", None),
    ("license", None),
    ("version", None),
    ("source", None),
    ("original_format", None),
    ("created_at", None),
    ("total_size", 0),
    ("param_count", 0),
    ("quantization", None),
    ("sharding", None),
    ("chat_template", None),
    ("chat_format", None),
    ("special_tokens", None),
    ("architecture", None),
    ("hidden_size", None),
    ("num_layers", None),
    ("num_heads", None),
    ("num_kv_heads", None),
    ("vocab_size", None),
    ("intermediate_size", None),
    ("max_position_embeddings", None),
    ("rope_theta", None),
    ("rope_type", None),
    ("rms_norm_eps", None),
    ("head_dim", None),
    ("num_experts", None),
    ("num_experts_per_tok", None),
    ("moe_intermediate_size", None),
)
_INT_FIELDS = {
    "total_size",
    "param_count",
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "vocab_size",
    "intermediate_size",
    "max_position_embeddings",
    "rope_type",
    "head_dim",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
}
_STR_FIELDS = {
    "model_type",
    "name",
    "description",
    "author",
    "license",
    "version",
    "source",
    "original_format",
    "created_at",
    "chat_template",
    "chat_format",
    "architecture",
}
# Alternative spellings readers accept; the writer refuses them (one spelling per field).
_ALIASES = {
    "hidden_size": ("hidden_size", "hidden_dim"),
    "num_layers": ("num_hidden_layers", "num_layers"),
    "num_heads": ("num_attention_heads", "num_heads"),
    "num_kv_heads": ("num_key_value_heads", "num_kv_heads"),
    "vocab_size": ("vocab_size",),
    "intermediate_size": ("intermediate_size", "intermediate_dim"),
    "rope_theta": ("rope_theta",),
    "rms_norm_eps": ("rms_norm_eps",),
    "max_position_embeddings": ("max_position_embeddings", "context_length"),
    "architecture": ("architecture", "model_type"),
    "head_dim": ("head_dim",),
}
_WRITER_SPELLING_CONFLICTS = {
    "hidden_dim": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
    "intermediate_dim": "intermediate_size",
    "context_length": "max_position_embeddings",
}

QWEN_FAMILY = ("qwen2", "qwen3", "qwen2moe", "qwen3moe")
ROPE_TYPE_ADJACENT = 0
ROPE_TYPE_SPLIT_HALF = 2


def align64(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def hf_tensor_name(name: str, arch: str | None = None) -> str:
    """The Hugging Face name of a tensor named in HF or GGUF style (unknown names unchanged).

    GGUF's fused ``blk.N.attn_qkv`` becomes ``model.layers.N.self_attn.qkv_proj`` (split into
    q/k/v on load); ``arch`` picks the architecture's GGUF names (Phi-3's fused ``ffn_up``).
    """
    if name.startswith("blk.") and ".attn_qkv." in name:
        layer, _, kind = name[4:].split(".", 2)
        return f"model.layers.{layer}.self_attn.qkv_proj.{kind}"
    return gguf_hf_name(name, arch) or name


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AprHeader:
    version: tuple[int, int]
    flags: int
    tensor_count: int
    metadata_offset: int
    metadata_size: int
    tensor_index_offset: int
    data_offset: int
    checksum: int

    @property
    def flag_names(self) -> list[str]:
        return [name for name, bit in FLAG_BITS.items() if self.flags & bit]


@dataclass(frozen=True)
class AprIndexEntry:
    name: str
    dtype: int
    shape: tuple[int, ...]
    offset: int
    size: int


@dataclass
class AprFile:
    """A parsed, bounds-checked APR v2 file whose data stays memory-mapped."""

    path: Path
    header: AprHeader
    metadata: dict
    entries: list[AprIndexEntry]
    data: np.ndarray  # uint8 memmap of the whole file

    def tensor_bytes(self, entry: AprIndexEntry) -> np.ndarray:
        start = self.header.data_offset + entry.offset
        return self.data[start : start + entry.size]


def _bad(path: Path, what: str, hint: str | None = None) -> InvalidFormatError:
    return InvalidFormatError(
        f"{path}: {what}",
        hint=hint or "the APR file is corrupt or truncated; re-create it with `aprtrace convert`",
    )


def read_apr(path: Path, verify: bool = True) -> AprFile:
    """Parse and validate the header, metadata and index of an APR v2 file."""
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"file not found: {path}")
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(HEADER_SIZE)
    except OSError as exc:
        raise OutputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(head) < 4 or head[:4] != MAGIC:
        raise _bad(path, f"not an APR file (magic {head[:4].hex(' ')}, expected 41 50 52 00)")
    if file_size < HEADER_SIZE + FOOTER_SIZE:
        raise _bad(path, f"truncated: {file_size} bytes, an APR file has at least 68")
    fields = _HEADER.unpack(head)
    _, major, minor, flags, count, meta_off, meta_size, index_off, data_off, crc, _ = fields
    header = AprHeader((major, minor), flags, count, meta_off, meta_size, index_off, data_off, crc)
    if verify:
        computed = zlib.crc32(head[:40] + head[44:64])
        if computed != crc:
            raise _bad(
                path,
                f"header CRC-32 mismatch (stored {crc:#010x}, computed {computed:#010x})",
                hint="the file is damaged; `--no-verify` reads it anyway at your own risk",
            )
    if major != VERSION[0]:
        raise _bad(
            path, f"APR version {major}.{minor} is not supported (expected 2.x)", hint="convert it"
        )
    for name in _UNUSABLE_FLAGS:
        if flags & FLAG_BITS[name]:
            raise ModelLoadError(
                f"{path}: the APR file has flag {name} set; aprtrace cannot read "
                f"{'column-major' if name == 'LAYOUT_COLUMN_MAJOR' else name.lower()} tensor data",
                hint="re-export the model uncompressed, unencrypted and row-major",
            )
    body_end = file_size - FOOTER_SIZE
    if meta_size > MAX_METADATA_SIZE:
        raise _bad(path, f"metadata size {meta_size} exceeds the 16 MiB limit")
    if not (HEADER_SIZE <= meta_off and meta_off + meta_size <= index_off):
        raise _bad(path, f"metadata [{meta_off}, +{meta_size}) overlaps the header or the index")
    if not index_off <= data_off <= body_end:
        raise _bad(
            path,
            f"tensor index offset {index_off} / data offset {data_off} lie outside the "
            f"file ({file_size} bytes)",
        )
    if count * _MIN_ENTRY_SIZE > data_off - index_off:
        raise _bad(
            path,
            f"tensor count {count} cannot fit in the {data_off - index_off}-byte tensor index",
        )
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as exc:
        raise OutputError(f"cannot map {path}: {exc}") from exc
    if verify:
        (stored,) = struct.unpack("<I", bytes(data[body_end:file_size]))
        computed = zlib.crc32(memoryview(data[:body_end]))
        if computed != stored:
            raise _bad(
                path,
                f"footer CRC-32 mismatch (stored {stored:#010x}, computed {computed:#010x})",
                hint="the file is damaged; `--no-verify` reads it anyway at your own risk",
            )
    metadata = _parse_metadata(path, bytes(data[meta_off : meta_off + meta_size]))
    entries = _parse_index(path, bytes(data[index_off:data_off]), count, body_end - data_off)
    return AprFile(path, header, metadata, entries, data)


def _parse_metadata(path: Path, raw: bytes) -> dict:
    if not raw:
        return {}
    metadata = loads_json(raw, lambda why: _bad(path, f"metadata is not valid UTF-8 JSON ({why})"))
    if not isinstance(metadata, dict):
        raise _bad(path, f"metadata is a JSON {type(metadata).__name__}, expected an object")
    return metadata


def _parse_index(path: Path, raw: bytes, count: int, data_len: int) -> list[AprIndexEntry]:
    entries: list[AprIndexEntry] = []
    pos = 0
    previous: bytes | None = None
    for i in range(count):
        where = f"tensor index entry {i}"
        if pos + 2 > len(raw):
            raise _bad(path, f"{where}: index ends early")
        (name_len,) = struct.unpack_from("<H", raw, pos)
        pos += 2
        if pos + name_len + 2 > len(raw):
            raise _bad(path, f"{where}: name of {name_len} bytes runs past the index")
        name_bytes = raw[pos : pos + name_len]
        pos += name_len
        try:
            name = name_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(path, f"{where}: name is not UTF-8") from None
        if previous is not None and name_bytes <= previous:
            raise _bad(
                path,
                f"tensor index is not sorted by name: '{name}' follows "
                f"'{previous.decode('utf-8', 'replace')}'",
                hint="aprender's writer sorts the index; the file was not written by a "
                "conforming APR v2 writer",
            )
        previous = name_bytes
        dtype, ndim = raw[pos], raw[pos + 1]
        pos += 2
        if ndim > MAX_NDIM:
            raise _bad(path, f"tensor '{name}': ndim {ndim} exceeds {MAX_NDIM}")
        if pos + 8 * ndim + 16 > len(raw):
            raise _bad(path, f"tensor '{name}': entry runs past the index")
        dims = struct.unpack_from(f"<{ndim}Q", raw, pos)
        pos += 8 * ndim
        offset, size = struct.unpack_from("<QQ", raw, pos)
        pos += 16
        if offset > data_len or size > data_len - offset:
            raise _bad(
                path,
                f"tensor '{name}': bytes [{offset}, +{size}) lie past the end of the data "
                f"section ({data_len} bytes)",
            )
        entries.append(AprIndexEntry(name, dtype, tuple(int(d) for d in dims), offset, size))
    data_end = max((align64(e.offset + e.size) for e in entries), default=0)
    if data_end > data_len:
        raise _bad(
            path,
            f"data section is {data_len} bytes, the tensor index needs {data_end} "
            "(tensors are padded to 64 bytes)",
        )
    by_offset = sorted((e for e in entries if e.size), key=lambda e: e.offset)
    for a, b in zip(by_offset, by_offset[1:], strict=False):
        if a.offset + a.size > b.offset:
            raise _bad(path, f"tensors '{a.name}' and '{b.name}' overlap in the data section")
    return entries


def entry_qtype(entry: AprIndexEntry) -> str:
    """The LazyTensor qtype of an index entry, decoding the codes as aprender's trace path.

    3/6/7 are GGML Q4_1/Q5_0/Q5_1; 8 is Q8_0 when the size is ceil(n/32)*34, else the legacy
    APR Q4; 13 is Q5_K, or Q4_K when its size is Q4_K's (aprender decodes 13 as Q4_K); 128 and
    129 are the APR-native Q4 and Q8. The integer codes 4 and 5 cannot hold weights.
    """
    n = math.prod(entry.shape)
    code = entry.dtype
    if code == 8:
        return "Q8_0" if entry.size == -(-n // 32) * 34 else "APR_Q4"
    if code == 13:
        return "Q4_K" if entry.size == -(-n // 256) * 144 else "Q5_K"
    mapping = {
        0: "F32",
        1: "F16",
        2: "Q4_0",
        3: "Q4_1",
        6: "Q5_0",
        7: "Q5_1",
        12: "Q4_K",
        14: "Q6_K",
        30: "BF16",
        128: "APR_Q4",
        129: "APR_Q8",
    }
    if code not in mapping:
        label = DTYPE_NAMES.get(code, f"code {code}")
        raise ModelLoadError(
            f"tensor '{entry.name}' has dtype {label}, which cannot hold model weights",
            hint="supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, "
            "APR Q4 (128), APR Q8 (129)",
        )
    return mapping[code]


def expected_size(qtype: str, n_values: int) -> int:
    """Bytes that ``n_values`` values of ``qtype`` take."""
    if qtype == "APR_Q8":
        return 4 + n_values
    block, nbytes = quant.block_geometry(qtype)
    return -(-n_values // block) * nbytes


def _lazy_tensors(apr: AprFile, arch: str | None = None) -> dict[str, LazyTensor]:
    tensors: dict[str, LazyTensor] = {}
    for entry in apr.entries:
        qtype = entry_qtype(entry)
        need = expected_size(qtype, math.prod(entry.shape))
        if entry.size != need:
            raise _bad(
                apr.path,
                f"tensor '{entry.name}' ({qtype} {list(entry.shape)}) has {entry.size} bytes, "
                f"expected {need}",
            )
        name = hf_tensor_name(entry.name, arch)
        if name in tensors:
            raise _bad(apr.path, f"tensor '{name}' appears twice (HF and GGUF spelling)")
        raw = apr.tensor_bytes(entry)
        tensors[name] = LazyTensor(name, entry.shape, qtype, raw, where=str(apr.path))
    return tensors


def _meta(metadata: Mapping, field: str) -> Any:
    """First matching alias; a key present with null stops the fallback."""
    for key in _ALIASES.get(field, (field,)):
        if key in metadata:
            return metadata[key]
    return None


def _meta_int(path: Path, metadata: Mapping, field: str) -> int | None:
    value = _meta(metadata, field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelLoadError(f"{path}: metadata {field} = {value!r} must be an integer")
    return value


def _meta_float(path: Path, metadata: Mapping, field: str, default: float) -> float:
    value = _meta(metadata, field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or abs(value) > 1e300:
        raise ModelLoadError(f"{path}: metadata {field} = {str(value)[:40]} must be a number")
    return float(value)


def is_qwen_family(architecture: str) -> bool:
    """Whether APR keeps Hugging Face's split-half Q/K rows (``rope_type`` 2: all but llama
    and granite, whose rows are in llama.cpp's adjacent-pair order)."""
    return not gguf_qk_permuted(architecture)


def resolve_architecture(path: Path, metadata: Mapping, arch: str | None) -> str:
    """The normalized architecture of an APR file, checked against ``rope_type``."""
    stored = _meta(metadata, "architecture")
    if stored is not None and not isinstance(stored, str):
        raise ModelLoadError(f"{path}: metadata architecture = {stored!r} must be a string")
    if not stored:
        if arch is None:
            raise ModelLoadError(
                f"{path}: the APR metadata has no architecture, so the Q/K layout (llama "
                "adjacent-pair or qwen split-half RoPE) is unknown",
                hint="pass --arch llama|qwen2|qwen3|gemma2|gemma3",
            )
        architecture = normalize_architecture(arch, "--arch")
    else:
        architecture = normalize_architecture(stored, str(path))
        if arch is not None and normalize_architecture(arch, "--arch") != architecture:
            raise ModelLoadError(
                f"{path}: --arch {arch} disagrees with the file's architecture '{stored}'",
                hint="drop --arch; it only fills in a missing architecture",
            )
    rope_type = metadata.get("rope_type")
    if rope_type is not None:
        expected = ROPE_TYPE_SPLIT_HALF if is_qwen_family(architecture) else ROPE_TYPE_ADJACENT
        if isinstance(rope_type, bool) or rope_type != expected:
            raise ModelLoadError(
                f"{path}: rope_type {rope_type!r} disagrees with architecture '{architecture}' "
                f"(expected {expected}: "
                f"{'split-half' if expected == ROPE_TYPE_SPLIT_HALF else 'adjacent-pair'})",
                hint="the file is inconsistent; fix its metadata or re-convert it",
            )
    return architecture


def load_apr(path: Path, verify: bool = True, arch: str | None = None) -> Model:
    """Open an APR v2 model; weights stay memory-mapped and encoded until used."""
    path = Path(path)
    apr = read_apr(path, verify=verify)
    metadata = apr.metadata
    architecture = resolve_architecture(path, metadata, arch)
    tensors = _lazy_tensors(apr, architecture)

    def shape_of(name: str) -> tuple[int, ...] | None:
        return tensors[name].shape if name in tensors else None

    embed = shape_of("model.embed_tokens.weight")
    if embed is None or len(embed) != 2:
        raise ModelLoadError(f"{path}: no 2-D 'model.embed_tokens.weight' tensor")
    hidden = _meta_int(path, metadata, "hidden_size") or embed[1]
    num_heads = _meta_int(path, metadata, "num_heads")
    if num_heads is None:
        raise ModelLoadError(f"{path}: metadata has no num_heads (or num_attention_heads)")
    if num_heads <= 0:  # it divides the head size below
        raise ModelLoadError(f"{path}: metadata num_heads = {num_heads} must be positive")
    head_dim = _meta_int(path, metadata, "head_dim")
    q_shape = shape_of("model.layers.0.self_attn.q_proj.weight")
    if head_dim is None:
        head_dim = q_shape[0] // num_heads if q_shape else hidden // max(num_heads, 1)
    num_kv_heads = _meta_int(path, metadata, "num_kv_heads") or num_heads
    gate_up = shape_of("model.layers.0.mlp.gate_up_proj.weight")
    fused_view = SimpleNamespace(
        q_dim=num_heads * head_dim,
        kv_dim=num_kv_heads * head_dim,
        intermediate_size=_meta_int(path, metadata, "intermediate_size")
        or (gate_up[0] // 2 if gate_up else 0),
    )
    split_fused(tensors, fused_view, str(path))

    layer_ids = {int(n.split(".")[2]) for n in tensors if n.startswith("model.layers.")}
    num_layers = _meta_int(path, metadata, "num_layers")
    if num_layers is None:
        num_layers = max(layer_ids) + 1 if layer_ids else 0
    gate = shape_of("model.layers.0.mlp.gate_proj.weight")
    intermediate = _meta_int(path, metadata, "intermediate_size") or (gate[0] if gate else 0)
    vocab = _meta_int(path, metadata, "vocab_size") or embed[0]
    tied = _drop_tied_lm_head(tensors, metadata)
    tensors = moe_mapping.hf_names_of_gguf_names(tensors, architecture)
    moe = moe_mapping.apr_moe_fields(metadata, architecture, tensors, str(path))
    if moe and not intermediate:
        intermediate = moe["moe_intermediate_size"]
    config = ModelConfig(
        architecture=architecture,
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate,
        vocab_size=vocab,
        head_dim=head_dim,
        rope_theta=_meta_float(path, metadata, "rope_theta", 10000.0),
        rms_norm_eps=_meta_float(path, metadata, "rms_norm_eps", 1e-6),
        max_position_embeddings=_meta_int(path, metadata, "max_position_embeddings") or 2048,
        tie_word_embeddings=tied,
        qkv_bias="model.layers.0.self_attn.q_proj.bias" in tensors,
        qk_norm="model.layers.0.self_attn.q_norm.weight" in tensors,
        bos_token_id=_token_id(metadata.get("tokenizer.bos_token_id")),
        eos_token_id=_token_id(metadata.get("tokenizer.eos_token_id")),
        **(
            {
                # Not aprender standard fields: written by `aprtrace convert` when they apply.
                "sliding_window": _meta_int(path, metadata, "sliding_window") or None,
                "partial_rotary_factor": _meta_float(path, metadata, "partial_rotary_factor", 1.0),
                "embedding_multiplier": _meta_float(path, metadata, "embedding_multiplier", 1.0),
                "residual_multiplier": _meta_float(path, metadata, "residual_multiplier", 1.0),
                "attention_multiplier": _meta_float(path, metadata, "attention_multiplier", 0.0)
                or None,
                "logits_scaling": _meta_float(path, metadata, "logits_scaling", 1.0),
            }
            # Gemma: the config.json spellings (sliding_window, layer_types, ...) as custom keys.
            | hf_config_fields(architecture, metadata, num_layers, str(path))
        ),
        **moe,
    ).validate(str(path))
    tensors = moe_mapping.hf_tensor_names(tensors, config, str(path))
    check_tensors(tensors, config, str(path))
    return Model(
        path=path,
        format="apr",
        config=config,
        tensors=tensors,
        tokenizer=_embedded_tokenizer(path, metadata, architecture),
        qk_permuted=gguf_qk_permuted(architecture),
        metadata=metadata,
    )


def _drop_tied_lm_head(tensors: dict[str, LazyTensor], metadata: Mapping) -> bool:
    """True when lm_head is the embedding; aprender's copy of it is then dropped."""
    embed = tensors["model.embed_tokens.weight"]
    head = tensors.get("lm_head.weight")
    if head is None:
        return True
    if metadata.get("tied_embeddings") is not True:
        return False
    same = (
        head.shape == embed.shape
        and head.qtype == embed.qtype
        and np.array_equal(head.raw, embed.raw)
    )
    if same:
        del tensors["lm_head.weight"]
    return same


def _embedded_tokenizer(path: Path, metadata: Mapping, architecture: str) -> Any:
    vocabulary = metadata.get("tokenizer.vocabulary")
    if not isinstance(vocabulary, list) or not vocabulary:
        return None
    if not all(isinstance(t, str) for t in vocabulary):
        raise ModelLoadError(f"{path}: tokenizer.vocabulary must be a list of strings")
    merges = metadata.get("tokenizer.merges") or []
    kind = metadata.get("tokenizer.model") or metadata.get("tokenizer.model_type") or "gpt2"
    if not merges and kind == "llama":
        merges = None  # SentencePiece: merges are recovered from tokenizer.scores
    pre = metadata.get("tokenizer.pre_type") or architecture
    from aprtrace.tokenizer import build_tokenizer

    def as_tuple(value: Any) -> tuple | None:
        return tuple(value) if isinstance(value, list) else None

    return build_tokenizer(
        model=kind,
        tokens=tuple(vocabulary),
        merges=as_tuple(merges),
        scores=as_tuple(metadata.get("tokenizer.scores")),
        token_types=as_tuple(metadata.get("tokenizer.token_type")),
        pre=pre if isinstance(pre, str) else None,
        bos_id=_token_id(metadata.get("tokenizer.bos_token_id")),
        eos_id=_token_id(metadata.get("tokenizer.eos_token_id")),
        add_space_prefix=metadata.get("tokenizer.add_space_prefix") is not False,
        where=str(path),
    )


def _token_id(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def metadata_json(metadata: Mapping[str, Any]) -> bytes:
    """Compact JSON of ``metadata``: aprender's standard fields in its order, then custom keys
    sorted by name. Types are checked as aprender's reader requires."""
    for alias, canonical in _WRITER_SPELLING_CONFLICTS.items():
        if alias in metadata:
            raise ValueError(f"metadata key '{alias}': write '{canonical}' (one spelling)")
    ordered: dict[str, Any] = {}
    for key, default in STANDARD_FIELDS:
        value = metadata.get(key, default)
        if value is None and default is not None:
            value = default
        if (
            key in _INT_FIELDS
            and value is not None
            and (isinstance(value, bool) or not isinstance(value, int))
        ):
            raise ValueError(f"metadata '{key}' = {value!r} must be an integer")
        if key in _STR_FIELDS and value is not None and not isinstance(value, str):
            raise ValueError(f"metadata '{key}' = {value!r} must be a string")
        if key in ("rope_theta", "rms_norm_eps") and value is not None:
            value = float(value)
        ordered[key] = value
    standard = {key for key, _ in STANDARD_FIELDS}
    for key in sorted(k for k in metadata if k not in standard):
        ordered[key] = metadata[key]
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    raw = text.encode("utf-8")
    if len(raw) > MAX_METADATA_SIZE:
        raise ValueError(f"metadata is {len(raw)} bytes, more than the 16 MiB APR limit")
    return raw


def _index_entry(name: bytes, dtype: int, shape: tuple[int, ...], offset: int, size: int) -> bytes:
    return (
        struct.pack("<H", len(name))
        + name
        + struct.pack("<BB", dtype, len(shape))
        + struct.pack(f"<{len(shape)}Q", *shape)
        + struct.pack("<QQ", offset, size)
    )


def _pad(n: int) -> bytes:
    return b"\x00" * (align64(n) - n)


TensorSpec = tuple[str, int, tuple[int, ...], Any]


def _as_bytes(raw: Any) -> memoryview:
    if isinstance(raw, np.ndarray):
        return memoryview(np.ascontiguousarray(raw).view(np.uint8).reshape(-1))
    return memoryview(raw).cast("B")


def write_apr(path: Path, metadata: Mapping[str, Any], tensors: Iterable[TensorSpec]) -> int:
    """Write an APR v2 file atomically; return its size in bytes.

    ``tensors`` holds ``(name, dtype_code, shape, raw)``; ``raw`` is ``bytes``, a
    ``memoryview``, a NumPy array (written as its bytes) or a zero-argument callable returning
    one of those, called once while writing (so a converter holds one tensor at a time).
    Deterministic: the same input gives the same file.
    """
    path = Path(path)
    items = []
    for name, dtype, shape, raw in tensors:
        shape = tuple(int(d) for d in shape)
        if len(shape) > MAX_NDIM:
            raise ValueError(f"tensor '{name}': {len(shape)} dims, APR allows {MAX_NDIM}")
        nbytes = _writer_size(name, dtype, shape)
        if not callable(raw):
            raw = _as_bytes(raw)
            _check_size_matches(name, nbytes, raw.nbytes)
        items.append((name.encode("utf-8"), dtype, shape, nbytes, raw))
    items.sort(key=lambda item: item[0])
    for a, b in zip(items, items[1:], strict=False):
        if a[0] == b[0]:
            raise ValueError(f"tensor '{a[0].decode()}' is given twice")
    meta = metadata_json(metadata)
    index = bytearray()
    offset = 0
    for name, dtype, shape, nbytes, _ in items:
        index += _index_entry(name, dtype, shape, offset, nbytes)
        offset += align64(nbytes)
    flags = FLAG_BITS["LAYOUT_ROW_MAJOR"]
    if metadata.get("tokenizer.vocabulary"):
        flags |= FLAG_BITS["HAS_VOCAB"]
    index_offset = HEADER_SIZE + align64(len(meta))
    data_offset = index_offset + align64(len(index))
    fields = [MAGIC, *VERSION, flags, len(items), HEADER_SIZE, len(meta), index_offset]
    header = _HEADER.pack(*fields, data_offset, 0, b"\x00" * 20)
    crc = zlib.crc32(header[:40] + header[44:])
    header = header[:40] + struct.pack("<I", crc) + header[44:]

    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        footer_crc = 0
        total = 0

        def put(chunk: Any) -> None:
            nonlocal footer_crc, total
            out.write(chunk)
            footer_crc = zlib.crc32(chunk, footer_crc)
            total += len(chunk)

        for chunk in (header, meta, _pad(len(meta)), bytes(index), _pad(len(index))):
            put(chunk)
        for name, _, _, nbytes, raw in items:
            data = _as_bytes(raw()) if callable(raw) else raw
            _check_size_matches(name.decode(), nbytes, data.nbytes)
            put(data)
            put(_pad(nbytes))
        out.write(struct.pack("<I", footer_crc))
    return total + FOOTER_SIZE


def _check_size_matches(name: Any, need: int, nbytes: int) -> None:
    if nbytes != need:
        raise ValueError(f"tensor '{name}': {nbytes} bytes given, its dtype and shape need {need}")


def _writer_size(name: str, dtype: int, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor aprtrace writes with ``dtype`` and ``shape``."""
    qtypes = {code: qtype for qtype, code in WRITER_DTYPE_CODES.items()}
    if dtype not in qtypes:
        raise ValueError(
            f"tensor '{name}': dtype code {dtype} is not one aprtrace writes "
            f"({sorted(WRITER_DTYPE_CODES.items(), key=lambda kv: kv[1])})"
        )
    return expected_size(qtypes[dtype], math.prod(shape))


# --------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------


def _summarize(value: Any) -> Any:
    if isinstance(value, list) and len(value) > 16:
        return f"[{len(value)} items: {', '.join(json.dumps(v) for v in value[:4])}, ...]"
    return value


def describe_apr(path: Path, verify: bool = True) -> dict:
    """Header, flags, metadata (long lists summarized) and the tensor table of an APR file."""
    apr = read_apr(Path(path), verify=verify)
    h = apr.header
    tensors = []
    for entry in apr.entries:
        try:
            decoded_as = entry_qtype(entry)
        except ModelLoadError:
            decoded_as = None
        tensors.append(
            {
                "name": entry.name,
                "dtype": entry.dtype,
                "dtype_name": DTYPE_NAMES.get(entry.dtype, f"unknown({entry.dtype})"),
                "decoded_as": decoded_as,
                "shape": list(entry.shape),
                "offset": entry.offset,
                "size": entry.size,
            }
        )
    return {
        "path": str(apr.path),
        "format": "apr",
        "file_size": int(apr.data.shape[0]),
        "header": {
            "magic": MAGIC.decode("latin-1").rstrip("\x00"),
            "version": f"{h.version[0]}.{h.version[1]}",
            "flags": h.flags,
            "flag_names": h.flag_names,
            "tensor_count": h.tensor_count,
            "metadata_offset": h.metadata_offset,
            "metadata_size": h.metadata_size,
            "tensor_index_offset": h.tensor_index_offset,
            "data_offset": h.data_offset,
            "checksum": f"{h.checksum:#010x}",
            "verified": verify,
        },
        "metadata": {key: _summarize(value) for key, value in apr.metadata.items()},
        "tensors": tensors,
    }
