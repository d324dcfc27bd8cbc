"""7B class: trace a synthetic GGUF with the exact tensor shapes of Qwen2.5-7B, in Q8_0.

The file (about 8 GB) is synthesized once into ``~/.cache/aprtrace/bench`` (never committed):
seeded random Q8_0 blocks (random f16 scales in a realistic range, random int8 values) are
generated and written a few MB at a time after the header, so the generator stays small in
memory. Its tokenizer is a placeholder byte-level BPE (the 256 byte symbols, one merge, filler
tokens up to the vocabulary size) so that llama.cpp loads the file (it refuses a GGUF without
``tokenizer.ggml.model``) and can requantize it (Q4_K_M); the traces use ``--tokens``.

Then ``aprtrace trace --save-tensor all`` runs on it as a subprocess, with layers ``0..1,27``
and with 1, 8 and 28 layers saved: the peak RSS must stay under 1.5 GB and must not grow with the
number of layers saved (every run computes all 28 layers anyway).

    python -m benchmarks.bench_7b            # synthesize if missing, then measure
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks import BENCH_CACHE, aprtrace_command, measure_command

# Qwen2.5-7B (config.json of Qwen/Qwen2.5-7B-Instruct).
QWEN25_7B = dict(
    layers=28,
    hidden=3584,
    heads=28,
    kv_heads=4,
    intermediate=18944,
    vocab=152064,
    rope_theta=1000000.0,
    rms_eps=1e-6,
    context=32768,
)
SEED = 7
TOKENS = "9707,11,1879,0,3555,374,220"  # 7 token ids
LAYER_SPECS = {"0..1,27": 2, "0": 1, "0..8": 8, "all": 28}
RSS_TARGET_MB = 1536  # issue 15: <= 1.5 GB, flat in the number of layers saved
Q8_0_BLOCK, Q8_0_BYTES = 32, 34
WRITE_CHUNK_BLOCKS = 1 << 17  # 4.5 MB of Q8_0 per write


def synthetic_path() -> Path:
    return BENCH_CACHE / f"qwen2.5-7b-shapes-q8_0-seed{SEED}-vocab.gguf"


def placeholder_vocabulary(size: int) -> tuple[list[str], list[str]]:
    """Tokens and merges of a byte-level BPE llama.cpp accepts: the 256 byte symbols, the
    merge ``Ġ t``, then unique fillers up to ``size``."""
    from aprtrace.tokenizer import byte_alphabet

    symbols = list(byte_alphabet().values())
    tokens = [*symbols, "Ġt"]
    tokens += [f"<|filler{i}|>" for i in range(size - len(tokens))]
    return tokens[:size], ["Ġ t"]


def _tensor_plan(s: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(GGUF name, NumPy shape [out, in], type) of every tensor, in llama.cpp's file order."""
    h, kv = s["hidden"], s["hidden"] // s["heads"] * s["kv_heads"]
    plan = [("token_embd.weight", (s["vocab"], h), "Q8_0")]
    for i in range(s["layers"]):
        b = f"blk.{i}."
        plan += [
            (b + "attn_norm.weight", (h,), "F32"),
            (b + "attn_q.weight", (h, h), "Q8_0"),
            (b + "attn_q.bias", (h,), "F32"),
            (b + "attn_k.weight", (kv, h), "Q8_0"),
            (b + "attn_k.bias", (kv,), "F32"),
            (b + "attn_v.weight", (kv, h), "Q8_0"),
            (b + "attn_v.bias", (kv,), "F32"),
            (b + "attn_output.weight", (h, h), "Q8_0"),
            (b + "ffn_norm.weight", (h,), "F32"),
            (b + "ffn_gate.weight", (s["intermediate"], h), "Q8_0"),
            (b + "ffn_up.weight", (s["intermediate"], h), "Q8_0"),
            (b + "ffn_down.weight", (h, s["intermediate"]), "Q8_0"),
        ]
    plan += [("output_norm.weight", (h,), "F32"), ("output.weight", (s["vocab"], h), "Q8_0")]
    return plan


