"""The child process of the llama.cpp engine: runs llama.cpp (through cyllama) and streams
the graph nodes it computes to the parent. Run as ``python -m aprtrace.engines.llamacpp_child``.

It reads one JSON request from stdin and writes framed messages to the file descriptor that
was stdout (fd 1 is then pointed at stderr, so nothing llama.cpp prints can corrupt the
stream). A message is ``struct.pack("<II", len(header), len(payload))``, a JSON header, then
``payload`` bytes (a node's values as little-endian float32, C order of the reversed ``ne``).

The stage mapping, the Q/K un-permutation and every file write happen in the parent
(``aprtrace.engines.llamacpp``): a crash or kill of this process cannot leave a partial file.

How the nodes are reached without a C symbol: cyllama's ``LlamaContextParams`` holds
llama.cpp's ``struct llama_context_params`` by value. Marker values set through its Python
properties locate the struct in the object's bytes (``probe_layout``), which must match the
layout of llama.cpp b9190 exactly; then a ctypes callback is written into the ``cb_eval`` slot
(NULL until then). llama.cpp's scheduler calls it for every node: ``ask=True`` before
computing (return True to observe the node), ``ask=False`` after, with the node's data valid
until the next node is computed.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import struct
import sys
import traceback
from dataclasses import dataclass
from typing import Any, BinaryIO

EXPECTED_CYLLAMA = "0.2.18"
EXPECTED_LLAMA_CPP = "b9190"
EXPECTED_GGML = "0.12.0"

# Exit codes of the child (the parent maps them to messages).
EXIT_OK = 0
EXIT_REFUSED = 3  # a known refusal: wrong cyllama, unknown struct layout, model load failed
EXIT_FAILED = 4  # llama.cpp ran but failed (decode error, exception in the callback)

GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
GGML_TYPE_I32 = 26  # integer nodes such as MoE expert ids (ffn_moe_topk)
GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_NAME = 64
GGML_MAX_OP_PARAMS = 64
LLAMA_FLASH_ATTN_DISABLED = 0

# Base name and layer: `Qcur-3`, `kq_scaled_2-0` (digits inside a base name), `result_norm`.
NODE_NAME = re.compile(r"([A-Za-z_][A-Za-z0-9_]*?)(?:-(\d+))?")


class GgmlTensor(ctypes.Structure):
    """``struct ggml_tensor`` of ggml 0.12.0 (ggml.h), 336 bytes on 64-bit platforms."""

    _fields_ = [
        ("type", ctypes.c_int32),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int32),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


EvalCallback = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_bool, ctypes.c_void_p)

# Fields of `struct llama_context_params` (llama.cpp b9190, x86-64/aarch64 ABI) that the probe
# sets through cyllama's properties: byte offset, marker value, struct format of the field.
PROBE_FIELDS: dict[str, tuple[int, Any, str]] = {
    "n_ctx": (0, 0x5A170001, "<I"),
    "n_batch": (4, 0x5A170002, "<I"),
    "n_ubatch": (8, 0x5A170003, "<I"),
    "n_seq_max": (12, 0x5A170004, "<I"),
    "n_threads": (20, 0x5A170005, "<i"),
    "n_threads_batch": (24, 0x5A170006, "<i"),
    "rope_scaling_type": (32, 0x5A170007, "<i"),
    "pooling_type": (36, 0x5A170008, "<i"),
    "attention_type": (40, 0x5A170009, "<i"),
    "flash_attn_type": (44, 0x5A17000A, "<i"),
    "rope_freq_base": (48, 1234.5, "<f"),
    "rope_freq_scale": (52, 0.375, "<f"),
    "yarn_ext_factor": (56, 0.625, "<f"),
    "yarn_orig_ctx": (72, 0x5A17000B, "<I"),
    "type_k": (96, 0x1D, "<i"),
    "type_v": (100, 0x1E, "<i"),
    "embeddings": (120, True, "<?"),
    "kv_unified": (125, True, "<?"),
}
CB_EVAL_OFFSET = 80  # ggml_backend_sched_eval_callback cb_eval; void * cb_eval_user_data at 88
STRUCT_SIZE = 144


class LayoutError(Exception):
    """cyllama's parameter object is not the layout this module knows."""


