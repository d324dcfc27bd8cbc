"""Memory bounds of the forward pass and the 7B-shape benchmark's synthetic GGUF."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import numpy as np
import pytest

from aprtrace.model import LazyTensor, release_mapped_pages

PAGE = mmap.PAGESIZE


def _rss_of_mapping(mm_address: int) -> int:
    """Resident kB of the mapping starting at ``mm_address`` (from /proc/self/smaps)."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.split("-", 1)[0] == f"{mm_address:x}":
            for follow in lines[i + 1 :]:
                if follow.startswith("Rss:"):
                    return int(follow.split()[1])
    raise AssertionError("mapping not found in /proc/self/smaps")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_release_mapped_pages_drops_resident_pages_and_keeps_the_bytes(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 256, 64 * PAGE + 100, dtype=np.uint8)
    path = tmp_path / "weights.bin"
    data.tofile(path)
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    view = np.frombuffer(mm, dtype=np.uint8)
    address = view.ctypes.data
    part = view[50 : 50 + 40 * PAGE]  # not page-aligned at either end
    assert int(part.sum(dtype=np.int64)) == int(data[50 : 50 + 40 * PAGE].sum(dtype=np.int64))
    before = _rss_of_mapping(address)
    release_mapped_pages(part)
    after = _rss_of_mapping(address)
    # The 39 whole pages inside the slice are dropped; the partial pages at its ends stay.
    assert before - after == 39 * PAGE // 1024
    np.testing.assert_array_equal(view, data)  # re-read from the page cache, unchanged
    del view, part
    mm.close()


def test_release_mapped_pages_leaves_heap_and_writable_maps_alone(tmp_path: Path) -> None:
    heap = np.arange(10 * PAGE, dtype=np.uint8)
    expected = heap.copy()
    release_mapped_pages(heap[PAGE:])  # MADV_DONTNEED on heap memory would zero it
    np.testing.assert_array_equal(heap, expected)

    path = tmp_path / "w.bin"
    expected.tofile(path)
    writable = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: must not be dropped
    writable[:PAGE] = 7
    release_mapped_pages(writable[:])
    assert (writable[:PAGE] == 7).all()
    del writable


def test_lazy_tensor_load_from_a_map_is_unchanged_by_the_release(tmp_path: Path) -> None:
    values = np.random.default_rng(1).standard_normal((300, 64)).astype(np.float32)
    path = tmp_path / "t.bin"
    values.tofile(path)
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    tensor = LazyTensor("w", (300, 64), "F32", raw)
    np.testing.assert_array_equal(tensor.load(), values)
    np.testing.assert_array_equal(tensor.load(), values)  # again, after the pages were dropped
    np.testing.assert_array_equal(tensor.rows(10, 20), values[10:20])
    np.testing.assert_array_equal(tensor.take(np.array([5, 299, 5])), values[[5, 299, 5]])


def test_synthetic_7b_generator_writes_a_gguf_that_gguf_py_reads(tmp_path: Path) -> None:
    """The 7B benchmark's writer, on small shapes, checked with gguf-py's reader."""
    import gguf

    from aprtrace.formats.gguf import load_gguf

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's benchmarks/
    from benchmarks.bench_7b import _tensor_plan, synthesize

    shapes = dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=96, vocab=300,
                  rope_theta=1e6, rms_eps=1e-6, context=128)  # fmt: skip
    path = synthesize(tmp_path / "small.gguf", shapes, seed=3)
    reader = gguf.GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    plan = _tensor_plan(shapes)
    assert [t.name for t in reader.tensors] == [name for name, _, _ in plan]
    model = load_gguf(path)
    # The placeholder vocabulary llama.cpp needs: byte-level BPE with one merge.
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == shapes["vocab"]
    assert model.tokenizer.encode(" t").ids == [256]
    cfg = model.config
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads) == (
        "qwen2", 2, 64, 2,
    )  # fmt: skip
    assert cfg.qkv_bias and not cfg.tie_word_embeddings
    for name, shape, qtype in plan:
        t = by_name[name]
        assert t.tensor_type.name == qtype
        assert tuple(int(d) for d in reversed(t.shape)) == shape
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        assert np.isfinite(ref).all()
    out = by_name["output.weight"]
    ref = gguf.quants.dequantize(out.data, out.tensor_type)
    np.testing.assert_array_equal(model.tensor("lm_head.weight").load(), ref)
    assert 0.005 < float(ref.std()) < 0.05  # weights of a realistic scale
