"""Streams a long document's embeddings paragraph by paragraph, as each is computed.

    isopool serve --model isopool.examples.stream_embeddings:ParagraphEmbedder
    isopool infer --stream @document.json          # a JSON string: the document

Input: a string; paragraphs are separated by blank lines. Each part:
{"paragraph": i, "chars": length, "embedding": float32 array (384,)}.
"""

from __future__ import annotations

import re
from typing import Any, Iterator

from .embeddings import load


def paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


class ParagraphEmbedder:
    def __init__(self, context) -> None:
        self.model = load(context.device)

    def __call__(self, document: Any) -> Iterator[dict]:
        if not isinstance(document, str):
            raise TypeError("send the document as one string")
        for i, paragraph in enumerate(paragraphs(document)):
            vector = self.model.encode([paragraph], convert_to_numpy=True, show_progress_bar=False)[0]
            yield {"paragraph": i, "chars": len(paragraph), "embedding": vector}
