"""Integer comparison of index payloads (``moe_router_indices``: expert ids stored as f32).

Cosine or max|d| of expert ids means nothing (expert 7 is not "close" to expert 8), so a pair
of index stages is compared per token: does each token select the same set of experts, and
in the same order? The buffer is ``[tokens, top_k]`` flattened; a buffer of unknown shape
is one token (aprender writes the last position's ``top_k`` ids only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class IndexAgreement:
    """Per-token agreement of two index buffers."""

    tokens: int
    top_k: int
    same_set: int  # tokens selecting the same experts, in any order
    same_order: int  # tokens selecting the same experts in the same order
    invalid: int  # values that are not non-negative integers (NaN, Inf, fractions, < 0)
    first_differing_token: int | None  # first token whose sets differ

    @property
    def set_agreement(self) -> float:
        return self.same_set / self.tokens if self.tokens else 1.0

    @property
    def order_agreement(self) -> float:
        return self.same_order / self.tokens if self.tokens else 1.0

    @property
    def passed(self) -> bool:
        return self.invalid == 0 and self.same_set == self.tokens

    @property
    def reason(self) -> str:
        text = (
            f"expert sets agree on {self.same_set}/{self.tokens} tokens "
            f"(same order {self.same_order}/{self.tokens})"
        )
        if self.invalid:
            text += f"; {self.invalid} values are not expert ids"
        if self.first_differing_token is not None:
            text += f"; first differing token {self.first_differing_token}"
        return text

    def to_json(self) -> dict:
        return {
            "tokens": self.tokens,
            "top_k": self.top_k,
            "same_set": self.same_set,
            "same_order": self.same_order,
            "set_agreement": self.set_agreement,
            "order_agreement": self.order_agreement,
            "invalid_values": self.invalid,
            "first_differing_token": self.first_differing_token,
        }


def _as_ids(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ids as int64, mask of valid ids)``; invalid entries become -1."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    valid = np.isfinite(v) & (v >= 0) & (v == np.round(v))
    return np.where(valid, v, -1).astype(np.int64), valid


def index_agreement(a: np.ndarray, b: np.ndarray, shape: tuple[int, ...] | None) -> IndexAgreement:
    """Compare two equally long index buffers token by token (``shape`` ``[tokens, top_k]``
    or ``[top_k]``; None: one token)."""
    ids_a, valid_a = _as_ids(a)
    ids_b, valid_b = _as_ids(b)
    top_k = int(shape[-1]) if shape else ids_a.size
    if top_k <= 0 or ids_a.size % top_k:
        top_k = ids_a.size
    tokens = ids_a.size // top_k if top_k else 0
    rows_a = ids_a.reshape(tokens, top_k)
    rows_b = ids_b.reshape(tokens, top_k)
    same_order = np.all(rows_a == rows_b, axis=1)
    same_set = np.all(np.sort(rows_a, axis=1) == np.sort(rows_b, axis=1), axis=1)
    invalid = int(np.count_nonzero(~valid_a) + np.count_nonzero(~valid_b))
    bad = np.flatnonzero(~same_set)
    return IndexAgreement(
        tokens=tokens,
        top_k=top_k,
        same_set=int(same_set.sum()),
        same_order=int(same_order.sum()),
        invalid=invalid,
        first_differing_token=int(bad[0]) if bad.size else None,
    )