def _nbytes(shape: tuple[int, ...], qtype: str) -> int:
    n = int(np.prod(shape))
    return n * 4 if qtype == "F32" else n // Q8_0_BLOCK * Q8_0_BYTES


def _q8_0_blocks(rng: np.random.Generator, n_blocks: int) -> np.ndarray:
    """Random Q8_0 blocks: f16 scale d in [1.5e-4, 4e-4] (weights of std ~0.02), random int8."""
    blocks = np.empty((n_blocks, Q8_0_BYTES), dtype=np.uint8)
    scales = rng.uniform(1.5e-4, 4e-4, n_blocks).astype(np.float16)
    blocks[:, :2] = scales.view(np.uint8).reshape(n_blocks, 2)
    blocks[:, 2:] = np.frombuffer(rng.bytes(n_blocks * Q8_0_BLOCK), dtype=np.uint8).reshape(
        n_blocks, Q8_0_BLOCK
    )
    return blocks


def _f32_values(rng: np.random.Generator, name: str, n: int) -> np.ndarray:
    if "norm" in name:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)
    return (0.1 * rng.standard_normal(n)).astype(np.float32)  # q/k/v biases


def synthesize(path: Path, shapes: dict = QWEN25_7B, seed: int = SEED) -> Path:
    """Write the synthetic GGUF at ``path`` tensor by tensor, a few MB at a time."""
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    plan = _tensor_plan(shapes)
    tmp = path.with_suffix(".partial")
    writer = gguf.GGUFWriter(str(tmp), "qwen2")
    writer.add_name("aprtrace synthetic Qwen2.5-7B shapes (random Q8_0)")
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_block_count(shapes["layers"])
    writer.add_context_length(shapes["context"])
    writer.add_embedding_length(shapes["hidden"])
    writer.add_feed_forward_length(shapes["intermediate"])
    writer.add_head_count(shapes["heads"])
    writer.add_head_count_kv(shapes["kv_heads"])
    writer.add_rope_freq_base(shapes["rope_theta"])
    writer.add_layer_norm_rms_eps(shapes["rms_eps"])
    tokens, merges = placeholder_vocabulary(shapes["vocab"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([int(gguf.TokenType.NORMAL)] * len(tokens))
    writer.add_token_merges(merges)
    return write_tensors(writer, plan, tmp, path, rng=np.random.default_rng(seed))


def write_tensors(writer, plan, tmp: Path, path: Path, rng, f32_values=None) -> Path:
    """Write ``plan``'s tensor infos and random data after ``writer``'s metadata, then move
    ``tmp`` to ``path``. ``f32_values(rng, name, n)`` makes the F32 tensors."""
    import gguf

    f32_values = f32_values or _f32_values
    for name, shape, qtype in plan:
        if qtype == "F32":
            writer.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(shape, qtype))
        else:
            byte_shape = (*shape[:-1], shape[-1] // Q8_0_BLOCK * Q8_0_BYTES)
            writer.add_tensor_info(
                name,
                byte_shape,
                np.dtype(np.uint8),
                _nbytes(shape, qtype),
                raw_dtype=gguf.GGMLQuantizationType.Q8_0,
            )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    # GGUFWriter.write_tensor_data wants each tensor whole (the 152064 x 3584 output matrix is
    # 579 MB); write the data section ourselves in the same layout: every tensor starts at a
    # multiple of the alignment, zero-padded.
    fout = writer.fout[0]
    alignment = writer.data_alignment
    for name, shape, qtype in plan:
        fout.write(b"\0" * (-fout.tell() % alignment))
        if qtype == "F32":
            f32_values(rng, name, int(np.prod(shape))).tofile(fout)
            continue
        n_blocks = int(np.prod(shape)) // Q8_0_BLOCK
        for start in range(0, n_blocks, WRITE_CHUNK_BLOCKS):
            _q8_0_blocks(rng, min(WRITE_CHUNK_BLOCKS, n_blocks - start)).tofile(fout)
    fout.write(b"\0" * (-fout.tell() % alignment))
    writer.close()
    tmp.replace(path)
    return path


@dataclass
class Run7B:
    layers: str
    n_saved_layers: int
    wall_s: float
    peak_rss_mb: float
    files: int
    ok: bool
    error: str = ""


def trace_once(model: Path, layers: str, out_dir: Path) -> Run7B:
    cmd = [
        *aprtrace_command(),
        "trace",
        "-q",
        "--save-tensor",
        "all",
        "--save-tensor-layers",
        layers,
        "--tokens",
        TOKENS,
        "--save-tensor-dir",
        str(out_dir),
        "--clean",
        str(model),
    ]
    m = measure_command(cmd)
    files = len(list(out_dir.rglob("*.bin"))) if out_dir.exists() else 0
    error = "" if m.returncode == 0 else (m.stderr.strip().splitlines() or ["?"])[-1][:200]
    return Run7B(
        layers, LAYER_SPECS[layers], m.wall_s, m.peak_rss_mb, files, m.returncode == 0, error
    )


def ensure_synthetic() -> Path:
    """The synthetic Q8_0 file, written first if missing (about a minute, 8.1 GB)."""
    model = synthetic_path()
    if not model.exists():
        free = shutil.disk_usage(model.parent if model.parent.exists() else Path.home()).free
        need = sum(_nbytes(s, t) for _, s, t in _tensor_plan(QWEN25_7B)) + (1 << 30)
        if free < need:
            raise RuntimeError(f"needs {need / 1e9:.1f} GB free for {model}, {free / 1e9:.1f} GB")
        start = time.perf_counter()
        synthesize(model)
        print(f"synthesized {model} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return model


LLAMA_FTYPE_MOSTLY_Q4_K_M = 15  # llama.h


def q4_k_m_path() -> Path:
    return synthetic_path().with_name(synthetic_path().stem + "-requant-q4_k_m.gguf")


def ensure_q4_k_m() -> Path | None:
    """The same model requantized to Q4_K_M by llama.cpp (cyllama's ``model_quantize``), so
    the file holds real K-quant blocks (Q4_K, Q6_K) as llama.cpp writes them. None when
    cyllama is not installed."""
    target = q4_k_m_path()
    partial = target.with_suffix(".partial")
    # Another process of ours is writing it (a 7B requantization takes minutes): wait.
    while not target.exists() and partial.exists() and time.time() - partial.stat().st_mtime < 120:
        time.sleep(5)
    if target.exists():
        return target
    try:
        from cyllama.llama import llama_cpp as cy
    except ImportError:
        return None
    source = ensure_synthetic()
    cy.llama_backend_init()
    params = cy.LlamaModelQuantizeParams()
    params.ftype = LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.allow_requantize = True
    params.nthread = 2
    start = time.perf_counter()
    cy.model_quantize(str(source), str(partial), params)
    partial.replace(target)
    print(f"requantized {target} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return target


def run(quick: bool = False, specs: list[str] | None = None) -> list[Run7B]:
    """Synthesize the model if needed, then trace it once per layer spec."""
    model = ensure_synthetic()
    specs = specs or (["0..1,27"] if quick else list(LAYER_SPECS))
    results = []
    with tempfile.TemporaryDirectory(prefix="aprtrace-7b-") as tmp:
        for spec in specs:
            results.append(trace_once(model, spec, Path(tmp) / "dump"))
    return results


def main() -> int:
    results = run(quick="--quick" in sys.argv)
    for r in results:
        print(json.dumps(asdict(r)))
    return 0 if all(r.ok and r.peak_rss_mb <= RSS_TARGET_MB for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
