"""Peers of ``aprtrace trace``: Hugging Face transformers and llama.cpp on the same GGUF.

- transformers: ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)`` (gguf-py reads and
  dequantizes the file), then one forward pass of the same prompt with forward hooks copying
  the same stages out as NumPy arrays (eager attention with ``output_attentions`` for the
  softmax). About ten minutes here, so the figures are cached in ``~/.cache/aprtrace/bench``,
  keyed by the file's sha256 and the transformers version; ``--quick`` reuses them.
- llama.cpp through ``cyllama`` (a PyPI wheel with a prebuilt binding): load + evaluation of
  the same token ids. Optional: when it is not installed or fails, the reason is reported.

Each peer runs in its own subprocess so its wall time and peak RSS are measured alone.
Neither peer is a dependency of aprtrace.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks import BENCH_CACHE, DEFAULT_PROMPT, measure_command, python_env


@dataclass
class PeerResult:
    """One peer's figures, or why there are none (``reason``)."""

    name: str
    wall_s: float | None = None
    peak_rss_mb: float | None = None
    cpu_s: float | None = None
    detail: str = ""
    source: str = "measured"  # measured | cached <date> | skipped
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.wall_s is not None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _cache_path(peer: str, sha256: str, version: str, prompt: str) -> Path:
    prompt_key = hashlib.sha256(prompt.encode()).hexdigest()[:12]
    return BENCH_CACHE / f"{peer}-{sha256[:16]}-{version}-{prompt_key}.json"


