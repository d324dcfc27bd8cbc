"""Model = config + lazily decoded weights (Hugging Face names and layout) + tokenizer."""

from __future__ import annotations

import contextlib
import mmap
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aprtrace import quant
from aprtrace.config import ModelConfig
from aprtrace.errors import ModelLoadError, OutputError
from aprtrace.mapping import is_norm_weight


@dataclass
class LazyTensor:
    """A tensor still in its file's encoding; decoded to float32 only when asked.

    ``shape`` is in NumPy order (``[out_dim, in_dim]``). ``raw`` is a zero-copy view of the
    tensor's bytes (usually a slice of a memory map).
    """

    name: str
    shape: tuple[int, ...]
    qtype: str
    raw: np.ndarray
    where: str = ""

    @property
    def n_values(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    def load(self, out: np.ndarray | None = None) -> np.ndarray:
        """The whole tensor as float32 in ``shape`` (decoded into ``out``, a float32 buffer of
        ``n_values``, where the type allows)."""
        check_source_intact(self.raw, self.where, self.name)
        try:
            values = quant.dequantize(self.raw, self.qtype, self.n_values, out)
        except ModelLoadError as exc:
            raise ModelLoadError(f"{self.where}: tensor '{self.name}': {exc.message}") from None
        release_mapped_pages(self.raw)
        return values.reshape(self.shape)

    def rows(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` of a 2-D tensor as float32, decoding only those rows (into
        ``out``, a float32 buffer of at least that many values, where the type allows)."""
        if len(self.shape) != 2:
            return self.load()[start:stop]
        n_rows, row_len = self.shape
        stop = min(stop, n_rows)
        if self.qtype == "APR_Q8":
            return self.load()[start:stop]
        nbytes = quant.row_bytes(self.qtype, row_len)
        raw = self.raw.reshape(-1).view(np.uint8)
        chunk = raw[start * nbytes : stop * nbytes]
        n = (stop - start) * row_len
        check_source_intact(chunk, self.where, self.name)
        try:
            values = quant.dequantize(chunk, self.qtype, n, None if out is None else out[:n])
        except ModelLoadError as exc:
            raise ModelLoadError(f"{self.where}: tensor '{self.name}': {exc.message}") from None
        release_mapped_pages(chunk)
        return values.reshape(stop - start, row_len)

    def take(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` of a 2-D tensor (embedding lookup), decoding only those rows.

        The rows' encoded bytes are gathered first and decoded in one call, so a long prompt
        costs one dequantization, not one per token.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(self.shape) != 2 or self.qtype == "APR_Q8":
            return self.load()[ids]
        n_rows, row_len = self.shape
        if ids.size == 0:
            return np.zeros((0, row_len), dtype=np.float32)
        nbytes = quant.row_bytes(self.qtype, row_len)
        encoded = self.raw.reshape(-1).view(np.uint8)[: n_rows * nbytes].reshape(n_rows, nbytes)
        check_source_intact(encoded, self.where, self.name)
        try:
            values = quant.dequantize(encoded[ids], self.qtype, ids.size * row_len)
        except ModelLoadError as exc:
            raise ModelLoadError(f"{self.where}: tensor '{self.name}': {exc.message}") from None
        return values.reshape(ids.size, row_len)


def _read_only_mapping(array: np.ndarray) -> mmap.mmap | None:
    """The read-only memory map ``array`` is a view of, if any."""
    base = array
    while True:
        if isinstance(base, mmap.mmap):
            return base if memoryview(base).readonly else None
        if isinstance(base, memoryview):
            base = base.obj
        elif isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        else:
            return None


def _offset_in_mapping(array: np.ndarray, mapping: mmap.mmap) -> int:
    map_start = np.frombuffer(mapping, dtype=np.uint8, count=1).ctypes.data
    return array.ctypes.data - map_start


def check_source_intact(array: np.ndarray, where: str, name: str) -> None:
    """Raise OutputError when the file ``array`` is mapped from no longer holds its bytes.

    Touching a mapped page past the end of a file that another process truncated kills the
    process with SIGBUS; checking the file's current size (``fstat`` through the mapping)
    before each decode turns that into an error message. The file can still shrink during
    the decode itself; ``install_sigbus_exit`` covers that window.
    """
    mapping = _read_only_mapping(array)
    if mapping is None or array.nbytes == 0:
        return
    need = _offset_in_mapping(array, mapping) + array.nbytes
    try:
        size = mapping.size()
    except (OSError, ValueError):  # the descriptor is gone: nothing to compare against
        return
    if size < need:
        raise OutputError(
            f"{where}: the model file shrank to {size} bytes while aprtrace was reading it "
            f"(tensor '{name}' needs bytes up to {need})",
            hint="another process truncated or is rewriting the file; re-run once it is complete",
        )


def release_mapped_pages(array: np.ndarray) -> None:
    """Drop this process's resident pages of a read-only file mapping once they are decoded.

    Pages of a memory-mapped model count in the process's RSS once touched, so a forward pass
    over an 8 GB file would grow to 8 GB. ``MADV_DONTNEED`` unmaps them from this process; the
    kernel's page cache keeps them, so reading them again costs no I/O, and the bytes cannot
    change (the mapping is read-only). Arrays not backed by a read-only map are left alone.
    """
    mapping = _read_only_mapping(array)
    if mapping is None or array.nbytes == 0 or not array.flags.c_contiguous:
        return
    if not hasattr(mmap, "MADV_DONTNEED"):  # not every platform has it
        return
    offset = _offset_in_mapping(array, mapping)
    first = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE  # only whole pages inside the array
    last = (offset + array.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        mapping.madvise(mmap.MADV_DONTNEED, first, last - first)


def unpermute_llama_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (adjacent-pair RoPE order -> Hugging Face split-half).

    llama.cpp's converter stores ``w.reshape(h, 2, d/2, ...).swapaxes(1, 2)``; this is its inverse.
    Works for weights ``[h*d, in]`` and biases ``[h*d]``.
    """
    rows = weight.shape[0]
    head_dim = rows // n_heads
    return (
        weight.reshape(n_heads, head_dim // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def permute_llama_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation (Hugging Face split-half -> adjacent-pair order)."""
    rows = weight.shape[0]
    head_dim = rows // n_heads
    return (
        weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


_LAYER_ROLE = re.compile(r"^model\.layers\.\d+\.(.+)$")
# Routed experts of a layer are decoded, used and dropped one at a time: they share a role.
_EXPERT_INDEX = re.compile(r"\bexperts\.\d+\.")


def layer_name(layer: int, suffix: str) -> str:
    """Hugging Face name of a per-layer tensor: ``layer_name(3, "mlp.up_proj.weight")``."""
    return f"model.layers.{layer}.{suffix}"


class Deferred:
    """A value built on first use: ``Model(tokenizer=Deferred(build))``."""

    def __init__(self, build: Callable[[], Any]):
        self.build = build


class _BuiltOnFirstUse:
    """A dataclass field whose value may be ``Deferred``: built (once) when first read.

    Building a tokenizer from a 49k-entry vocabulary costs ~60 ms, wasted when the token
    ids are given; an error in it surfaces where the tokenizer is first used.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = f"_{name}"

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return None  # the field's default
        value = obj.__dict__.get(self.slot)
        if isinstance(value, Deferred):
            value = value.build()
            obj.__dict__[self.slot] = value
        return value

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.slot] = value


@dataclass
class Model:
    """A loaded model. Weights are decoded per request, in Hugging Face layout."""

    path: Path
    format: str  # gguf | apr | safetensors
    config: ModelConfig
    tensors: Mapping[str, LazyTensor]
    tokenizer: Any = _BuiltOnFirstUse()  # tokenizers.Tokenizer or None (or Deferred)
    qk_permuted: bool = False  # Q/K rows stored in llama.cpp's adjacent-pair order
    metadata: dict = field(default_factory=dict)
    # Added to every RMSNorm weight in the file (Gemma GGUF: 1); removed on decode.
    norm_offset: float = 0.0
    _layer_buffers: dict | None = field(default=None, init=False, repr=False, compare=False)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def tensor(self, name: str) -> LazyTensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelLoadError(
                f"{self.path}: tensor '{name}' is missing",
                hint="the file may be truncated or not a complete Llama/Qwen checkpoint",
            ) from None

    @contextlib.contextmanager
    def layer_buffers(self) -> Iterator[None]:
        """Within: each per-layer weight decodes into one buffer per role (``mlp.up_proj.weight``
        ...), the one the previous layer's same weight used. Layers have the same shapes, so
        after the first layer no weight needs fresh pages (for a 7B model, tens of GB of page
        faults and zeroing less). Only for a caller that drops a layer's weights before it
        loads the next one, as the forward driver does."""
        self._layer_buffers = {}
        try:
            yield
        finally:
            self._layer_buffers = None

    def _buffer_for(self, name: str, tensor: LazyTensor) -> np.ndarray | None:
        buffers = self._layer_buffers
        role = _LAYER_ROLE.match(name) if buffers is not None else None
        if role is None:
            return None
        key = (_EXPERT_INDEX.sub("experts.*.", role.group(1)), tensor.n_values)
        if key not in buffers:
            buffers[key] = np.empty(tensor.n_values, dtype=np.float32)
        return buffers[key]

    def weight(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Decode ``name`` to float32 in Hugging Face layout (Q/K rows un-permuted, stored
        norm offsets removed)."""
        tensor = self.tensor(name)
        values = tensor.load(self._buffer_for(name, tensor))
        if shape is not None and tuple(values.shape) != tuple(shape):
            if values.size == int(np.prod(shape)) and len(values.shape) == 1:
                values = values.reshape(shape)
            else:
                raise ModelLoadError(
                    f"{self.path}: tensor '{name}' has shape {list(values.shape)}, "
                    f"the architecture needs {list(shape)}"
                )
        if self.qk_permuted:
            if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
                values = unpermute_llama_qk(values, self.config.num_heads)
            elif name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
                values = unpermute_llama_qk(values, self.config.num_kv_heads)
        if self.norm_offset and is_norm_weight(name):
            values = values - np.float32(self.norm_offset)
        return values

    def optional_weight(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray | None:
        return self.weight(name, shape) if name in self.tensors else None

    @property
    def lm_head_name(self) -> str:
        return "lm_head.weight" if "lm_head.weight" in self.tensors else "model.embed_tokens.weight"
