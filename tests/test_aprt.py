"""APRT stage-tensor files (FORMATS.md section 1), checked against hand-written bytes."""

from __future__ import annotations

import builtins
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aprtrace import atomic
from aprtrace.aprt import HEADER_SIZE, read_aprt, write_aprt
from aprtrace.errors import InvalidFormatError, NotFoundError, OutputError

WHOLE = 0xFFFFFFFF


def f32_from_bits(*bits: int) -> np.ndarray:
    return np.array(bits, dtype=np.uint32).view(np.float32)


def reference_aprt(layer: int, bits: list[int]) -> bytes:
    """An independent writer built from FORMATS.md's byte table (magic, u32 LE x2, f32 LE)."""
    return struct.pack("<4sII", b"APRT", layer, len(bits)) + struct.pack(f"<{len(bits)}I", *bits)


# --- writing: exact bytes --------------------------------------------------------------------


def test_header_and_body_bytes_match_hand_written(tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    size = write_aprt(path, 3, np.array([1.0, -2.0], dtype=np.float32))
    expected = (
        b"APRT"  # magic 41 50 52 54
        b"\x03\x00\x00\x00"  # layer 3, u32 LE
        b"\x02\x00\x00\x00"  # dim_product 2, u32 LE
        b"\x00\x00\x80\x3f"  # 1.0f  = 0x3F800000
        b"\x00\x00\x00\xc0"  # -2.0f = 0xC0000000
    )
    assert path.read_bytes() == expected
    assert size == len(expected) == 20


def test_layer_field_is_little_endian_u32(tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    write_aprt(path, 0x01020304, np.zeros(1, dtype=np.float32))
    assert path.read_bytes()[4:12] == b"\x04\x03\x02\x01\x01\x00\x00\x00"


def test_nan_payload_preserved(tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    values = f32_from_bits(0x7FC00000, 0x7FC00001, 0xFFC00000, 0x7FBFFFFF)
    write_aprt(path, 0, values)
    assert path.read_bytes()[HEADER_SIZE:] == (
        b"\x00\x00\xc0\x7f"  # canonical quiet NaN 0x7FC00000
        b"\x01\x00\xc0\x7f"  # NaN with payload 0x7FC00001
        b"\x00\x00\xc0\xff"  # negative NaN 0xFFC00000
        b"\xff\xff\xbf\x7f"  # signalling NaN 0x7FBFFFFF, not quieted
    )


def test_negative_zero_and_infinities_preserved(tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    write_aprt(path, 0, np.array([-0.0, np.inf, -np.inf, 0.0], dtype=np.float32))
    assert path.read_bytes()[HEADER_SIZE:] == (
        b"\x00\x00\x00\x80"  # -0.0 = 0x80000000
        b"\x00\x00\x80\x7f"  # +Inf = 0x7F800000
        b"\x00\x00\x80\xff"  # -Inf = 0xFF800000
        b"\x00\x00\x00\x00"  # +0.0
    )


def test_empty_tensor_is_a_12_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    size = write_aprt(path, 0, np.zeros(0, dtype=np.float32))
    assert path.read_bytes() == b"APRT" + b"\x00" * 8
    assert size == 12
    got = read_aprt(path)
    assert got.layer == 0 and got.values.shape == (0,) and got.values.dtype == np.float32


def test_whole_model_layer_header(tmp_path: Path) -> None:
    path = tmp_path / "lm_head.bin"
    write_aprt(path, WHOLE, np.array([0.5], dtype=np.float32))
    assert path.read_bytes() == b"APRT\xff\xff\xff\xff\x01\x00\x00\x00\x00\x00\x00\x3f"
    got = read_aprt(path)
    assert got.whole_model and got.layer_label == "whole-model"


def test_two_d_input_is_flattened_row_major(tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    # Fortran-ordered memory must still be written token-major (row-major) as [seq, dim].
    values = np.asfortranarray(np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32))
    write_aprt(path, 0, values)
    assert path.read_bytes() == reference_aprt(0, [0x3F800000, 0x40000000, 0x40400000, 0x40800000])


def test_big_endian_and_float64_input_written_as_f32_le(tmp_path: Path) -> None:
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    write_aprt(a, 1, np.array([1.0, -2.0], dtype=">f4"))
    write_aprt(b, 1, np.array([1.0, -2.0], dtype=np.float64))
    assert a.read_bytes() == b.read_bytes() == reference_aprt(1, [0x3F800000, 0xC0000000])


def test_same_values_give_identical_bytes(tmp_path: Path) -> None:
    values = np.random.default_rng(0).standard_normal(257).astype(np.float32)
    write_aprt(tmp_path / "a.bin", 2, values)
    write_aprt(tmp_path / "b.bin", 2, values.copy())
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()


@pytest.mark.parametrize("layer", [-1, WHOLE + 1])
def test_layer_outside_u32_rejected_without_a_file(tmp_path: Path, layer: int) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        write_aprt(tmp_path / "t.bin", layer, np.zeros(1, dtype=np.float32))
    assert list(tmp_path.iterdir()) == []


def test_write_creates_missing_parent_directories(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "layer-7" / "attn_out.bin"
    write_aprt(path, 7, np.ones(3, dtype=np.float32))
    assert read_aprt(path).layer == 7


def test_write_overwrites_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    path.write_bytes(b"old content that is longer than the new file")
    write_aprt(path, 0, np.zeros(0, dtype=np.float32))
    assert path.read_bytes() == b"APRT" + b"\x00" * 8


# --- reading ---------------------------------------------------------------------------------


def test_reads_file_from_reference_writer(tmp_path: Path) -> None:
    bits = [0x3F800000, 0x7FC00001, 0x80000000, 0xFF800000, 0x00000001]
    path = tmp_path / "ref.bin"
    path.write_bytes(reference_aprt(5, bits))
    got = read_aprt(path)
    assert got.layer == 5
    assert got.path == path
    assert got.values.dtype == np.float32
    assert got.values.view(np.uint32).tolist() == bits


def test_trailing_bytes_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    path.write_bytes(reference_aprt(1, [0x40000000]) + b"trailing junk")
    got = read_aprt(path)
    assert got.values.tolist() == [2.0]


@pytest.mark.parametrize("size", [0, 1, 4, 11])
def test_truncated_header_is_invalid_format(tmp_path: Path, size: int) -> None:
    path = tmp_path / "t.bin"
    path.write_bytes(b"APRT\x00\x00\x00\x00\x00\x00\x00\x00"[:size])
    with pytest.raises(InvalidFormatError, match="truncated") as info:
        read_aprt(path)
    assert info.value.exit_code == 4
    assert str(path) in str(info.value)


def test_wrong_magic_is_invalid_format(tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    path.write_bytes(b"GGUF" + struct.pack("<II", 0, 1) + b"\x00" * 4)
    with pytest.raises(InvalidFormatError, match="bad magic") as info:
        read_aprt(path)
    assert info.value.exit_code == 4


def test_body_shorter_than_header_count_is_invalid_format(tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    path.write_bytes(reference_aprt(0, [1, 2, 3])[:-1])
    with pytest.raises(InvalidFormatError, match="truncated APRT body") as info:
        read_aprt(path)
    assert info.value.exit_code == 4


def test_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError) as info:
        read_aprt(tmp_path / "nope.bin")
    assert info.value.exit_code == 3


def test_directory_is_invalid_format(tmp_path: Path) -> None:
    with pytest.raises(InvalidFormatError):
        read_aprt(tmp_path)


def test_large_file_is_memory_mapped(tmp_path: Path) -> None:
    n = (1 << 20) // 4  # a 1 MiB body
    values = np.arange(n, dtype=np.float32)
    path = tmp_path / "big.bin"
    write_aprt(path, 0, values)
    got = read_aprt(path)
    assert isinstance(got.values, np.memmap)
    assert not got.values.flags.writeable
    assert got.values.shape == (n,)
    assert np.array_equal(got.values, values)


def test_small_file_is_read_into_memory(tmp_path: Path) -> None:
    path = tmp_path / "small.bin"
    write_aprt(path, 0, np.array([1.0, 2.0], dtype=np.float32))
    got = read_aprt(path)
    assert not isinstance(got.values, np.memmap)
    assert not got.values.flags.writeable
    assert got.values.tolist() == [1.0, 2.0]


def test_mmap_can_be_forced_either_way(tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    path.write_bytes(reference_aprt(0, [0x7FC00001, 0x3F800000]) + b"xx")
    mapped = read_aprt(path, mmap=True)
    plain = read_aprt(path, mmap=False)
    assert isinstance(mapped.values, np.memmap)
    assert not isinstance(plain.values, np.memmap)
    assert mapped.values.view(np.uint32).tolist() == [0x7FC00001, 0x3F800000]
    assert plain.values.view(np.uint32).tolist() == [0x7FC00001, 0x3F800000]


def test_empty_tensor_values_are_read_only(tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    path.write_bytes(reference_aprt(0, []))
    assert not read_aprt(path).values.flags.writeable


# --- atomic writes ---------------------------------------------------------------------------


class _FailingFile:
    """Wraps a real file; the second write (the body) raises ``exc`` after half the data."""

    def __init__(self, real, exc: BaseException, seen: list[list[str]]):
        self._real, self._exc, self._writes, self._seen = real, exc, 0, seen

    def write(self, data: bytes) -> int:
        self._writes += 1
        if self._writes == 2:
            self._real.write(data[: len(data) // 2])
            self._real.flush()
            self._seen.append(sorted(p.name for p in Path(self._real.name).parent.iterdir()))
            raise self._exc
        return self._real.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self._real.close()


def _patch_open_to_fail(monkeypatch, exc: BaseException) -> list[list[str]]:
    seen: list[list[str]] = []
    real_open = builtins.open

    def failing_open(file, mode="r", *args, **kwargs):
        return _FailingFile(real_open(file, mode, *args, **kwargs), exc, seen)

    # write_aprt writes through aprtrace.atomic (the shared temp-file-and-rename helper).
    monkeypatch.setattr(atomic, "open", failing_open, raising=False)
    return seen


def test_failed_write_leaves_no_partial_file(tmp_path: Path, monkeypatch) -> None:
    seen = _patch_open_to_fail(monkeypatch, OSError(28, "No space left on device"))
    path = tmp_path / "t.bin"
    with pytest.raises(OutputError, match="No space left") as info:
        write_aprt(path, 0, np.ones(64, dtype=np.float32))
    assert info.value.exit_code == 7
    # Mid-write, only a temporary (hidden) name existed, never the final one.
    assert len(seen) == 1 and "t.bin" not in seen[0] and len(seen[0]) == 1
    assert seen[0][0].startswith(".t.bin.")
    # Afterwards: no final file and no temporary left behind.
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_existing_file_untouched(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "t.bin"
    old = reference_aprt(9, [0x3F800000])
    path.write_bytes(old)
    _patch_open_to_fail(monkeypatch, OSError(5, "Input/output error"))
    with pytest.raises(OutputError):
        write_aprt(path, 0, np.ones(64, dtype=np.float32))
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["t.bin"]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_interrupted_write_removes_temp_file(tmp_path: Path, monkeypatch, exc) -> None:
    path = tmp_path / "t.bin"
    path.write_bytes(b"previous")
    _patch_open_to_fail(monkeypatch, exc)
    with pytest.raises(type(exc)):
        write_aprt(path, 0, np.ones(64, dtype=np.float32))
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["t.bin"]


def test_failed_rename_keeps_existing_file_and_cleans_up(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "t.bin"
    path.write_bytes(b"previous")

    def failing_replace(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OutputError, match="Permission denied"):
        write_aprt(path, 0, np.ones(4, dtype=np.float32))
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["t.bin"]


def test_values_that_cannot_be_converted_write_nothing(tmp_path: Path) -> None:
    class Broken:
        def __array__(self, *args, **kwargs):
            raise RuntimeError("cannot materialise")

    path = tmp_path / "t.bin"
    with pytest.raises(RuntimeError, match="cannot materialise"):
        write_aprt(path, 0, Broken())
    assert list(tmp_path.iterdir()) == []


def test_parent_that_is_a_file_is_output_error(tmp_path: Path) -> None:
    blocker = tmp_path / "dump"
    blocker.write_bytes(b"")
    with pytest.raises(OutputError) as info:
        write_aprt(blocker / "layer-0" / "embedding.bin", 0, np.ones(1, dtype=np.float32))
    assert info.value.exit_code == 7


# --- properties ------------------------------------------------------------------------------

_u32 = st.integers(min_value=0, max_value=0xFFFFFFFF)


@settings(max_examples=200, deadline=None)
@given(layer=_u32, bits=st.lists(_u32, max_size=64))
def test_round_trip_is_bit_exact_for_any_f32_pattern(tmp_path_factory, layer, bits) -> None:
    path = tmp_path_factory.mktemp("rt") / "t.bin"
    size = write_aprt(path, layer, np.array(bits, dtype=np.uint32).view(np.float32))
    assert path.read_bytes() == reference_aprt(layer, bits)
    assert size == 12 + 4 * len(bits)
    for mmap in (True, False):
        got = read_aprt(path, mmap=mmap)
        assert got.layer == layer
        assert got.values.view(np.uint32).tolist() == bits


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=40))
def test_reader_rejects_garbage_only_with_invalid_format(tmp_path_factory, data) -> None:
    path = tmp_path_factory.mktemp("junk") / "t.bin"
    path.write_bytes(data)
    try:
        got = read_aprt(path)
    except InvalidFormatError:
        return
    # Accepted files must really be APRT with a complete body.
    assert data[:4] == b"APRT"
    assert len(data) >= 12 + 4 * got.values.size