@dataclass
class Layout:
    """Where the C struct starts inside cyllama's ``LlamaContextParams`` object."""

    struct_offset: int

    def cb_eval_address(self, params: Any) -> int:
        return id(params) + self.struct_offset + CB_EVAL_OFFSET


def _object_bytes(obj: Any) -> bytes:
    return ctypes.string_at(id(obj), type(obj).__basicsize__)


def probe_layout(params: Any) -> Layout:
    """Locate ``struct llama_context_params`` in a fresh cyllama ``LlamaContextParams``.

    Sets a marker value in each of PROBE_FIELDS, finds ``n_ctx``'s in the object's bytes and
    checks that every other marker sits at its offset, that nothing else changed, that the
    object holds the whole struct and that both callback slots are NULL; raises LayoutError
    otherwise. The fields get their defaults back afterwards.
    """
    try:
        saved = {name: getattr(params, name) for name in PROBE_FIELDS}
    except AttributeError as exc:
        raise LayoutError(f"LlamaContextParams has no property {exc.name!r}") from None
    before = _object_bytes(params)
    try:
        for name, (_, marker, _) in PROBE_FIELDS.items():
            setattr(params, name, marker)
        after = _object_bytes(params)
    finally:
        for name, value in saved.items():
            setattr(params, name, value)
    key = struct.pack("<I", PROBE_FIELDS["n_ctx"][1])
    start = after.find(key)
    if start < 0 or after.count(key) != 1:
        raise LayoutError("cannot find llama_context_params.n_ctx in LlamaContextParams")
    if len(after) - start < STRUCT_SIZE:
        raise LayoutError(f"LlamaContextParams holds fewer than {STRUCT_SIZE} bytes of struct")
    expected: set[int] = set()
    for name, (offset, marker, fmt) in PROBE_FIELDS.items():
        packed = struct.pack(fmt, marker)
        at = start + offset
        if after[at : at + len(packed)] != packed:
            raise LayoutError(f"llama_context_params.{name} is not at byte {offset}")
        expected.update(range(at, at + len(packed)))
    if any(before[i] != after[i] for i in range(len(before)) if i not in expected):
        raise LayoutError("setting the probe fields changed bytes outside the known layout")
    slot = start + CB_EVAL_OFFSET
    if after[slot : slot + 16] != bytes(16):
        raise LayoutError("llama_context_params.cb_eval / cb_eval_user_data are not NULL")
    return Layout(start)


def versions() -> dict[str, str]:
    import importlib.metadata
    import importlib.resources

    import cyllama.llama.llama_cpp as cy

    # build_config.json is written by cyllama's build: the llama.cpp tag it compiled.
    config = importlib.resources.files("cyllama").joinpath("build_config.json").read_text()
    build = json.loads(config)["versions"]
    return {
        "cyllama": importlib.metadata.version("cyllama"),
        "llama_cpp": build.get("llama_cpp_version", "?"),
        "ggml": cy.ggml_version(),
        "ggml_commit": cy.ggml_commit(),
    }


def check_versions(found: dict[str, str]) -> None:
    if (found["cyllama"], found["llama_cpp"], found["ggml"]) != (
        EXPECTED_CYLLAMA,
        EXPECTED_LLAMA_CPP,
        EXPECTED_GGML,
    ):
        raise LayoutError(
            f"found cyllama {found['cyllama']} (llama.cpp {found['llama_cpp']}, ggml "
            f"{found['ggml']}); the struct layouts aprtrace mirrors are those of cyllama "
            f"{EXPECTED_CYLLAMA} (llama.cpp {EXPECTED_LLAMA_CPP}, ggml {EXPECTED_GGML})"
        )


class Channel:
    """Framed messages to the parent."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        head = json.dumps(header).encode()
        self.stream.write(struct.pack("<II", len(head), len(payload)))
        self.stream.write(head)
        if payload:
            self.stream.write(payload)
        self.stream.flush()


def tensor_values(t: GgmlTensor):
    """A float32 copy of a node's data (any strides), shape ``reversed(ne)``; None if the
    node's type is not F32/F16/I32 or it has no data."""
    import numpy as np

    dtypes = {GGML_TYPE_F32: np.float32, GGML_TYPE_F16: np.float16, GGML_TYPE_I32: np.int32}
    if not t.data or t.type not in dtypes:
        return None
    dtype = dtypes[t.type]
    ne = [int(x) for x in t.ne]
    nb = [int(x) for x in t.nb]
    if any(n <= 0 for n in ne):
        return np.zeros(tuple(reversed(ne)), np.float32)
    itemsize = np.dtype(dtype).itemsize
    span = sum((n - 1) * s for n, s in zip(ne, nb, strict=True)) + itemsize
    raw = np.frombuffer((ctypes.c_char * span).from_address(t.data), dtype=np.uint8)
    view = np.lib.stride_tricks.as_strided(
        raw[: span - span % itemsize].view(dtype),
        shape=tuple(reversed(ne)),
        strides=tuple(reversed(nb)),
        writeable=False,
    )
    return np.ascontiguousarray(view, dtype=np.float32)


