"""Token texts for a diff's positions and lm_head ids, from the tokenizer of a dump's model.

The manifest names the model each dump was traced from; when that file is still there its
tokenizer decodes the prompt's tokens (so ``token 3`` can read ``token 3 '2'``) and the
lm_head's top ids. Dumps without a manifest, or whose model is gone, simply have no texts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aprtrace.errors import AprtraceError


@dataclass
class TokenTexts:
    """Decoded token texts: the prompt's (A's token ids) and any id asked for."""

    source: str  # the model file whose tokenizer decoded them
    prompt: list[str]
    _tokenizer: Any = field(repr=False, default=None)

    def text(self, token_id: int) -> str:
        try:
            return self._tokenizer.decode([int(token_id)], skip_special_tokens=False)
        except Exception:  # an id the tokenizer does not know: show none
            return ""


def token_texts(manifests: list[Any]) -> TokenTexts | None:
    """Texts from the first manifest whose model file still exists and has a tokenizer."""
    ids = next((list(m.token_ids) for m in manifests if m is not None and m.token_ids), None)
    for manifest in manifests:
        if manifest is None:
            continue
        path = manifest.model.get("path")
        if not isinstance(path, str) or not Path(path).exists():
            continue
        try:
            from aprtrace.formats import load_model

            tokenizer = load_model(Path(path), verify=False).tokenizer
        except (AprtraceError, OSError, ValueError):
            continue
        if tokenizer is None:
            continue
        texts = TokenTexts(path, [], tokenizer)
        texts.prompt = [texts.text(t) for t in ids or []]
        return texts
    return None
