"""Fuzz targets: one function per parser that takes raw bytes and must either succeed or
raise an :class:`aprtrace.errors.AprtraceError`. Anything else escaping is a bug.

Model targets go past parsing: a file that loads has every tensor decoded, its tokenizer
exercised and one forward pass run, so a corrupt weight reaches the dequantizers and the
NumPy transformer too.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fuzz import seeds
from fuzz.mutate import hostile_json_text, json_bytes, mutate, mutate_json_doc

_counter = itertools.count()


@dataclass(frozen=True)
class Target:
    """A parser under test: its valid seeds and the function that runs one input."""

    name: str
    seeds: tuple[bytes, ...]
    run: Callable[[bytes, Path], None]
    json_doc: bool = False  # seeds are JSON documents (also mutated structurally)

    def generate(self, seed: bytes, ops: list, structural: bool) -> bytes:
        """The input for ``ops`` applied to ``seed`` (JSON-structurally when asked; a quarter
        of those are text-level JSON bombs: deep nesting, numbers too long or too large)."""
        if structural and self.json_doc:
            if ops[0][1] % 4 == 0:
                return hostile_json_text(seed, ops)
            return json_bytes(mutate_json_doc(json.loads(seed), ops))
        return mutate(seed, ops)


def _fresh(workdir: Path, suffix: str) -> Path:
    # A new name per input: a file still memory-mapped by an earlier input is never rewritten.
    return workdir / f"in-{os.getpid()}-{next(_counter)}{suffix}"


def _exercise_model(model) -> None:
    """Decode every tensor, tokenize, and run one forward pass of a loaded model."""
    from aprtrace.forward import forward

    for tensor in model.tensors.values():
        tensor.load()
    if model.tokenizer is not None:
        from aprtrace.trace import encode_prompt

        ids = encode_prompt(model, "What is 2+2?", add_bos=False)  # as `trace` encodes
        model.tokenizer.decode(ids)
    forward(model, [0, 1, 2][: max(1, min(3, model.config.max_position_embeddings))])


def run_gguf(data: bytes, workdir: Path) -> None:
    from aprtrace.formats import load_model

    path = _fresh(workdir, ".gguf")
    path.write_bytes(data)
    try:
        _exercise_model(load_model(path))
    finally:
        path.unlink()


def run_apr(data: bytes, workdir: Path) -> None:
    from aprtrace.errors import AprtraceError
    from aprtrace.formats import load_model
    from aprtrace.formats.apr import read_apr

    path = _fresh(workdir, ".apr")
    path.write_bytes(data)
    try:
        try:
            read_apr(path, verify=True)
        except AprtraceError:
            pass
        # Without CRC checks the mutation reaches the metadata, index and tensor data.
        _exercise_model(load_model(path, verify=False))
    finally:
        path.unlink()


def run_aprt(data: bytes, workdir: Path) -> None:
    from aprtrace.aprt import read_aprt
    from aprtrace.stages import Stage
    from aprtrace.trace import stage_stats

    path = _fresh(workdir, ".bin")
    path.write_bytes(data)
    try:
        for mmap in (False, True):
            f = read_aprt(path, mmap=mmap)
            stage_stats(Stage.ATTN_NORM, f.layer, f.values)
            del f
    finally:
        path.unlink()


_HF_CONFIG: dict[str, bytes] = {}


def _hf_dir(workdir: Path, weights: bytes, config: bytes) -> Path:
    directory = _fresh(workdir, "-hf")
    directory.mkdir()
    (directory / "config.json").write_bytes(config)
    (directory / "model.safetensors").write_bytes(weights)
    return directory


def _hf_seed_parts() -> tuple[bytes, bytes]:
    if not _HF_CONFIG:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            d = seeds.write_tiny_safetensors(Path(tmp) / "m")
            _HF_CONFIG["config"] = (d / "config.json").read_bytes()
            _HF_CONFIG["weights"] = (d / "model.safetensors").read_bytes()
    return _HF_CONFIG["weights"], _HF_CONFIG["config"]


def _run_hf(directory: Path) -> None:
    import shutil

    from aprtrace.formats import load_model

    try:
        _exercise_model(load_model(directory))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def run_safetensors(data: bytes, workdir: Path) -> None:
    _, config = _hf_seed_parts()
    _run_hf(_hf_dir(workdir, data, config))


def run_hf_config(data: bytes, workdir: Path) -> None:
    weights, _ = _hf_seed_parts()
    _run_hf(_hf_dir(workdir, weights, data))


def run_manifest(data: bytes, workdir: Path) -> None:
    from aprtrace.manifest import read_manifest

    directory = _fresh(workdir, "-dump")
    directory.mkdir()
    try:
        (directory / "manifest.json").write_bytes(data)
        read_manifest(directory)
    finally:
        (directory / "manifest.json").unlink()
        directory.rmdir()


def run_json_reader(data: bytes, workdir: Path) -> None:
    """The shared bounded JSON reader every JSON file goes through."""
    from aprtrace.safeio import read_json_file

    path = _fresh(workdir, ".json")
    path.write_bytes(data)
    try:
        read_json_file(path, 1 << 20)
    finally:
        path.unlink()


def run_safetensors_index(data: bytes, workdir: Path) -> None:
    """A sharded checkpoint whose ``model.safetensors.index.json`` is ``data``."""
    weights, config = _hf_seed_parts()
    directory = _hf_dir(workdir, weights, config)
    (directory / "model.safetensors").rename(directory / "model-00001-of-00001.safetensors")
    (directory / "model.safetensors.index.json").write_bytes(data)
    _run_hf(directory)


def run_tokenizer_json(data: bytes, workdir: Path) -> None:
    """A Hugging Face directory whose ``tokenizer.json`` is ``data`` (loaded and used)."""
    weights, config = _hf_seed_parts()
    directory = _hf_dir(workdir, weights, config)
    (directory / "tokenizer.json").write_bytes(data)
    _run_hf(directory)


def run_apr_metadata(data: bytes, workdir: Path) -> None:
    """The tiny APR model with its metadata JSON replaced by ``data`` (read without CRCs)."""
    from aprtrace.formats import load_model

    path = _fresh(workdir, ".apr")
    path.write_bytes(apr_with_metadata(_APR_SEED[0], data))
    try:
        _exercise_model(load_model(path, verify=False))
    finally:
        path.unlink()


_APR_SEED: list[bytes] = []
_APR_HEADER = struct.Struct("<4sBBHIQIQQI20s")


def apr_with_metadata(apr: bytes, metadata: bytes) -> bytes:
    """``apr`` (a valid APR v2 file) with ``metadata`` in place of its metadata JSON; the
    index and data sections move with it, the CRCs are left stale."""
    magic, major, minor, flags, count, _, meta_size, index_off, data_off, crc, rsv = (
        _APR_HEADER.unpack_from(apr)
    )
    index, body = apr[index_off:data_off], apr[data_off:-4]
    pad = -len(metadata) % 64
    new_index_off = 64 + len(metadata) + pad
    new_data_off = new_index_off + len(index)
    header = _APR_HEADER.pack(
        magic, major, minor, flags, count, 64, len(metadata), new_index_off, new_data_off, crc, rsv
    )
    return header + metadata + b"\0" * pad + index + body + b"\0\0\0\0"


def apr_metadata_seed(apr: bytes) -> bytes:
    (meta_size,) = struct.unpack_from("<I", apr, 20)
    return apr[64 : 64 + meta_size]


def tokenizer_json_seed() -> bytes:
    from aprtrace.tokenizer import tokenizer_from_gguf_metadata

    meta = json.loads(seeds.tokenizer_metadata_seed())
    return tokenizer_from_gguf_metadata(meta, where="seed").to_str().encode()


def index_seed() -> bytes:
    weights, _ = _hf_seed_parts()
    (header_len,) = struct.unpack_from("<Q", weights)
    names = [k for k in json.loads(weights[8 : 8 + header_len]) if k != "__metadata__"]
    shard = "model-00001-of-00001.safetensors"
    doc = {"metadata": {"total_size": len(weights)}, "weight_map": dict.fromkeys(names, shard)}
    return json.dumps(doc, indent=1).encode()


def run_tokenizer(data: bytes, workdir: Path) -> None:
    """GGUF tokenizer metadata (JSON-encoded here) -> tokenizer -> encode/decode."""
    from aprtrace.tokenizer import tokenizer_from_gguf_metadata

    try:
        meta = json.loads(data)
    except (ValueError, RecursionError):
        return  # not a metadata mapping at all: GGUF's own parser never produces that
    if not isinstance(meta, dict):
        return
    tok = tokenizer_from_gguf_metadata(meta, where="fuzz")
    if tok is not None:
        tok.decode(tok.encode("What is 2+2? héllo", add_special_tokens=False).ids)


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def run_spec_stages(data: bytes, workdir: Path) -> None:
    from aprtrace.stages import parse_stage_list

    parse_stage_list(_text(data))


def run_spec_layers(data: bytes, workdir: Path) -> None:
    from aprtrace.plan import parse_layers

    parse_layers(_text(data)).resolve(16)


def run_spec_tokens(data: bytes, workdir: Path) -> None:
    from aprtrace.trace import parse_token_list

    parse_token_list(_text(data))


def run_spec_tol(data: bytes, workdir: Path) -> None:
    from aprtrace.diff import parse_tol_override

    parse_tol_override(_text(data)).matches("ffn_gate", "layer-3/ffn_gate")


def build_targets(workdir: Path) -> dict[str, Target]:
    """Every target with its seeds (built in ``workdir``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    gguf_f32 = seeds.write_tiny_gguf(workdir / "seed-f32.gguf").read_bytes()
    gguf_f16 = seeds.write_tiny_gguf(workdir / "seed-f16.gguf", qtype="F16").read_bytes()
    apr = seeds.write_tiny_apr(workdir / "seed.apr").read_bytes()
    weights, config = _hf_seed_parts()
    _APR_SEED[:] = [apr]
    json_seeds = (config, seeds.manifest_seed(), index_seed(), apr_metadata_seed(apr))
    specs = seeds.CLI_SPEC_SEEDS
    targets = [
        Target("gguf", (gguf_f32, gguf_f16), run_gguf),
        Target("apr", (apr,), run_apr),
        Target("aprt", (seeds.aprt_seed(),), run_aprt),
        Target("safetensors", (weights,), run_safetensors),
        Target("hf_config", (config,), run_hf_config, json_doc=True),
        Target("manifest", (seeds.manifest_seed(),), run_manifest, json_doc=True),
        Target("tokenizer", (seeds.tokenizer_metadata_seed(),), run_tokenizer, json_doc=True),
        Target("json_reader", json_seeds, run_json_reader, json_doc=True),
        Target("safetensors_index", (index_seed(),), run_safetensors_index, json_doc=True),
        Target("tokenizer_json", (tokenizer_json_seed(),), run_tokenizer_json, json_doc=True),
        Target("apr_metadata", (apr_metadata_seed(apr),), run_apr_metadata, json_doc=True),
        Target("spec_stages", tuple(specs["stages"]), run_spec_stages),
        Target("spec_layers", tuple(specs["layers"]), run_spec_layers),
        Target("spec_tokens", tuple(specs["tokens"]), run_spec_tokens),
        Target("spec_tol", tuple(specs["tol"]), run_spec_tol),
    ]
    return {t.name: t for t in targets}
