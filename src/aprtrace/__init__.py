"""aprtrace: capture per-stage tensors of an LLM forward pass and find where two runs diverge.

Byte-compatible with aprender's ``apr trace --save-tensor`` (APRT files) and
``apr diff --values``.
"""

__version__ = "0.1.0"
