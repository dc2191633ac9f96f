"""Key/value caches carried from one agent step to the next.

An episode's context only grows: the request of step t+1 is the request of step t, the sampled
action and the new observation. Re-reading it all every step costs O(steps²) prefill tokens. The
policy keeps, per episode, the keys and values of every token it has read and sampled, and the
next request whose ids start with those tokens only feeds what is new.

Rows are stored without padding (one ``[heads, tokens, head_dim]`` tensor per layer) and
assembled into a left-padded batch for each call, so rows from different calls and chunks mix
freely. A row is taken out when used (its extension replaces it); the least recently stored rows
go first when the byte budget is exceeded. Rows are valid for one owner (role adapter and policy
version): a different owner empties the cache, so weights that changed are never mixed with old
keys. Models whose cache is not a plain full-attention cache (sliding windows, recurrent layers)
are simply not cached.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


@dataclass
class CachedRow:
    ids: tuple[int, ...]
    """The tokens whose keys and values are held, in order."""
    keys: list[torch.Tensor]
    """Per layer, ``[heads, len(ids), head_dim]``."""
    values: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


class PrefixCache:
    """Rows of earlier calls, found by the longest stored prefix of a request's ids."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._rows: OrderedDict[tuple[int, ...], CachedRow] = OrderedDict()
        self._owner: Hashable = None
        self._bytes = 0

    def take(self, owner: Hashable, ids: Sequence[int]) -> CachedRow | None:
        """Remove and return the longest stored row that is a proper prefix of ``ids``.

        Proper, so at least one token is left to feed: its logits give the next token.
        """
        if owner != self._owner:
            self.clear()
            self._owner = owner
        for n in sorted({len(k) for k in self._rows if len(k) < len(ids)}, reverse=True):
            row = self._rows.pop(tuple(ids[:n]), None)
            if row is not None:
                self._bytes -= row.nbytes
                return row
        return None

    def put(self, row: CachedRow) -> None:
        if self.max_bytes <= 0 or not row.ids:
            return
        old = self._rows.pop(row.ids, None)
        self._bytes += row.nbytes - (old.nbytes if old else 0)
        self._rows[row.ids] = row
        while self._bytes > self.max_bytes and self._rows:
            self._bytes -= self._rows.popitem(last=False)[1].nbytes

    def clear(self) -> None:
        self._rows.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._rows)


def assemble(
    rows: Sequence[CachedRow | None], device: torch.device
) -> tuple[DynamicCache | None, torch.Tensor]:
    """A batch cache of ``rows`` right-aligned (left padding) and its ``[batch, width]`` 0/1 mask;
    no cache when no row has one."""
    width = max((len(r.ids) for r in rows if r is not None), default=0)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    if width == 0:
        return None, mask.to(device)
    ref = next(r for r in rows if r is not None)
    layers = []
    for layer in range(len(ref.keys)):
        pair = []
        for parts in (ref.keys, ref.values):
            heads, _, dim = parts[layer].shape
            pair.append(parts[layer].new_zeros((len(rows), heads, width, dim)))
        for b, row in enumerate(rows):
            if row is not None:
                pair[0][b, :, width - len(row.ids) :] = row.keys[layer]
                pair[1][b, :, width - len(row.ids) :] = row.values[layer]
        layers.append((pair[0], pair[1]))
    for b, row in enumerate(rows):
        if row is not None:
            mask[b, width - len(row.ids) :] = 1
    return DynamicCache(ddp_cache_data=layers), mask.to(device)


def cacheable(cache: object) -> bool:
    """Whether rows can be cut out of this model's cache and put back (plain full attention)."""
    return isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)


def extract(cache: DynamicCache, slot: int, mask: torch.Tensor, ids: Sequence[int]) -> CachedRow:
    """Row ``slot`` of a batch cache without its padding; ``mask`` is that row's 0/1 mask over the
    cache positions and ``ids`` the tokens at its ones."""
    keep = mask.nonzero().squeeze(-1)
    if len(keep) != len(ids):
        raise ValueError(f"cache row holds {len(keep)} tokens, expected {len(ids)}")
    return CachedRow(
        ids=tuple(ids),
        keys=[layer.keys[slot].index_select(-2, keep) for layer in cache.layers],
        values=[layer.values[slot].index_select(-2, keep) for layer in cache.layers],
    )
