"""GGUF reader: a memory-mapped, bounds-checked parser and the loader of Llama/Qwen models.

The parser reads the header, the key/value metadata and the tensor infos in one pass over a
memory map. Every count, length and offset is checked against the file size before anything is
allocated or read, so a hostile file fails at once with :class:`InvalidFormatError`. Tensor data
is never copied: each tensor is a zero-copy ``uint8`` view of the map, decoded on request.

``gguf.GGUFReader`` is not used for loading: it builds one NumPy array per tokenizer string and
takes tens of seconds on a 49k-token vocabulary; this parser reads the same metadata in
milliseconds. The ``gguf`` package still provides the constants (types, block sizes, key names).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, Keys
from gguf import quants as gguf_quants

from aprtrace.config import ModelConfig, normalize_architecture
from aprtrace.errors import InvalidFormatError, ModelLoadError, NotFoundError, OutputError
from aprtrace.mapping import (
    gguf_config_fields,
    gguf_norm_offset,
    gguf_qk_permuted,
    gguf_to_hf,
    split_fused,
)
from aprtrace.mapping import moe as moe_mapping
from aprtrace.model import Deferred, LazyTensor, Model, layer_name

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 4  # nested metadata arrays deeper than this are rejected
# Smallest possible on-disk size of one entry, used to reject absurd counts before any loop.
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset
_MIN_STRING_BYTES = 8
# Arrays of at most this many items are kept in Model.metadata (token lists are not).
SMALL_ARRAY_LIMIT = 64

_SCALAR_FORMATS: dict[int, struct.Struct] = {
    GGUFValueType.UINT8: struct.Struct("<B"),
    GGUFValueType.INT8: struct.Struct("<b"),
    GGUFValueType.UINT16: struct.Struct("<H"),
    GGUFValueType.INT16: struct.Struct("<h"),
    GGUFValueType.UINT32: struct.Struct("<I"),
    GGUFValueType.INT32: struct.Struct("<i"),
    GGUFValueType.FLOAT32: struct.Struct("<f"),
    GGUFValueType.BOOL: struct.Struct("<?"),
    GGUFValueType.UINT64: struct.Struct("<Q"),
    GGUFValueType.INT64: struct.Struct("<q"),
    GGUFValueType.FLOAT64: struct.Struct("<d"),
}
_NUMPY_DTYPES: dict[int, str] = {
    GGUFValueType.UINT8: "<u1",
    GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4",
    GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.BOOL: "<u1",
    GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor's entry in the GGUF tensor table."""

    name: str
    dims: tuple[int, ...]  # GGUF order: fastest-varying first
    qtype: str  # GGML type name, e.g. "Q4_1"
    type_id: int
    offset: int  # absolute offset in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape in NumPy order (``[out_dim, in_dim]``)."""
        return tuple(reversed(self.dims))

    @property
    def n_values(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n


@dataclass
class GGUFFile:
    """A parsed GGUF file: header, metadata and tensor table, with the data memory-mapped."""

    path: Path
    version: int
    alignment: int
    data_offset: int
    file_size: int
    metadata: dict[str, Any]  # arrays of strings are lists; numeric arrays are NumPy arrays
    value_types: dict[str, str]  # key -> GGUF value type name ("STRING", "ARRAY[UINT32]", ...)
    tensors: dict[str, GGUFTensorInfo]
    buffer: np.ndarray = field(repr=False)  # uint8 view of the whole file

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get(Keys.General.ARCHITECTURE)
        return value if isinstance(value, str) else None

    def tensor_bytes(self, info: GGUFTensorInfo) -> np.ndarray:
        """Zero-copy ``uint8`` view of one tensor's data."""
        return self.buffer[info.offset : info.offset + info.nbytes]

    def scalar_metadata(self, small_arrays: bool = True) -> dict[str, Any]:
        """Metadata without the large arrays (token lists, merges, scores), JSON-friendly."""
        out: dict[str, Any] = {}
        for key, value in self.metadata.items():
            if isinstance(value, np.ndarray):
                if small_arrays and value.size <= SMALL_ARRAY_LIMIT:
                    out[key] = value.tolist()
            elif isinstance(value, list):
                if small_arrays and len(value) <= SMALL_ARRAY_LIMIT:
                    out[key] = [v.tolist() if isinstance(v, np.ndarray) else v for v in value]
            else:
                out[key] = value
        return out

    def array_lengths(self) -> dict[str, int]:
        """Length of every array-valued key (for a summary of what was left out)."""
        return {
            key: len(value)
            for key, value in self.metadata.items()
            if isinstance(value, (list, np.ndarray))
        }

    def tensor_table(self) -> list[dict[str, Any]]:
        """One row per tensor, in file order: name, NumPy shape, type, offset, bytes."""
        return [
            {
                "name": t.name,
                "shape": list(t.shape),
                "qtype": t.qtype,
                "offset": t.offset,
                "nbytes": t.nbytes,
            }
            for t in self.tensors.values()
        ]


class _Cursor:
    """Sequential little-endian reads from a byte buffer, every read bounds-checked."""

    def __init__(self, buf: Any, size: int, where: str):
        self.buf = buf
        self.size = size
        self.pos = 0
        self.where = where

    def fail(self, what: str, pos: int | None = None) -> InvalidFormatError:
        at = self.pos if pos is None else pos
        return InvalidFormatError(
            f"{self.where}: {what} (at byte offset {at}, file size {self.size})",
            hint="the file is truncated or not a valid GGUF; re-download or re-convert it",
        )

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.size - self.pos:
            raise self.fail(f"{what} needs {n} bytes but only {self.size - self.pos} remain")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (value,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return value

    def u64(self, what: str) -> int:
        self.need(8, what)
        (value,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return value

    def string(self, what: str, strict: bool = False) -> str:
        start = self.pos
        n = self.u64(f"length of {what}")
        if n > self.size - self.pos:
            raise self.fail(f"{what} claims {n} bytes, past the end of the file", start)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            if strict:
                raise self.fail(f"{what} is not valid UTF-8", start) from None
            return raw.decode("utf-8", "replace")

    def string_array(self, count: int, what: str) -> list[str]:
        """``count`` strings in a row: the hot loop for tokenizer vocabularies."""
        if count > (self.size - self.pos) // _MIN_STRING_BYTES:
            raise self.fail(f"{what} claims {count} strings, more than the file can hold")
        buf, size, pos = self.buf, self.size, self.pos
        unpack = _U64.unpack_from
        out: list[str] = [""] * count
        i = 0
        try:
            for i in range(count):
                (n,) = unpack(buf, pos)  # struct.error past the end
                pos += 8
                if n > size - pos:
                    raise self.fail(
                        f"{what}[{i}] claims {n} bytes, past the end of the file", pos - 8
                    )
                out[i] = buf[pos : pos + n].decode("utf-8", "replace")
                pos += n
        except struct.error:
            self.pos = pos
            raise self.fail(f"{what}[{i}]: length runs past the end of the file") from None
        self.pos = pos
        return out

    def value(self, type_id: int, what: str, depth: int = 0) -> tuple[Any, str]:
        """One metadata value and the name of its type."""
        if type_id in _SCALAR_FORMATS:
            fmt = _SCALAR_FORMATS[type_id]
            self.need(fmt.size, what)
            (value,) = fmt.unpack_from(self.buf, self.pos)
            self.pos += fmt.size
            return value, GGUFValueType(type_id).name
        if type_id == GGUFValueType.STRING:
            return self.string(what), "STRING"
        if type_id == GGUFValueType.ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise self.fail(f"{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
            item_type = self.u32(f"item type of {what}")
            count = self.u64(f"length of {what}")
            if item_type in _NUMPY_DTYPES:
                width = _SCALAR_FORMATS[item_type].size
                if count > (self.size - self.pos) // width:
                    raise self.fail(f"{what} claims {count} items, past the end of the file")
                arr = np.frombuffer(
                    self.buf, dtype=_NUMPY_DTYPES[item_type], count=count, offset=self.pos
                ).copy()
                if item_type == GGUFValueType.BOOL:
                    arr = arr.astype(bool)
                self.pos += count * width
                return arr, f"ARRAY[{GGUFValueType(item_type).name}]"
            if item_type == GGUFValueType.STRING:
                return self.string_array(count, what), "ARRAY[STRING]"
            if item_type == GGUFValueType.ARRAY:
                # Each nested array takes at least 12 bytes (type + count).
                if count > (self.size - self.pos) // 12:
                    raise self.fail(f"{what} claims {count} nested arrays, past the end of file")
                items = [
                    self.value(GGUFValueType.ARRAY, f"{what}[{i}]", depth + 1)[0]
                    for i in range(count)
                ]
                return items, "ARRAY[ARRAY]"
            raise self.fail(f"{what}: unknown array item type {item_type}")
        raise self.fail(f"{what}: unknown value type {type_id}")


def _open_buffer(path: Path) -> tuple[Any, int]:
    """Memory-map ``path`` read-only; returns (buffer, size)."""
    if not path.exists():
        raise NotFoundError(f"{path}: no such file", hint="check the model path")
    if path.is_dir():
        raise InvalidFormatError(f"{path}: is a directory, expected a .gguf file")
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                return b"", 0
            return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ), size
    except OSError as exc:
        raise OutputError(f"{path}: cannot read: {exc.strerror or exc}") from None


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's header, metadata and tensor table (tensor data stays mapped)."""
    path = Path(path)
    buf, _ = _open_buffer(path)
    return parse_gguf(buf, path)


def parse_gguf(buf: Any, path: str | Path = "<memory>") -> GGUFFile:
    """Parse GGUF bytes (``bytes``, ``mmap`` or any buffer); ``path`` names it in errors."""
    path = Path(path)
    size = len(buf)
    cur = _Cursor(buf, size, str(path))
    if size < 4 or buf[:4] != GGUF_MAGIC:
        raise InvalidFormatError(
            f"{path}: not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF')",
            hint="pass a .gguf, .apr or safetensors model",
        )
    cur.pos = 4
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        extra = " (a big-endian GGUF, not supported)" if swapped in SUPPORTED_VERSIONS else ""
        raise InvalidFormatError(
            f"{path}: GGUF version {version}{extra} is not supported",
            hint=f"supported versions: {', '.join(map(str, SUPPORTED_VERSIONS))}",
        )
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    remaining = size - cur.pos
    if (
        n_kv > remaining // _MIN_KV_BYTES
        or n_tensors > remaining // _MIN_TENSOR_INFO_BYTES
        or (n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > remaining)
    ):
        raise cur.fail(
            f"header claims {n_tensors} tensors and {n_kv} metadata entries, "
            "more than the file can hold"
        )

    metadata: dict[str, Any] = {}
    value_types: dict[str, str] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}", strict=True)
        type_id = cur.u32(f"value type of '{key}'")
        value, type_name = cur.value(type_id, f"metadata '{key}'")
        if key in metadata:
            raise cur.fail(f"duplicate metadata key '{key}'")
        metadata[key] = value
        value_types[key] = type_name

    alignment = metadata.get(Keys.General.ALIGNMENT, DEFAULT_ALIGNMENT)
    if (
        isinstance(alignment, bool)
        or not isinstance(alignment, int)
        or alignment <= 0
        or alignment & (alignment - 1)
    ):
        raise InvalidFormatError(
            f"{path}: general.alignment = {alignment!r} must be a positive power of two"
        )

    infos: list[tuple[str, tuple[int, ...], int, int, int]] = []
    for i in range(n_tensors):
        start = cur.pos
        name = cur.string(f"name of tensor #{i}", strict=True)
        n_dims = cur.u32(f"dimension count of tensor '{name}'")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor '{name}' has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
        dims = tuple(cur.u64(f"dimension {d} of tensor '{name}'") for d in range(n_dims))
        type_id = cur.u32(f"type of tensor '{name}'")
        offset = cur.u64(f"data offset of tensor '{name}'")
        infos.append((name, dims, type_id, offset, start))

    data_offset = -(-cur.pos // alignment) * alignment
    tensors: dict[str, GGUFTensorInfo] = {}
    for name, dims, type_id, offset, start in infos:
        where = f"{path}: tensor '{name}'"
        if name in tensors:
            raise InvalidFormatError(
                f"{path}: duplicate tensor name '{name}' (tensor info at byte {start})",
                hint="the file is corrupt; re-convert it",
            )
        try:
            gtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise ModelLoadError(
                f"{where}: unknown tensor type id {type_id}",
                hint="this GGML type is not known to the installed gguf package; "
                "re-quantize to a common type (Q4_K, Q8_0, F16)",
            ) from None
        block, block_bytes = GGML_QUANT_SIZES[gtype]
        n_values = 1
        for d in dims:
            n_values *= d
        if dims[0] % block:
            raise InvalidFormatError(
                f"{where}: first dimension {dims[0]} is not a multiple of the {gtype.name} "
                f"block size {block}"
            )
        nbytes = n_values // block * block_bytes
        if offset % alignment:
            raise InvalidFormatError(
                f"{where}: data offset {offset} is not aligned to {alignment} bytes"
            )
        begin = data_offset + offset
        if begin > size or nbytes > size - begin:
            raise InvalidFormatError(
                f"{where}: data [{begin}, {begin + nbytes}) runs past the end of the file "
                f"({size} bytes)",
                hint="the file is truncated; re-download it",
            )
        tensors[name] = GGUFTensorInfo(name, dims, gtype.name, type_id, begin, nbytes)

    ordered = sorted(tensors.values(), key=lambda t: t.offset)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a.offset + a.nbytes > b.offset:
            raise InvalidFormatError(
                f"{path}: tensors '{a.name}' and '{b.name}' overlap in the file",
                hint="the file is corrupt; re-convert it",
            )

    array = np.frombuffer(buf, dtype=np.uint8) if size else np.zeros(0, dtype=np.uint8)
    return GGUFFile(
        path=path,
        version=version,
        alignment=alignment,
        data_offset=data_offset,
        file_size=size,
        metadata=metadata,
        value_types=value_types,
        tensors=tensors,
        buffer=array,
    )


# --- Model loading ---------------------------------------------------------------------------


def hf_tensor_name(gguf_name: str, arch: str | None = None) -> str | None:
    """Hugging Face name of a GGUF tensor, or None if it has no counterpart (see mapping)."""
    return gguf_to_hf(gguf_name, arch)


_DECODABLE_CACHE: dict[str, bool] = {}


def is_decodable(qtype: str) -> bool:
    """Whether ``quant.dequantize`` (via ``gguf.quants``) can decode this GGML type."""
    if qtype in ("F32", "F16", "BF16", "APR_Q4", "APR_Q8"):  # decoded by aprtrace.quant itself
        return True
    if qtype not in _DECODABLE_CACHE:
        try:
            gtype = GGMLQuantizationType[qtype]
        except KeyError:
            return False
        traits = getattr(gguf_quants, "_type_traits", None)
        if isinstance(traits, dict):
            ok = gtype in traits
        else:  # a gguf version without the registry: try one zero block
            block, nbytes = GGML_QUANT_SIZES[gtype]
            try:
                gguf_quants.dequantize(np.zeros(nbytes, dtype=np.uint8), gtype)
                ok = True
            except NotImplementedError:
                ok = False
        _DECODABLE_CACHE[qtype] = ok
    return _DECODABLE_CACHE[qtype]


def _int_key(meta: dict, key: str, where: str, default: int | None = None) -> int:
    value = meta.get(key, default)
    if value is None:
        raise ModelLoadError(f"{where}: required metadata '{key}' is missing")
    if isinstance(value, np.ndarray):
        if value.size and np.all(value == value.flat[0]):
            value = value.flat[0].item()  # a per-layer array with one value everywhere
        else:
            raise ModelLoadError(
                f"{where}: metadata '{key}' varies per layer, which is not supported"
            )
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ModelLoadError(f"{where}: metadata '{key}' = {value!r} must be an integer")
    return int(value)


def _float_key(meta: dict, key: str, where: str, default: float) -> float:
    value = meta.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelLoadError(f"{where}: metadata '{key}' = {value!r} must be a number")
    return float(value)


def gguf_config(gf: GGUFFile) -> ModelConfig:
    """ModelConfig from a GGUF's ``<arch>.*`` metadata and tensor table."""
    where = str(gf.path)
    raw_arch = gf.architecture
    if raw_arch is None:
        raise ModelLoadError(f"{where}: metadata 'general.architecture' is missing")
    arch = moe_mapping.gguf_architecture(raw_arch, gf.metadata) or normalize_architecture(
        raw_arch, where
    )
    meta = gf.metadata
    p = raw_arch + "."
    hidden = _int_key(meta, p + "embedding_length", where)
    heads = _int_key(meta, p + "attention.head_count", where)
    kv_heads = _int_key(meta, p + "attention.head_count_kv", where, default=heads)
    if heads <= 0:
        raise ModelLoadError(f"{where}: {p}attention.head_count = {heads} must be positive")
    head_dim = _int_key(meta, p + "attention.key_length", where, default=hidden // heads)
    embed = gf.tensors.get("token_embd.weight")
    vocab: int | None = embed.shape[0] if embed is not None and len(embed.dims) == 2 else None
    if vocab is None and isinstance(meta.get(p + "vocab_size"), int):
        vocab = meta[p + "vocab_size"]
    if vocab is None and isinstance(meta.get(Keys.Tokenizer.LIST), list):
        vocab = len(meta[Keys.Tokenizer.LIST])
    ffn = meta.get(p + "feed_forward_length")
    gate = gf.tensors.get("blk.0.ffn_gate.weight")
    if ffn is None and gate is not None:
        ffn = gate.shape[0]
    shapes = {name: info.shape for name, info in gf.tensors.items()}
    moe = moe_mapping.gguf_moe_fields(meta, raw_arch, arch, shapes, where)
    if ffn is None and moe:
        ffn = moe["moe_intermediate_size"]
    scaling = meta.get(p + "rope.scaling.type")
    linear_factor = 1.0
    if scaling == "linear":
        linear_factor = _float_key(meta, p + "rope.scaling.factor", where, 1.0)
    elif scaling not in (None, "none"):
        raise ModelLoadError(
            f"{where}: RoPE scaling {scaling!r} ({p}rope.scaling.type) is not supported",
            hint="aprtrace implements plain RoPE, linear scaling and Llama 3 frequency "
            "factors (rope_freqs.weight)",
        )
    _refuse_unsupported_gguf(gf, p, where)
    rope_dims = _int_key(meta, p + "rope.dimension_count", where, default=head_dim)
    window = _int_key(meta, p + "attention.sliding_window", where, default=0)
    if arch in ("qwen2", "qwen3"):  # a config value without use_sliding_window: not applied
        window = 0
    num_layers = _int_key(meta, p + "block_count", where)
    extra = gguf_config_fields(arch, meta, num_layers, hidden, heads, head_dim, where)
    config = ModelConfig(
        architecture=arch,
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        intermediate_size=_int_key({"ffn": ffn}, "ffn", where) if ffn is not None else 0,
        vocab_size=vocab or 0,
        head_dim=head_dim,
        rope_theta=_float_key(meta, p + "rope.freq_base", where, 10000.0),
        rope_linear_factor=linear_factor,
        rms_norm_eps=_float_key(
            meta,
            p + "attention.layer_norm_rms_epsilon",
            where,
            _float_key(meta, p + "attention.layer_norm_epsilon", where, 1e-6),  # LayerNorm
        ),
        max_position_embeddings=_int_key(meta, p + "context_length", where, default=2048),
        tie_word_embeddings="output.weight" not in gf.tensors,
        qkv_bias="blk.0.attn_q.bias" in gf.tensors,
        qk_norm="blk.0.attn_q_norm.weight" in gf.tensors,
        bos_token_id=_optional_id(meta.get(Keys.Tokenizer.BOS_ID)),
        eos_token_id=_optional_id(meta.get(Keys.Tokenizer.EOS_ID)),
        **(
            {
                # llama.cpp writes 0 for "no window" (Phi-4 under the phi3 architecture).
                "sliding_window": window if window > 0 else None,
                "partial_rotary_factor": rope_dims / head_dim if head_dim > 0 else 1.0,
                # Granite's multipliers, under llama.cpp's key names (0 / absent: not set).
                "embedding_multiplier": _float_key(meta, p + "embedding_scale", where, 1.0) or 1.0,
                "residual_multiplier": _float_key(meta, p + "residual_scale", where, 1.0) or 1.0,
                "attention_multiplier": _float_key(meta, p + "attention.scale", where, 0.0) or None,
                "logits_scaling": _float_key(meta, p + "logit_scale", where, 1.0) or 1.0,
            }
            | extra  # Gemma's own reading of its window and RoPE keys
        ),
        **moe,
    )
    config.validate(where)
    if config.num_layers * 6 > len(gf.tensors):  # also bounds the per-layer checks below
        raise ModelLoadError(
            f"{where}: {p}block_count = {config.num_layers} but the file holds only "
            f"{len(gf.tensors)} tensors (each layer needs at least 6)",
            hint="the file is incomplete or its metadata is wrong",
        )
    return config


# GGUF contents that change the math in ways aprtrace does not implement: refused by name.
_UNSUPPORTED_TENSORS = {
    "rope_factors_long.weight": "LongRoPE (Phi-3 128k 'longrope'/'su' RoPE scaling)",
    "rope_factors_short.weight": "LongRoPE (Phi-3 128k 'longrope'/'su' RoPE scaling)",
}
_UNSUPPORTED_KEYS = {
    "attention.sliding_window_pattern": "per-layer sliding-window patterns (OLMo 3 style)",
}


def _refuse_unsupported_gguf(gf: GGUFFile, p: str, where: str) -> None:
    if gf.architecture == "stablelm":
        # llama.cpp runs a StableLM block without ffn_norm as a parallel residual.
        parallel = gf.metadata.get(p + "use_parallel_residual") is True or (
            "blk.0.attn_norm.weight" in gf.tensors and "blk.0.ffn_norm.weight" not in gf.tensors
        )
        if parallel or "blk.0.attn_q_norm.weight" in gf.tensors:
            raise ModelLoadError(
                f"{where}: StableLM 2 12B's parallel residual / per-head Q/K LayerNorm is not "
                "supported",
                hint="see the README's list of supported architectures and features",
            )
    for name, feature in _UNSUPPORTED_TENSORS.items():
        if name in gf.tensors:
            raise ModelLoadError(
                f"{where}: {feature} is not supported (tensor '{name}')",
                hint="aprtrace would compute wrong RoPE angles for this model; it refuses it",
            )
    for key, feature in _UNSUPPORTED_KEYS.items():
        if gf.architecture in ("gemma2", "gemma3"):  # Gemma reads its own window pattern
            break
        value = gf.metadata.get(p + key)
        if value is not None and not (isinstance(value, int) and value == 0):
            raise ModelLoadError(
                f"{where}: {feature} is not supported ({p}{key})",
                hint="see the README's list of supported architectures and features",
            )


def _optional_id(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _expected_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> NumPy shape for every tensor the forward pass reads (from its module)."""
    from aprtrace.arch import architecture_of

    return architecture_of(c).expected_shapes(c)


def gguf_lazy_tensors(gf: GGUFFile, arch: str | None = None) -> dict[str, LazyTensor]:
    """Every tensor as a LazyTensor under its Hugging Face name (unmapped ones keep theirs)."""
    out: dict[str, LazyTensor] = {}
    for info in gf.tensors.values():
        name = hf_tensor_name(info.name, arch) or info.name
        out[name] = LazyTensor(
            name=name,
            shape=info.shape,
            qtype=info.qtype,
            raw=gf.tensor_bytes(info),
            where=f"{gf.path} ('{info.name}')",
        )
    return out


def check_tensors(tensors: dict[str, LazyTensor], config: ModelConfig, where: str) -> None:
    """Every tensor the architecture needs is present, decodable and of the right shape."""
    # Each layer has several tensors: a layer count beyond the tensor count (say 2^40 from a
    # corrupt header) is reported at the first missing layer, before listing expected names.
    if config.num_layers > len(tensors):
        first = next(
            i
            for i in range(config.num_layers)
            if layer_name(i, "self_attn.o_proj.weight") not in tensors
        )
        raise ModelLoadError(
            f"{where}: the config says {config.num_layers} layers, but the tensors of layer "
            f"{first} are missing ({len(tensors)} tensors in the file)",
            hint="the file is incomplete or its layer count is corrupt",
        )
    for name, shape in _expected_shapes(config).items():
        t = tensors.get(name)
        if t is None:
            raise ModelLoadError(
                f"{where}: tensor '{name}' is missing",
                hint=f"the file is incomplete or not a {config.architecture} checkpoint",
            )
        if not is_decodable(t.qtype):
            raise ModelLoadError(
                f"{where}: tensor '{name}' {t.where} has type {t.qtype}, which cannot be "
                "dequantized",
                hint="re-quantize the model to a supported type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, "
                "Q2_K..Q6_K, IQ*, F16, BF16, F32)",
            )
        if tuple(t.shape) != shape and not (len(shape) == 1 and t.n_values == shape[0]):
            raise ModelLoadError(
                f"{where}: tensor '{name}' has shape {list(t.shape)}, the config "
                f"({config.architecture}, hidden {config.hidden_size}, heads "
                f"{config.num_heads}/{config.num_kv_heads}) needs {list(shape)}"
            )


def load_gguf(path: str | Path, with_tokenizer: bool = True) -> Model:
    """Open a GGUF model: config, lazily decoded weights in HF layout, and its tokenizer."""
    return model_from_gguf(read_gguf(path), with_tokenizer)


def model_from_gguf(gf: GGUFFile, with_tokenizer: bool = True) -> Model:
    """The Model described by a parsed GGUF (checks names, shapes and types up front)."""
    path = gf.path
    config = gguf_config(gf)
    tensors = gguf_lazy_tensors(gf, config.architecture)
    if config.is_moe:
        tensors = moe_mapping.split_stacked_experts(
            tensors, config.num_experts, config.moe_intermediate_size, str(path)
        )
    split_fused(tensors, config, str(path))
    check_tensors(tensors, config, str(path))
    tokenizer = None
    if with_tokenizer:
        from aprtrace.tokenizer import tokenizer_from_gguf_metadata

        # Built on first use: a trace given token ids never needs it.
        tokenizer = Deferred(lambda: tokenizer_from_gguf_metadata(gf.metadata, where=str(path)))
    metadata = gf.scalar_metadata()
    metadata["gguf.version"] = gf.version
    return Model(
        path=path,
        format="gguf",
        config=config,
        tensors=tensors,
        tokenizer=tokenizer,
        qk_permuted=gguf_qk_permuted(config.architecture),
        metadata=metadata,
        norm_offset=gguf_norm_offset(config.architecture),
    )
