"""llama.cpp as a third engine for ``aprtrace trace``: its own intermediate tensors, same layout.

``LlamaCppEngine()(model, token_ids, emit, progress)`` has the contract of
``aprtrace.forward.forward``. llama.cpp (the ``cyllama`` wheel, extra ``aprtrace[llamacpp]``)
runs in a child process (``aprtrace.engines.llamacpp_child``) that streams the graph nodes
llama.cpp computes; this module maps them to stages (``ARCHITECTURES``), converts them to the
APRT layouts and emits them, so every file is written here through the capture gate: a
crashed or killed child leaves complete files and no manifest, never a partial file.

What the mapping does to llama.cpp's values (all recorded in the manifest):
- llama Q/K columns are un-permuted from llama.cpp's adjacent-pair RoPE order back to the
  Hugging Face layout (``qkv_matmul``, ``qkv_bias``, ``q_post_rope``, ``k_post_rope``);
- ``kq-N`` holds unscaled q.k over the padded KV cache: the key axis is cut to the prompt,
  multiplied by the attention scale (1/sqrt(head_dim); llama.cpp applies it inside the
  softmax) and the masked entries set to 0, as FORMATS.md stores them;
- ``result_output`` holds every position's logits; ``lm_head`` is the last row.
Stages llama.cpp does not compute (``ffn_silu`` of a gated MLP: its SwiGLU is one fused op;
StarCoder2's and GPT-2's GELU is its own node, captured) are not written; the manifest lists
them under ``not_captured``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

from aprtrace.arch import ops
from aprtrace.config import ModelConfig
from aprtrace.errors import InferenceError, ModelLoadError, ValidationError
from aprtrace.forward import Emit, Progress, check_token_ids
from aprtrace.model import Model, unpermute_llama_qk
from aprtrace.stages import Stage, computes, stages_for

CHILD_MODULE = "aprtrace.engines.llamacpp_child"
CYLLAMA_PIN = "cyllama==0.2.18"
MISSING_EXTRA_HINT = f"pip install -e '.[llamacpp]'  (installs {CYLLAMA_PIN})"
# llama.cpp threads in the child (results do not depend on it: ggml splits rows, not sums).
DEFAULT_THREADS = 2
STDERR_TAIL = 2000


# --------------------------------------------------------------------------------------------
# Node name -> stage, per architecture


@dataclass(frozen=True)
class Source:
    """Where a stage's values are in llama.cpp's graph.

    ``nodes``: base node names (``Qcur`` for ``Qcur-3``), concatenated along the last axis;
    ``pick``: which occurrence of a repeated name: ``first`` / ``second`` of the token-major
    ``[seq, dim]`` ones (``Qcur`` is set after the matmul, the bias add, the reshape and the
    RoPE), ``last`` of all, ``#i`` the i-th of all (from 0); ``follows``: the value is the
    unnamed node computed ``follows`` nodes after the named one (the output projection, where
    an architecture's builder names none: 1; Phi-3's unnamed residual add after it: 2);
    ``input``: the value is the named node's input ``input`` steps back (its ``src[0]``,
    repeated: Phi-3's unnamed attention residual is the input of the norm under ``ffn_norm``);
    ``half``: the first (0) or second (1) half of the last axis (Phi-3's fused gate|up).
    """

    nodes: tuple[str, ...]
    pick: str = "only"
    follows: int = 0
    input: int = 0
    half: int | None = None

    def key(self, name: str) -> str:
        """The key a streamed node of base ``name`` is filed under for this source."""
        if self.input:
            return f"in{self.input}:{name}"
        return f"after{self.follows}:{name}" if self.follows else name


@dataclass(frozen=True)
class ArchNodes:
    """One architecture's stage sources; adding an architecture is a few rows here.

    ``scores_scaled``: the builder scales Q before ``kq`` (Gemma), so the score node already
    holds the scaled product; otherwise the scale is applied inside llama.cpp's softmax and
    the conversion multiplies it in.
    """

    stages: dict[Stage, Source]
    scores_scaled: bool = False

    def sources(self, cfg: ModelConfig) -> dict[Stage, Source]:
        """The rows for the stages this model computes (the stage graph's ``computes``)."""
        return {s: src for s, src in self.stages.items() if computes(s, cfg)}

    def score_scale(self, cfg: ModelConfig) -> float:
        """The factor that turns the ``attn_scores`` node into aprtrace's scaled scores."""
        return 1.0 if self.scores_scaled else cfg.attention_scale


_QKV = ("Qcur", "Kcur", "Vcur")
# The nodes llama.cpp's llama builder names (llama-graph.cpp, models/llama.cpp), graph order.
LLAMA_NODES: dict[Stage, Source] = {
    Stage.EMBEDDING: Source(("embd",)),
    Stage.ATTN_NORM: Source(("attn_norm",)),
    Stage.QKV_MATMUL: Source(_QKV, "first"),
    Stage.QKV_BIAS: Source(_QKV, "second"),
    Stage.Q_POST_ROPE: Source(("Qcur",), "last"),
    Stage.K_POST_ROPE: Source(("Kcur",), "last"),
    Stage.ATTN_SCORES: Source(("kq",)),
    Stage.ATTN_SOFTMAX: Source(("kq_soft_max",)),
    Stage.ATTENTION: Source(("kqv_out",)),
    Stage.ATTN_OUT: Source(("attn_out",)),
    Stage.POST_ATTN_RESIDUAL: Source(("ffn_inp",)),
    Stage.FFN_NORM: Source(("ffn_norm",)),
    Stage.FFN_GATE: Source(("ffn_gate",)),
    Stage.FFN_UP: Source(("ffn_up",)),
    Stage.FFN_SWIGL: Source(("ffn_swiglu",)),
    Stage.FFN_OUT: Source(("ffn_out",)),
    Stage.POST_FFN_RESIDUAL: Source(("l_out",)),
    Stage.FINAL_NORM: Source(("result_norm",)),
    Stage.LM_HEAD: Source(("result_output",)),
}
# Qwen2/Qwen3 builders do not name the output projection: it is the node after kqv_out.
# (Qwen3's q/k norm outputs are `Qcur_normed`/`Kcur_normed`; RoPE's output is still `Qcur`.)
QWEN_NODES = {**LLAMA_NODES, Stage.ATTN_OUT: Source(("kqv_out",), follows=1)}

# MoE (build_moe_ffn in llama-graph.cpp): top-k weights `ffn_moe_weights` (renormalised:
# `ffn_moe_weights_norm`), routed output `ffn_moe_out`; Qwen2-MoE adds the gated shared expert
# `ffn_shexp_out` and names the sum `ffn_out`. Mixtral is llama.cpp's llama builder. The
# expert ids `ffn_moe_topk` (I32, highest probability first) are read as floats.
_MOE_NODES = {
    Stage.MOE_ROUTER: Source(("ffn_moe_weights_norm",)),
    Stage.MOE_FFN_OUT: Source(("ffn_moe_out",)),
    Stage.MOE_ROUTER_INDICES: Source(("ffn_moe_topk",)),
}
QWEN2MOE_NODES = {
    **QWEN_NODES,
    Stage.MOE_ROUTER_INDICES: Source(("ffn_moe_topk",)),
    Stage.MOE_ROUTER: Source(("ffn_moe_weights",)),
    Stage.MOE_SHARED_EXPERT: Source(("ffn_shexp_out",)),
    Stage.MOE_FFN_OUT: Source(("ffn_out",)),
}

# Gemma 2/3 (models/gemma2-iswa.cpp, gemma3.cpp): the embedding is `inp_scaled` (times
# sqrt(hidden)); Q is multiplied by the query scale (an unnamed node) before `kq`; Gemma 2's
# soft-cap is three nodes after `kq` (`kq_scaled_1` = kq / cap, `kq_tanh`, `kq_scaled_2` =
# cap * tanh), the last of them the scores; the output projection is unnamed (the node after
# `kqv_out`); the sublayer post-norms are `attn_post_norm` / `ffn_post_norm` (Gemma 2 names
# the latter without a layer number: it belongs to the layer being built); `sa_out` is the
# attention residual; the FFN activation is fused (`ffn_geglu`, no activation node). The final
# logit soft-cap is applied before `result_output`. llama.cpp stores the norm weights as w + 1,
# which changes no activation.
GEMMA_NODES: dict[Stage, Source] = {
    **LLAMA_NODES,
    Stage.EMBEDDING: Source(("inp_scaled",)),
    Stage.ATTN_OUT: Source(("kqv_out",), follows=1),
    Stage.POST_ATTN_NORM: Source(("attn_post_norm",)),
    Stage.POST_ATTN_RESIDUAL: Source(("sa_out",)),
    Stage.FFN_SWIGL: Source(("ffn_geglu",)),
    Stage.POST_FFN_NORM: Source(("ffn_post_norm",)),
}
GEMMA2_NODES = {**GEMMA_NODES, Stage.ATTN_SCORES: Source(("kq_scaled_2",))}

# Phi-3 (models/phi3.cpp): one fused projection `wqkv`; `Qcur` is set on its view, after the
# RoPE and after the query scale (so the RoPE output is the second of three, and `kq` is
# already scaled); the output projection is the unnamed node after `kqv_out`, the attention
# residual the unnamed input of the norm under `ffn_norm` (in the last layer llama.cpp puts
# its output-row selection between the two, so it is not a fixed number of nodes after);
# the fused gate|up projection is `ffn_up` (gate first, as Hugging Face's gate_up_proj), its
# SwiGLU `ffn_swiglu`.
PHI3_NODES: dict[Stage, Source] = {
    **LLAMA_NODES,
    Stage.QKV_MATMUL: Source(("wqkv",)),
    Stage.Q_POST_ROPE: Source(("Qcur",), "#1"),
    Stage.ATTN_OUT: Source(("kqv_out",), follows=1),
    Stage.POST_ATTN_RESIDUAL: Source(("ffn_norm",), input=2),
    Stage.FFN_GATE: Source(("ffn_up",), half=0),
    Stage.FFN_UP: Source(("ffn_up",), half=1),
}
# OLMo 2 (models/olmo2.cpp): no pre-norms; Q/K norms over the whole projection
# (`Qcur_normed`), then the RoPE'd `Qcur`; post-norms `attn_post_norm` and `ffn_post_norm`
# (the latter without a layer number, as Gemma 2's).
OLMO2_NODES: dict[Stage, Source] = {
    **QWEN_NODES,
    Stage.POST_ATTN_NORM: Source(("attn_post_norm",)),
    Stage.POST_FFN_NORM: Source(("ffn_post_norm",)),
}

# Granite (models/granite.cpp): the llama builder's names with the multipliers between them:
# `embd` is already times embedding_multiplier; `kq` is unscaled (attention_multiplier is the
# softmax scale, as 1/sqrt(head_dim) for llama); `attn_out` / `ffn_out` are the projections
# before residual_multiplier (an unnamed scale), `ffn_inp` / `l_out` the sums after it;
# `result_output` is already divided by logits_scaling.
# StarCoder2 (models/starcoder2.cpp): LayerNorm with bias (`norm` -> `norm_w` -> named norm);
# the output projection and its bias are the two unnamed nodes after `kqv_out`; the
# non-gated MLP is `ffn_up` -> `ffn_up_b` (with bias) -> `ffn_gelu` (aprtrace's `ffn_silu`
# stage holds the activation of whichever kind) -> `ffn_down` -> `ffn_out` (with bias).
STARCODER2_NODES: dict[Stage, Source] = {
    **LLAMA_NODES,
    Stage.ATTN_OUT: Source(("kqv_out",), follows=2),
    Stage.FFN_UP: Source(("ffn_up_b",)),
    Stage.FFN_SILU: Source(("ffn_gelu",)),
}
# StableLM (models/stablelm.cpp): the Qwen names (biased Q/K/V, partial RoPE still set as
# the last `Qcur`/`Kcur`, the unbiased output projection unnamed after `kqv_out`) with
# LayerNorm. GPT-2 (models/gpt2.cpp): StarCoder2's layer with no RoPE; `inpL` is token plus
# position embedding; the fused `wqkv` / `wqkv_b` (Q|K|V), whose views are the only `Qcur`
# / `Kcur` (no RoPE: the projected Q and K).
GPT2_NODES: dict[Stage, Source] = {
    **STARCODER2_NODES,
    Stage.EMBEDDING: Source(("inpL",)),
    Stage.QKV_MATMUL: Source(("wqkv",)),
    Stage.QKV_BIAS: Source(("wqkv_b",)),
    Stage.Q_POST_ROPE: Source(("Qcur",)),
    Stage.K_POST_ROPE: Source(("Kcur",)),
}

ARCHITECTURES: dict[str, ArchNodes] = {
    "llama": ArchNodes(LLAMA_NODES),
    "qwen2": ArchNodes(QWEN_NODES),
    "qwen3": ArchNodes(QWEN_NODES),
    "qwen2moe": ArchNodes(QWEN2MOE_NODES),
    "qwen3moe": ArchNodes({**QWEN_NODES, **_MOE_NODES}),
    "mixtral": ArchNodes({**LLAMA_NODES, **_MOE_NODES}),
    "gemma2": ArchNodes(GEMMA2_NODES, scores_scaled=True),
    "gemma3": ArchNodes(GEMMA_NODES, scores_scaled=True),
    "phi3": ArchNodes(PHI3_NODES, scores_scaled=True),
    "olmo2": ArchNodes(OLMO2_NODES),
    "granite": ArchNodes(LLAMA_NODES),
    "starcoder2": ArchNodes(STARCODER2_NODES),
    "stablelm": ArchNodes(QWEN_NODES),
    "gpt2": ArchNodes(GPT2_NODES),
}


def arch_nodes(architecture: str) -> ArchNodes:
    """The node table of ``architecture``, or a ValidationError naming it."""
    if architecture not in ARCHITECTURES:
        raise ValidationError(
            f"--engine llama.cpp has no node mapping for architecture '{architecture}' yet",
            hint=f"mapped: {', '.join(ARCHITECTURES)}; use --engine numpy or transformers",
        )
    return ARCHITECTURES[architecture]


def not_captured(cfg: ModelConfig) -> list[str]:
    """Stages the NumPy engine writes for this model that llama.cpp does not compute."""
    mapped = arch_nodes(cfg.architecture).sources(cfg)
    return [s.value for s in stages_for(cfg) if s not in mapped]


# --------------------------------------------------------------------------------------------
# llama.cpp node values -> APRT layout


@dataclass
class Node:
    name: str
    ne: tuple[int, ...]
    values: np.ndarray  # shape reversed(ne), float32
    follows: str | None = None


def _token_major(node: Node, seq: int) -> bool:
    return node.ne[1] == seq and node.ne[2] == 1 and node.ne[3] == 1


def select(source: Source, nodes: list[Node], seq: int) -> Node | None:
    """The occurrence of a node ``source.pick`` asks for (None when absent)."""
    if source.pick == "only" or source.pick == "last":
        return nodes[-1] if nodes else None
    if source.pick.startswith("#"):
        index = int(source.pick[1:])
        return nodes[index] if len(nodes) > index else None
    flat = [n for n in nodes if _token_major(n, seq)]
    index = {"first": 0, "second": 1}[source.pick]
    return flat[index] if len(flat) > index else None


def _unpermute_columns(x: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation on an activation ``[seq, heads*head_dim]``."""
    return np.ascontiguousarray(unpermute_llama_qk(x.T, n_heads).T)


def _masked_zeroed(x: np.ndarray, window: int | None) -> np.ndarray:
    """Entries outside the causal mask (and outside ``window``, a sliding layer) set to 0."""
    positions = np.arange(x.shape[-1])
    return np.where(ops.attention_mask(positions, positions, window), x, np.float32(0.0))


def to_stage_layout(
    stage: Stage,
    parts: list[np.ndarray],
    cfg: ModelConfig,
    seq: int,
    qk_permuted: bool,
    layer: int | None = None,
    score_scale: float | None = None,
) -> np.ndarray:
    """llama.cpp node values (numpy order: ggml's ne reversed) in the stage's APRT layout.

    ``layer`` gives the attention window (``cfg.layer_window``) the score and softmax maps are
    masked with; ``score_scale`` multiplies the score node (default: the attention scale, for
    builders that apply it inside the softmax)."""
    if stage in (Stage.QKV_MATMUL, Stage.QKV_BIAS) and len(parts) == 1:
        return parts[0].reshape(seq, -1)  # one fused Q|K|V projection (Phi-3's wqkv)
    if stage in (Stage.QKV_MATMUL, Stage.QKV_BIAS):
        q, k, v = (p.reshape(seq, -1) for p in parts)
        if qk_permuted:
            q, k = _unpermute_columns(q, cfg.num_heads), _unpermute_columns(k, cfg.num_kv_heads)
        return np.concatenate([q, k, v], axis=-1)
    (x,) = parts
    if stage in (Stage.Q_POST_ROPE, Stage.K_POST_ROPE):
        x = x.reshape(seq, -1)  # [seq, heads, head_dim] -> token-major
        heads = cfg.num_heads if stage is Stage.Q_POST_ROPE else cfg.num_kv_heads
        return _unpermute_columns(x, heads) if qk_permuted else x
    if stage in (Stage.ATTN_SCORES, Stage.ATTN_SOFTMAX):
        x = x.reshape(cfg.num_heads, seq, -1)[:, :, :seq]  # the KV cache is padded
        if stage is Stage.ATTN_SCORES:
            scale = cfg.attention_scale if score_scale is None else score_scale
            if scale != 1.0:
                x = x * np.float32(scale)
        window = cfg.layer_window(layer) if layer is not None else None
        return _masked_zeroed(x, window).astype(np.float32)
    if stage in (Stage.LM_HEAD, Stage.MOE_ROUTER, Stage.MOE_FFN_OUT, Stage.MOE_ROUTER_INDICES):
        return np.ascontiguousarray(x.reshape(seq, -1)[-1])
    return x.reshape(seq, -1)


SCALED_SCORES_NOTE = (
    "Q scaled by llama.cpp before kq; key axis cut to the prompt, entries outside the causal "
    "mask and the layer's sliding window 0"
)
# Notes for the manifest: how each stage was made from llama.cpp's tensors.
TRANSFORM_NOTES = {
    Stage.QKV_MATMUL: "concat of the Q/K/V matmul outputs",
    Stage.QKV_BIAS: "concat of Q/K/V after the bias add",
    Stage.ATTN_SCORES: "kq * attention scale, key axis cut to the prompt, masked entries 0",
    Stage.ATTN_SOFTMAX: "key axis cut to the prompt",
    Stage.LM_HEAD: "last row",
    Stage.MOE_ROUTER: "last row",
    Stage.MOE_FFN_OUT: "last row",
    Stage.MOE_ROUTER_INDICES: "last row, I32 ids as f32",
}


def source_notes(arch: ArchNodes, cfg: ModelConfig, qk_permuted: bool) -> dict[str, str]:
    """``{stage: "node-N [pick] (transform)"}`` for the manifest."""
    out = {}
    for stage, src in arch.sources(cfg).items():
        layered = stage.per_layer and stage is not Stage.EMBEDDING
        names = "+".join(f"{n}-N" if layered else n for n in src.nodes)
        after = "node after" if src.follows == 1 else f"node {src.follows} after"
        text = f"{after} {names}" if src.follows else names
        if src.input:
            text = "input of " * src.input + text
        if src.half is not None:
            text = f"{('first', 'second')[src.half]} half of {text}"
        if src.pick != "only":
            text += f" ({src.pick} occurrence)"
        notes = [TRANSFORM_NOTES[stage]] if stage in TRANSFORM_NOTES else []
        if stage is Stage.ATTN_SCORES and arch.scores_scaled:
            notes = [SCALED_SCORES_NOTE]
        if qk_permuted and stage in (
            Stage.QKV_MATMUL,
            Stage.QKV_BIAS,
            Stage.Q_POST_ROPE,
            Stage.K_POST_ROPE,
        ):
            notes.append("Q/K columns un-permuted to the Hugging Face order")
        out[stage.value] = text + (f": {'; '.join(notes)}" if notes else "")
    return out


# --------------------------------------------------------------------------------------------
# The child process


def check_installed() -> None:
    """ValidationError naming the extra when cyllama is not importable."""
    if importlib.util.find_spec("cyllama") is None:
        raise ValidationError(
            "--engine llama.cpp needs the `llamacpp` extra (cyllama is not installed)",
            hint=MISSING_EXTRA_HINT,
        )


def child_command() -> list[str]:
    return [sys.executable, "-m", CHILD_MODULE]


def _read_exact(stream: IO[bytes], n: int) -> bytes | None:
    chunks, need = [], n
    while need:
        chunk = stream.read(need)
        if not chunk:
            return None
        chunks.append(chunk)
        need -= len(chunk)
    return b"".join(chunks)


def read_messages(stream: IO[bytes]) -> Iterator[tuple[dict[str, Any], bytes]]:
    """The child's framed messages until EOF (a truncated frame ends the stream)."""
    while True:
        frame = _read_exact(stream, 8)
        if frame is None:
            return
        head_len, payload_len = struct.unpack("<II", frame)
        head = _read_exact(stream, head_len)
        payload = _read_exact(stream, payload_len) if payload_len else b""
        if head is None or payload is None:
            return
        yield json.loads(head), payload


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "did not exit"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name} (exit code {code})"
    return f"exited with code {code}"


class ChildRun:
    """One child process: send a request, iterate its messages, then check how it ended."""

    def __init__(self, request: dict[str, Any]):
        self.request = request
        self.hello: dict[str, Any] = {}
        self.done: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        # Verbose: llama.cpp's log goes straight to our stderr; otherwise it is kept for the
        # error message of a crash.
        self._stderr = None if request.get("verbose") else tempfile.TemporaryFile()
        # ggml's abort handler would attach gdb for a backtrace: seconds, and pages of noise.
        env = {**os.environ, "GGML_NO_BACKTRACE": "1"}
        self.proc = subprocess.Popen(
            child_command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
        )

    def messages(self) -> Iterator[tuple[dict[str, Any], bytes]]:
        try:
            self.proc.stdin.write(json.dumps(self.request).encode())
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        for header, payload in read_messages(self.proc.stdout):
            kind = header.get("kind")
            if kind == "hello":
                self.hello = header
            elif kind == "error":
                self.error = header
            elif kind == "done":
                self.done = header
            else:
                yield header, payload

    def close(self) -> None:
        """Stop the child if it still runs (an error on our side) and reap it."""
        if self.proc.poll() is None and self.done is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        if self._stderr is not None and self.done is not None:
            self._stderr.close()

    def stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        text = self._stderr.read().decode("utf-8", "replace").strip()
        return text[-STDERR_TAIL:]

    def check(self) -> None:
        """Raise the right AprtraceError unless the child reported ``done`` and exited 0."""
        code = self.proc.returncode
        if self.error is not None:
            message = self.error.get("message", "")
            category = self.error.get("category")
            if category == "refused":
                raise ValidationError(
                    f"--engine llama.cpp refused: {message}",
                    hint=f"install the pinned version: {MISSING_EXTRA_HINT}",
                )
            if category == "load":
                raise ModelLoadError(f"llama.cpp cannot load the model: {message}")
            raise InferenceError(f"llama.cpp failed: {message}")
        if self.done is None or code != 0:
            tail = self.stderr_tail()
            raise InferenceError(
                f"the llama.cpp child process {_describe_exit(code)} before finishing; "
                "nothing in the output directory was replaced"
                + (f"\n  child stderr: {tail}" if tail else ""),
                hint="rerun with APRTRACE_LLAMACPP_VERBOSE=1 to see llama.cpp's log",
            )


def _request(op: str, model_path: str, **fields: Any) -> dict[str, Any]:
    return {
        "op": op,
        "model": model_path,
        "verbose": bool(os.environ.get("APRTRACE_LLAMACPP_VERBOSE")),
        **fields,
    }


def run_child(request: dict[str, Any]) -> tuple[ChildRun, list[tuple[dict[str, Any], bytes]]]:
    """Run a short request (tokenize, probe) to the end; return the run and its messages."""
    check_installed()
    run = ChildRun(request)
    try:
        out = list(run.messages())
    finally:
        run.close()
    run.check()
    return run, out


def tokenize(model: Model, text: str, add_bos: bool = False) -> list[int]:
    """``text`` as token ids by llama.cpp's own tokenizer (no BOS unless asked, as apr)."""
    _, messages = run_child(_request("tokenize", str(model.path), text=text, add_bos=add_bos))
    return [int(i) for h, _ in messages if h.get("kind") == "tokens" for i in h["ids"]]


def probe() -> dict[str, Any]:
    """Check in a child that cyllama's struct layout is the one aprtrace knows; its versions."""
    run, _ = run_child({"op": "probe", "model": "", "verbose": False})
    return run.hello


# --------------------------------------------------------------------------------------------
# The engine


@dataclass
class LlamaCppEngine:
    """``forward``'s contract computed by llama.cpp; ``manifest_info`` is set by a run."""

    n_threads: int = DEFAULT_THREADS
    manifest_info: dict[str, Any] = field(default_factory=dict)

    def __call__(
        self,
        model: Model,
        token_ids: list[int],
        emit: Emit | None = None,
        progress: Progress | None = None,
        wants=None,  # accepted for forward()'s signature; llama.cpp computes every stage
    ) -> np.ndarray:
        cfg = model.config
        emit = emit or (lambda stage, layer, values: None)
        arch = self.check_model(model)
        ids = check_token_ids(cfg, token_ids).tolist()
        sources = arch.sources(cfg)
        # llama GGUFs store Q/K rows in llama.cpp's adjacent-pair RoPE order (mapping/).
        permuted = bool(model.qk_permuted)
        plain = [s for s in sources.values() if not s.follows and not s.input]
        names = sorted({n for s in plain for n in s.nodes})
        inputs = sorted({(n, s.input) for s in sources.values() if s.input for n in s.nodes})
        follow = sorted({(n, s.follows) for s in sources.values() if s.follows for n in s.nodes})
        request = _request(
            "trace",
            str(model.path),
            tokens=ids,
            names=names,
            follow=[list(f) for f in follow],
            inputs=[list(i) for i in inputs],
            n_threads=self.n_threads,
        )
        run = ChildRun(request)
        try:
            logits = self._stream(
                run, cfg, sources, len(ids), permuted, arch.score_scale(cfg), emit, progress
            )
        finally:
            run.close()
        run.check()
        self.manifest_info = {
            "llama_cpp": {
                "build": run.hello.get("llama_cpp"),
                "ggml": run.hello.get("ggml"),
                "ggml_commit": run.hello.get("ggml_commit"),
                "cyllama": run.hello.get("cyllama"),
                "context": (run.done or {}).get("settings", {}),
            },
            "not_captured": not_captured(cfg),
            "stage_sources": source_notes(arch, cfg, permuted),
        }
        return logits

    @staticmethod
    def check_model(model: Model) -> ArchNodes:
        """Refuse what this engine cannot run (before any output directory is touched)."""
        if model.format != "gguf":
            raise ValidationError(
                f"--engine llama.cpp reads GGUF files; {model.path} is {model.format}",
                hint="convert it with `aprtrace convert`, or use --engine numpy",
            )
        check_installed()
        return arch_nodes(model.config.architecture)

    def _stream(self, run, cfg, sources, seq, permuted, score_scale, emit, progress):
        """Group the streamed nodes by layer; emit a layer when its ``l_out`` arrives.

        A per-layer node llama.cpp names without a layer number (Gemma 2's ``ffn_post_norm``)
        belongs to the layer whose nodes precede it."""
        per_layer = [s for s in sources if s.per_layer and s is not Stage.EMBEDDING]
        whole_model = [s for s in sources if not s.per_layer]
        embedding = sources[Stage.EMBEDDING].nodes[0]
        layered = {n for s in per_layer for n in sources[s].nodes}
        pending: dict[int | None, dict[str, list[Node]]] = {}
        logits = None
        done_layers = 0
        current: int | None = None

        def flush(stages: list[Stage], layer: int | None) -> None:
            nodes = pending.pop(layer, {})
            for stage in sorted(stages, key=lambda s: s.order):
                src = sources[stage]
                values = self._stage_values(
                    stage, src, nodes, layer, cfg, seq, permuted, score_scale
                )
                emit(stage, 0 if stage is Stage.EMBEDDING else layer, values)

        for header, payload in run.messages():
            if header["kind"] == "logits":
                logits = np.frombuffer(payload, dtype="<f4").astype(np.float32)
                continue
            if "skipped" in header:
                continue
            ne = tuple(int(x) for x in header["ne"])
            values = np.frombuffer(payload, dtype="<f4").reshape(tuple(reversed(ne)))
            follows = header.get("follows")
            depth = int(header.get("follows_depth", 1))
            back = header.get("input_depth")
            name, layer = _split_name(follows or header["name"])
            if layer is None and name in layered:
                layer = current
            current = layer if layer is not None else current
            key = f"after{depth}:{name}" if follows else f"in{back}:{name}" if back else name
            node = Node(header["name"], ne, values, follows)
            pending.setdefault(layer, {}).setdefault(key, []).append(node)
            if name == embedding:
                flush([Stage.EMBEDDING], None)
            elif name == "l_out" and layer is not None:
                flush(per_layer, layer)
                done_layers += 1
                if progress is not None:
                    progress(done_layers, cfg.num_layers)
        if run.done is None or run.error is not None:
            return np.zeros(0, np.float32)  # run.check() raises the reason
        if done_layers != cfg.num_layers:
            raise InferenceError(
                f"llama.cpp computed l_out of {done_layers} layers; the model has {cfg.num_layers}"
            )
        flush(whole_model, None)
        if logits is None:
            raise InferenceError("llama.cpp returned no logits")
        return logits

    @staticmethod
    def _stage_values(stage, src, nodes, layer, cfg, seq, permuted, score_scale) -> np.ndarray:
        parts = []
        for name in src.nodes:
            node = select(src, nodes.get(src.key(name), []), seq)
            if node is None:
                where = f"{name}-{layer}" if layer is not None else name
                what = f"node '{where}'"
                if src.follows:
                    what = f"the node {src.follows} after '{where}'"
                elif src.input:
                    what = f"input {src.input} back of '{where}'"
                raise InferenceError(
                    f"llama.cpp's {cfg.architecture} graph has no {what} "
                    f"({src.pick} occurrence) for stage {stage.value}",
                    hint="the llama.cpp build differs from the one the node table in "
                    "aprtrace/engines/llamacpp.py was written for",
                )
            values = node.values
            if src.half is not None:
                width = values.shape[-1] // 2
                values = values[..., src.half * width : (src.half + 1) * width]
            parts.append(values)
        return to_stage_layout(stage, parts, cfg, seq, permuted, layer, score_scale)


def _split_name(name: str) -> tuple[str, int | None]:
    """``"Qcur-3"`` -> ``("Qcur", 3)``; ``"result_norm"`` -> ``("result_norm", None)``."""
    base, sep, tail = name.rpartition("-")
    if sep and tail.isdigit():
        return base, int(tail)
    return name, None


def prompt_token_ids(model: Model, prompt: str, add_bos: bool) -> tuple[list[int], dict[str, Any]]:
    """Token ids of ``prompt`` by llama.cpp's tokenizer, and a manifest record comparing them
    with aprtrace's own tokenizer (``{"source": "llama.cpp", "aprtrace_agrees": bool, ...}``).
    """
    ids = tokenize(model, prompt, add_bos)
    info: dict[str, Any] = {"source": "llama.cpp"}
    if model.tokenizer is not None:
        from aprtrace.trace import encode_prompt

        own = encode_prompt(model, prompt, add_bos)
        info["aprtrace_agrees"] = own == ids
        if own != ids:
            info["aprtrace_token_ids"] = own
    return ids, info


def list_nodes(model_path: str, token_ids: list[int]) -> list[dict[str, Any]]:
    """Every node llama.cpp computes for ``token_ids``, in graph order: ``{"name", "ne",
    "type"}`` (ggml type id). What a new row of ``ARCHITECTURES`` is written from."""
    _, messages = run_child(
        _request("trace", model_path, tokens=list(token_ids), names=[], list_only=True)
    )
    return [
        {"name": h["name"], "ne": h["ne"], "type": h["type"]}
        for h, _ in messages
        if h.get("kind") == "node"
    ]


def main(argv: list[str] | None = None) -> int:
    """``python -m aprtrace.engines.llamacpp MODEL.gguf [TOKEN_IDS]``: print llama.cpp's graph
    nodes (name, ggml ne, type) for a prompt, default token ids 1,2,3,4."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(main.__doc__, file=sys.stderr)
        return 2
    ids = [int(t) for t in args[1].split(",")] if len(args) > 1 else [1, 2, 3, 4]
    for node in list_nodes(args[0], ids):
        print(f"{node['name']:40s} ne={node['ne']} type={node['type']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