class Capture:
    """The eval callback: observes the nodes whose base name is wanted, streams each one."""

    def __init__(
        self,
        channel: Channel,
        names: set[str],
        follow: set[tuple[str, int]],
        list_only: bool = False,
        inputs: set[tuple[str, int]] = frozenset(),
    ):
        self.channel = channel
        self.names = names
        self.follow = follow
        self.list_only = list_only  # every node's name, shape and type, no values
        self.sent = 0
        self.error: str | None = None
        # `follow`: (base name, n): also send the n-th node after each node of that base name.
        self.depth = max((n for _, n in follow), default=0)
        self.history: list[str] = []  # the last `depth` nodes asked about (graph order)
        self.following: dict[int, tuple[str, int]] = {}  # address -> (named node, n)
        # `inputs`: (base name, n): also send the n-th input back (src[0], n times) of each
        # node of that base name, read when that node is computed (Phi-3's unnamed residual is
        # the input of the norm under `ffn_norm-N`; a residual stays allocated until l_out).
        self.inputs: dict[str, list[int]] = {}
        for base, n in inputs:
            self.inputs.setdefault(base, []).append(n)
        self.callback = EvalCallback(self._on_node)  # must outlive the context

    def _base(self, name: str) -> str | None:
        match = NODE_NAME.fullmatch(name)
        return match.group(1) if match else None

    def _send(self, header: dict[str, Any], t: GgmlTensor) -> None:
        header["ne"] = [int(x) for x in t.ne]
        values = tensor_values(t)
        if values is None:
            header["skipped"] = f"ggml type {t.type}"
            self.channel.send(header)
        else:
            self.channel.send(header, values.astype("<f4", copy=False).tobytes())
        self.sent += 1

    def _on_node(self, address: int, ask: bool, _user_data: int) -> bool:
        # Never let an exception cross into C; returning False aborts the graph.
        try:
            t = GgmlTensor.from_address(address)
            name = t.name.decode("utf-8", "replace")
            if self.list_only:
                if not ask:
                    header = {"kind": "node", "name": name, "ne": [int(x) for x in t.ne]}
                    self.channel.send({**header, "type": int(t.type), "skipped": "list only"})
                return True
            if ask:
                # Unnamed nodes are reached by order: the n-th node after a `follow` one
                # (e.g. the output projection after `kqv_out-N` where no name is set).
                for back in range(1, min(self.depth, len(self.history)) + 1):
                    before = self.history[-back]
                    if (self._base(before), back) in self.follow:
                        self.following[address] = (before, back)
                if self.depth:
                    self.history = [*self.history, name][-self.depth :]
                base = self._base(name)
                return base in self.names or base in self.inputs or address in self.following
            base = self._base(name)
            if base in self.names or address in self.following:
                header = {"kind": "node", "name": name}
                if address in self.following:
                    header["follows"], header["follows_depth"] = self.following.pop(address)
                self._send(header, t)
            for n in self.inputs.get(base, ()):
                source = t
                for _ in range(n):
                    source = GgmlTensor.from_address(source.src[0]) if source.src[0] else None
                    if source is None:
                        break
                if source is not None:
                    self._send({"kind": "node", "name": name, "input_depth": n}, source)
            return True
        except BaseException:  # noqa: BLE001 - reported to the parent, graph aborted
            self.error = traceback.format_exc(limit=4)
            return False


class LoadError(Exception):
    """llama.cpp could not load the model file."""


def _load_model(cy, path: str):
    class Model(cy.LlamaModel):
        # cyllama 0.2.18's LlamaContext.get_logits reads model.n_vocab, which it lacks.
        @property
        def n_vocab(self) -> int:
            return self.get_vocab().n_vocab

    params = cy.LlamaModelParams()  # vocab_only aborts in b9190 (llama-hparams.cpp:35)
    try:
        return Model(path, params)
    except (ValueError, RuntimeError) as exc:
        raise LoadError(str(exc)) from None


