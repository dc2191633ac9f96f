"""Queries per second of the BM25 retriever over the whole local HotpotQA corpus.

Compares the env's retriever (``bm25s`` sparse index) with a naive pure-Python BM25 loop that
scores every paragraph for every query, using the same tokens and the same (Lucene) formula,
and checks that both pick the same best paragraph. Queries are the questions of both splits.

    python bench/retrieval.py [--repeats 3]

The last line is ``speedup: X`` (bm25s queries/s over naive queries/s).
"""

from __future__ import annotations

import argparse
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence

from retroact.envs.hotpotqa_data import all_paragraphs, load_split, split_files
from retroact.envs.retrievers import BM25Retriever, bm25_tokenize


class NaiveBM25:
    """Lucene BM25, scored document by document in plain Python."""

    def __init__(self, docs: Sequence[str], k1: float = 1.5, b: float = 0.75) -> None:
        self.tfs = [Counter(tokens) for tokens in bm25_tokenize(list(docs))]
        self.lengths = [sum(tf.values()) for tf in self.tfs]
        self.avg = sum(self.lengths) / len(self.lengths)
        df = Counter(term for tf in self.tfs for term in tf)
        n = len(self.tfs)
        self.idf = {t: math.log(1 + (n - d + 0.5) / (d + 0.5)) for t, d in df.items()}
        self.k1, self.b = k1, b

    def search(self, query: str, k: int = 5) -> list[tuple[int, float]]:
        terms = [t for t in bm25_tokenize([query])[0] if t in self.idf]
        scores = []
        for i, (tf, length) in enumerate(zip(self.tfs, self.lengths, strict=True)):
            norm = self.k1 * (1 - self.b + self.b * length / self.avg)
            score = sum(self.idf[t] * tf[t] * (self.k1 + 1) / (tf[t] + norm) for t in terms if t in tf)
            scores.append((score, -i))
        return [(-i, s) for s, i in sorted(scores, reverse=True)[:k]]


def _time(search: Callable[[str], list[tuple[int, float]]], queries: Sequence[str], repeats: int
          ) -> tuple[float, list[int]]:
    best, tops = math.inf, []
    for _ in range(repeats):
        start = time.perf_counter()
        tops = [search(q)[0][0] for q in queries]
        best = min(best, time.perf_counter() - start)
    return best, tops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per method; the best counts")
    args = parser.parse_args()

    paras = all_paragraphs((*split_files("test"), *split_files("train")))
    docs = [f"{p.title}: {p.text}" for p in paras]
    queries = [t.payload["question"] for split in ("test", "train") for t in load_split(split)]

    rows = []
    for name, build in (("bm25s (env retriever)", BM25Retriever), ("naive Python loop", NaiveBM25)):
        start = time.perf_counter()
        retriever = build(docs)
        index_s = time.perf_counter() - start
        seconds, tops = _time(retriever.search, queries, args.repeats)
        rows.append((name, index_s, seconds, len(queries) / seconds, tops))

    print(f"corpus: {len(docs)} paragraphs; queries: {len(queries)} questions; best of {args.repeats} passes")
    print(f"{'method':<24}{'index s':>10}{'query s':>10}{'queries/s':>12}")
    for name, index_s, seconds, qps, _ in rows:
        print(f"{name:<24}{index_s:>10.3f}{seconds:>10.3f}{qps:>12.1f}")
    agree = sum(a == b for a, b in zip(rows[0][4], rows[1][4], strict=True)) / len(queries)
    print(f"same top-1 paragraph: {agree:.1%}")
    print(f"speedup: {rows[0][3] / rows[1][3]:.1f}")


if __name__ == "__main__":
    main()
