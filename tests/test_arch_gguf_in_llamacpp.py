"""The GGUF files aprtrace writes for the issue-10 architectures are what llama.cpp expects.

llama.cpp (the ``cyllama`` wheel) loads each tiny F32 GGUF written by ``write_gguf`` (Phi-3's
fused ``attn_qkv`` / ``ffn_up``, OLMo 2's post-norm names, Granite's ``*_scale`` keys and
permuted Q/K, StableLM / StarCoder2's LayerNorm biases and ``layer_norm_epsilon``) and computes
the last position's logits with its own graph; they must equal aprtrace's within llama.cpp's
f16 KV cache rounding. The models have no sliding window: this llama.cpp build ignores
Phi-3's, Mistral's and StarCoder2's windows (measured: relative logit error ~1 with a window
of 8 on a 20-token prompt, 1e-3 without), which the README lists as a llama.cpp divergence.
"""

from __future__ import annotations

import numpy as np
import pytest

import hfref
from aprtrace.formats import load_model
from aprtrace.forward import forward
from archref import PROMPT, build_files

pytest.importorskip("cyllama", reason="the llama.cpp check needs the `llamacpp` extra")

from aprtrace.engines.llamacpp import _request, run_child  # noqa: E402

pytestmark = pytest.mark.reference

ARCHS = ("phi3", "olmo2", "granite", "stablelm", "starcoder2", "mistral")
# llama.cpp keeps K and V in f16: measured max relative logit error 2e-5 .. 1e-3 here.
RELATIVE_BOUND = 5e-3


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tok = hfref.tiny_tokenizer()
    root = tmp_path_factory.mktemp("llamacpp_archs")
    return build_files(ARCHS, tok, root, windowed=False), tok.encode(PROMPT).ids


def llamacpp_logits(path, ids) -> np.ndarray:
    _, messages = run_child(_request("trace", str(path), tokens=list(ids), names=[]))
    (logits,) = [np.frombuffer(p, "<f4") for h, p in messages if h.get("kind") == "logits"]
    return logits


@pytest.mark.parametrize("arch", ARCHS)
def test_llamacpp_computes_the_same_logits(arch, files):
    built, ids = files
    path, _ = built[(arch, "gguf-F32")]
    ours = forward(load_model(path), ids)
    theirs = llamacpp_logits(path, ids)
    assert theirs.shape == ours.shape
    err = float(np.max(np.abs(theirs - ours)) / np.max(np.abs(ours)))
    assert err <= RELATIVE_BOUND, f"{arch}: relative logit error {err:.3g}"
    assert int(np.argmax(theirs)) == int(np.argmax(ours))