def _run_child(peer: str, gguf: Path, prompt: str) -> tuple[PeerResult, dict]:
    cmd = [sys.executable, "-m", "benchmarks.peers", peer, str(gguf), prompt]
    m = measure_command(cmd, env=python_env())
    if m.returncode != 0:
        tail = (m.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return PeerResult(peer, source="failed", reason=f"exit {m.returncode}: {tail}"), {}
    info = json.loads(m.stdout.strip().splitlines()[-1])
    result = PeerResult(peer, m.wall_s, m.peak_rss_mb, m.cpu_s, info.get("detail", ""))
    return result, info


def transformers_peer(gguf: Path, prompt: str = DEFAULT_PROMPT, quick: bool = True) -> PeerResult:
    """transformers load + hooked forward of ``gguf``; cached, measured again unless ``quick``."""
    name = "transformers"
    version = _package_version("transformers")
    if version is None or _package_version("torch") is None:
        return PeerResult(name, source="skipped", reason="transformers/torch not installed")
    cache = _cache_path(name, file_sha256(gguf), version, prompt)
    if cache.exists():
        data = json.loads(cache.read_text())
        if quick:
            return PeerResult(
                name,
                data["wall_s"],
                data["peak_rss_mb"],
                data.get("cpu_s"),
                data["detail"],
                source=f"cached {data['measured_at']}",
            )
    elif quick:
        return PeerResult(
            name,
            source="skipped",
            reason="--quick and no cached figure (run `python -m benchmarks --full` once, ~10 min)",
        )
    result, _ = _run_child(name, gguf, prompt)
    if result.ok:
        result.detail += f"; transformers {version}"
        BENCH_CACHE.mkdir(parents=True, exist_ok=True)
        record = asdict(result) | {"measured_at": time.strftime("%Y-%m-%d %H:%M")}
        cache.write_text(json.dumps(record, indent=1))
    return result


def llamacpp_peer(gguf: Path, prompt: str = DEFAULT_PROMPT) -> PeerResult:
    """llama.cpp (``cyllama``) load + evaluation of the same prompt; a few seconds."""
    name = "llama.cpp (cyllama)"
    if _package_version("cyllama") is None:
        return PeerResult(
            name, source="skipped", reason="cyllama not installed (`pip install cyllama`)"
        )
    result, _ = _run_child("cyllama", gguf, prompt)
    result.name = name
    if result.ok:
        result.detail += f"; cyllama {_package_version('cyllama')}"
    return result


# --------------------------------------------------------------------------------------------
# Child processes (``python -m benchmarks.peers PEER GGUF PROMPT``): print one JSON line.


def _transformers_child(gguf: Path, prompt: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    load_s = time.perf_counter() - start

    captured: list = []

    def keep(_module, _inputs, output) -> None:
        value = output[0] if isinstance(output, tuple) else output
        captured.append(value.detach().float().numpy().copy())

    def keep_input(_module, inputs) -> None:
        captured.append(inputs[0].detach().float().numpy().copy())

    base = model.model
    handles = [base.embed_tokens.register_forward_hook(keep), base.norm.register_forward_hook(keep)]
    for layer in base.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for module in (
            layer.input_layernorm,
            attn.q_proj,
            attn.k_proj,
            attn.v_proj,
            attn.o_proj,
            layer.post_attention_layernorm,
            mlp.gate_proj,
            mlp.up_proj,
            mlp.act_fn,
            mlp.down_proj,
            layer,
        ):
            handles.append(module.register_forward_hook(keep))
        for module in (attn.o_proj, layer.post_attention_layernorm, mlp.down_proj):
            handles.append(module.register_forward_pre_hook(keep_input))

    start = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=False, output_attentions=True)
    captured.extend(a[0].float().numpy().copy() for a in out.attentions)
    captured.append(out.logits[0, -1].float().numpy().copy())
    forward_s = time.perf_counter() - start
    for h in handles:
        h.remove()
    return {
        "load_s": load_s,
        "forward_s": forward_s,
        "detail": f"load {load_s:.1f} s + hooked forward {forward_s:.2f} s, "
        f"{len(captured)} arrays captured, {len(ids)} tokens",
    }


def _cyllama_child(gguf: Path, prompt: str, ids: list[int] | None = None) -> dict:
    """Load the model with llama.cpp, tokenize the prompt (or take ``ids``), evaluate it in
    one prefill on two threads and read the logits of the last position."""
    import numpy as np
    from cyllama.llama import llama_cpp as cy

    class ModelWithVocab(cy.LlamaModel):
        # LlamaContext.get_logits reads model.n_vocab, which LlamaModel (cyllama 0.2.18) lacks.
        @property
        def n_vocab(self) -> int:
            return self.get_vocab().n_vocab

    start = time.perf_counter()
    cy.llama_backend_init()
    model = ModelWithVocab(str(gguf), cy.LlamaModelParams())
    vocab = model.get_vocab()
    if ids is None:
        ids = vocab.tokenize(prompt, add_special=False, parse_special=False)
    ctx_params = cy.LlamaContextParams()
    ctx_params.n_ctx = max(64, len(ids))
    ctx_params.n_batch = max(64, len(ids))  # one prefill call (split in ubatches inside)
    ctx_params.n_threads = ctx_params.n_threads_batch = 2
    ctx = cy.LlamaContext(model, ctx_params)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    batch = cy.llama_batch_get_one(ids)
    ctx.decode(batch)
    logits = np.asarray(ctx.get_logits())
    eval_s = time.perf_counter() - start
    return {
        "load_s": load_s,
        "forward_s": eval_s,
        "detail": f"load {load_s:.2f} s + eval {eval_s:.3f} s, {len(ids)} tokens, "
        f"argmax {int(np.argmax(logits[-vocab.n_vocab :]))}, no stage capture",
    }


def llamacpp_ids_command(gguf: Path, ids: list[int]) -> list[str]:
    """The child command evaluating ``ids`` with llama.cpp (for side-by-side timing)."""
    return [sys.executable, "-m", "benchmarks.peers", "cyllama-ids", str(gguf), _ids_text(ids)]


def _ids_text(ids: list[int]) -> str:
    return ",".join(map(str, ids))


def main(argv: list[str]) -> int:
    peer, gguf, prompt = argv[0], Path(argv[1]), argv[2]
    if peer == "cyllama-ids":
        print(json.dumps(_cyllama_child(gguf, "", [int(t) for t in prompt.split(",")])))
        return 0
    child = {"transformers": _transformers_child, "cyllama": _cyllama_child}[peer]
    print(json.dumps(child(gguf, prompt)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