def tokenize(cy, request: dict[str, Any]) -> list[int]:
    model = _load_model(cy, request["model"])
    vocab = model.get_vocab()
    ids = list(vocab.tokenize(request["text"], False, True))
    if request.get("add_bos"):
        ids.insert(0, int(vocab.token_bos()))
    return [int(i) for i in ids]


def trace(cy, request: dict[str, Any], channel: Channel) -> dict[str, Any]:
    tokens = [int(t) for t in request["tokens"]]
    params = cy.LlamaContextParams()
    layout = probe_layout(params)
    model = _load_model(cy, request["model"])
    seq = len(tokens)
    # One ubatch holds the whole prompt, so every node is computed (and observed) once.
    params.n_ctx = max(seq, 16)
    params.n_batch = params.n_ubatch = max(seq, 1)
    params.n_seq_max = 1
    params.n_threads = params.n_threads_batch = int(request.get("n_threads", 2))
    # Flash attention fuses the score and softmax nodes away: off for a trace.
    params.flash_attn_type = LLAMA_FLASH_ATTN_DISABLED
    capture = Capture(
        channel,
        set(request["names"]),
        # [name, n] pairs; a bare name is n = 1
        {(f, 1) if isinstance(f, str) else (f[0], int(f[1])) for f in request.get("follow", ())},
        bool(request.get("list_only")),
        {(f[0], int(f[1])) for f in request.get("inputs", ())},
    )
    if not request.get("no_callback"):  # (the test that the callback changes no logit)
        slot = ctypes.c_void_p.from_address(layout.cb_eval_address(params))
        slot.value = ctypes.cast(capture.callback, ctypes.c_void_p).value
    ctx = cy.LlamaContext(model, params)
    settings = {
        "n_ctx": int(ctx.n_ctx),
        "n_threads": params.n_threads,
        "flash_attn": False,
        "type_k": int(params.type_k),
        "type_v": int(params.type_v),
    }
    batch = cy.LlamaBatch(n_tokens=seq, embd=0, n_seq_max=1)
    for pos, token in enumerate(tokens):
        batch.add(token, pos, [0], True)  # every row an output, or the last layer drops rows
    try:
        ctx.decode(batch)
    except Exception as exc:
        if capture.error:
            raise RuntimeError(f"in the eval callback: {capture.error}") from None
        raise RuntimeError(f"llama_decode failed: {exc}") from None
    if capture.error:
        raise RuntimeError(f"in the eval callback: {capture.error}")
    logits = ctx.get_logits_ith(seq - 1)
    import numpy as np

    channel.send({"kind": "logits", "n": len(logits)}, np.asarray(logits, dtype="<f4").tobytes())
    del ctx, capture
    return settings


def main() -> int:
    # Protocol on a private copy of stdout; fd 1 -> stderr for anything native code prints.
    proto = os.fdopen(os.dup(1), "wb", buffering=1 << 20)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    channel = Channel(proto)
    try:
        request = json.loads(sys.stdin.read())
        import cyllama.llama.llama_cpp as cy

        if not request.get("verbose"):
            cy.disable_logging()
        found = versions()
        channel.send({"kind": "hello", **found})
        check_versions(found)
        if request["op"] == "tokenize":
            channel.send({"kind": "tokens", "ids": tokenize(cy, request)})
            channel.send({"kind": "done"})
        elif request["op"] == "probe":
            probe_layout(cy.LlamaContextParams())
            channel.send({"kind": "done"})
        else:
            settings = trace(cy, request, channel)
            channel.send({"kind": "done", "settings": settings})
        return EXIT_OK
    except (LayoutError, ImportError) as exc:
        channel.send({"kind": "error", "category": "refused", "message": str(exc)})
        return EXIT_REFUSED
    except LoadError as exc:
        channel.send({"kind": "error", "category": "load", "message": str(exc)})
        return EXIT_REFUSED
    except Exception as exc:  # reported to the parent as a message, not a traceback
        channel.send({"kind": "error", "category": "failed", "message": f"{exc}"})
        return EXIT_FAILED
    finally:
        try:
            proto.flush()
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
