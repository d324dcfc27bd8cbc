"""What every architecture module provides, and the per-pass context its layers read.

An architecture is a subclass of ``Architecture`` that reads like the math of its model
(Hugging Face's ``modeling_*.py`` in NumPy): ``load_layer`` decodes one block's weights,
``layer`` runs the block with one ``x = emit(Stage.X, layer, x)`` under each captured line
(the block continues from what emit returns, see ``LayerEmit``). The driver
(``aprtrace.forward``) owns the loop over layers, the embedding and the output head, so a
new architecture overrides only what differs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aprtrace.arch import ops
from aprtrace.config import ROPE_FREQS, ModelConfig
from aprtrace.stages import Stage

# An observer of capture points (``forward``'s callback); what it returns is ignored.
Emit = Callable[[Stage, "int | None", np.ndarray], Any]
# What the layers call: ``x = emit(Stage.X, layer, x)`` continues from the returned buffer,
# the computed one in a forward pass (``passing``), B's dumped one when localizing.
LayerEmit = Callable[[Stage, "int | None", np.ndarray], np.ndarray]
# wants(stage, layer): whether the caller uses that capture; a stage nobody wants may be
# skipped when skipping it saves work (today: the attention maps).
Wants = Callable[[Stage, "int | None"], bool]


def no_emit(stage: Stage, layer: int | None, values: np.ndarray) -> np.ndarray:
    return values


def passing(emit: Emit) -> LayerEmit:
    """``emit`` as the layers call it: it observes the buffer, the layer continues from it."""

    def layer_emit(stage: Stage, layer: int | None, values: np.ndarray) -> np.ndarray:
        emit(stage, layer, values)
        return values

    return layer_emit


def wants_everything(stage: Stage, layer: int | None) -> bool:
    return True


def wants_nothing(stage: Stage, layer: int | None) -> bool:
    return False


@dataclass
class KVCache:
    """Keys and values (after RoPE) of every position seen so far, per layer, with positions.

    Rows live in per-layer buffers that grow by doubling (or to ``capacity`` rows, when the
    caller knows the final length), so a decode step writes its one row in place instead of
    copying the whole cache. ``extend`` returns views of the filled rows.
    """

    capacity: int = 0
    _k: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    _v: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    _pos: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    _len: dict[int, int] = field(default_factory=dict, repr=False)

    def extend(
        self, layer: int, k: np.ndarray, v: np.ndarray, positions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Append this pass's rows; return every cached key, value and position."""
        n = self._len.get(layer, 0)
        end = n + len(k)
        if layer not in self._k or end > self._k[layer].shape[0]:
            rows = max(end, self.capacity, 2 * n)
            for store, new in ((self._k, k), (self._v, v), (self._pos, positions)):
                grown = np.empty((rows, *np.shape(new)[1:]), dtype=np.asarray(new).dtype)
                if layer in store:
                    grown[:n] = store[layer][:n]
                store[layer] = grown
        self._k[layer][n:end] = k
        self._v[layer][n:end] = v
        self._pos[layer][n:end] = positions
        self._len[layer] = end
        return self.entries(layer)

    def entries(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Views of the cached keys ``[n, kv_heads, d]``, values and positions of ``layer``."""
        n = self._len.get(layer, 0)
        if layer not in self._k:
            raise KeyError(f"layer {layer} has nothing cached")
        return self._k[layer][:n], self._v[layer][:n], self._pos[layer][:n]

    @property
    def length(self) -> int:
        """Positions cached (in the first layer filled)."""
        return next(iter(self._len.values())) if self._len else 0

    @property
    def nbytes(self) -> int:
        """Bytes the cache buffers hold (allocated rows, keys + values + positions)."""
        return sum(b.nbytes for store in (self._k, self._v, self._pos) for b in store.values())


@dataclass
class PassContext:
    """One forward pass over the rows at ``positions`` (a prompt, or one decode step)."""

    model: Any  # aprtrace.model.Model
    positions: np.ndarray
    cache: KVCache | None = None
    wants: Wants = wants_everything
    _rope: dict[Any, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    _last_map_layer: int | None = field(default=None, init=False)

    @property
    def cfg(self) -> ModelConfig:
        return self.model.config

    def builds_attention_maps(self, layer: int) -> bool:
        """Whether block ``layer`` attends through the full ``[heads, seq, seq]`` maps.

        True where this layer's ``attn_scores`` or ``attn_softmax`` is wanted, and in every
        layer before the last such one: the blocked kernel sums in another order, and a
        captured map must be the same bytes as in a run that captures every stage.
        """
        if self._last_map_layer is None:
            maps = (Stage.ATTN_SCORES, Stage.ATTN_SOFTMAX)
            wanted = [i for i in range(self.cfg.num_layers) if any(self.wants(s, i) for s in maps)]
            self._last_map_layer = max(wanted, default=-1)
        return layer <= self._last_map_layer

    def rope(self, key: Any, build: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]):
        """cos/sin tables for this pass's positions, built once per ``key``."""
        if key not in self._rope:
            self._rope[key] = build(self.positions)
        return self._rope[key]

    def keys_values(
        self, layer: int, k: np.ndarray, v: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The keys, values and key positions this pass attends: its own, or cache + its own."""
        if self.cache is None:
            return k, v, self.positions
        return self.cache.extend(layer, k, v, self.positions)


class Architecture:
    """Base of the architecture modules (Llama-style defaults)."""

    def attend(
        self,
        cfg: ModelConfig,
        q: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        layer: int,
        ctx: PassContext,
        emit: Emit,
    ) -> np.ndarray:
        """Causal softmax attention of ``q`` over this pass's keys and values, within the
        layer's window (``cfg.layer_window``), scores soft-capped by
        ``cfg.attn_logit_softcapping`` (Gemma 2): the context ``[seq, heads*d]``. ``q`` is
        ``[seq, heads, d]``, ``k``/``v`` ``[seq, kv_heads, d]`` after RoPE.

        The ``[heads, seq, seq]`` maps are built (and emitted) only where
        ``ctx.builds_attention_maps(layer)``: where they are wanted, and before such a layer.
        Elsewhere the blocked kernel computes the same context without them.
        """
        keys, values, key_pos = ctx.keys_values(layer, k, v)
        scale, window, q_pos = cfg.attention_scale, cfg.layer_window(layer), ctx.positions
        cap = cfg.attn_logit_softcapping
        if not ctx.builds_attention_maps(layer):
            return ops.blocked_attention(q, keys, values, scale, q_pos, key_pos, window, cap)
        mask = ops.attention_mask(q_pos, key_pos, window)
        scores = ops.attention_scores(q, keys, scale, mask, cap)
        scores = emit(Stage.ATTN_SCORES, layer, scores)
        probs = ops.masked_softmax(scores, mask)
        probs = emit(Stage.ATTN_SOFTMAX, layer, probs)
        return ops.attend(probs, values)

    #: ``ModelConfig.architecture`` values this module computes.
    names: tuple[str, ...] = ()

    def expected_shapes(self, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Hugging Face name -> NumPy shape of every tensor the forward pass reads."""
        raise NotImplementedError

    def load_layer(self, model: Any, layer: int) -> Any:
        raise NotImplementedError

    def layer(
        self, cfg: ModelConfig, w: Any, x: np.ndarray, layer: int, ctx: PassContext, emit: Emit
    ) -> np.ndarray:
        raise NotImplementedError

    def embed(self, model: Any, ids: np.ndarray) -> np.ndarray:
        """Embedding rows of ``ids`` ``[seq, hidden]``, decoding only those rows."""
        return model.tensor("model.embed_tokens.weight").take(ids)

    def default_rope(self, ctx: PassContext) -> tuple[np.ndarray, np.ndarray]:
        """The model's RoPE tables: theta, linear scaling and optional ``rope_freqs``."""
        cfg = ctx.cfg
        divisors = ctx.model.optional_weight(ROPE_FREQS, (cfg.rotary_dim // 2,))

        def build(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return ops.rope_tables(
                positions,
                cfg.head_dim,
                cfg.rope_theta,
                divisors,
                cfg.rope_linear_factor,
                cfg.rotary_dim,
            )

        return ctx.rope("default", build)

    def final_norm(self, model: Any, hidden: np.ndarray) -> np.ndarray:
        """The output RMSNorm (``model.norm``) over every position."""
        cfg = model.config
        weight = model.weight("model.norm.weight", (cfg.hidden_size,))
        return ops.rms_norm(hidden, weight, cfg.rms_norm_eps)

    def logits(self, model: Any, h_last: np.ndarray, chunk: int) -> np.ndarray:
        """Logits ``[vocab]`` of one position, decoding the output matrix in row chunks."""
        weight = model.tensor(model.lm_head_name)
        vocab = weight.shape[0]
        out = np.empty(vocab, dtype=np.float32)
        buffer = np.empty(min(chunk, vocab) * weight.shape[1], dtype=np.float32)  # reused
        for start in range(0, vocab, chunk):
            rows = weight.rows(start, start + chunk, buffer)
            out[start : start + rows.shape[0]] = rows @ h_last
        return out
