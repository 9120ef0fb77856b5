"""The paged KV cache's bookkeeping: which physical block holds which tokens of which request.

No tensors here: block ids only, so every rule is tested on a CPU without a model. Each group's
tables are kept twice: as lists (what the rules read) and as rows of one numpy array (`TableRows`,
what the runner gathers for a step in one indexing operation rather than converting every list of
every request at every step; a table at 8k tokens has 512 entries).

gpt-oss alternates full-attention and sliding-window (128-token) layers. The layers form two groups,
each with its own block table per request, drawing on ONE pool of block ids. The runner lays the
cache out so that block b of the pool is a slice of every cache tensor, each tensor shared by one
full layer and one sliding layer (gpt-oss has as many of each), so a block id means the same bytes
whichever group holds it (the idea of vLLM's hybrid KV cache manager, vllm-project/vllm#17996).
A full-attention group keeps every block of a request. A sliding group frees the blocks that fell
out of the window before each step and puts the reserved null block (id 0) in their table entry, so
a sliding layer holds at most ceil((window - 1 + chunk) / block_size) + 1 blocks per request
whatever its length; attention never reads a freed entry.

Prefix caching: a block that is full gets a hash chained over its tokens (and the adapter the
request runs with: different adapters write different keys). Blocks of finished requests keep
their hash while unused and go to the end of the free queue (LRU): a later request with the same
prefix takes them back instead of recomputing; allocation evicts from the front. For a sliding
group a prefix of L tokens is a hit only when the blocks covering its last window are cached too.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

NULL_BLOCK = 0


def block_hashes(
    token_ids: Sequence[int], block_size: int, salt: str = "", start: list[int] | None = None, stop: int | None = None
) -> list[int]:
    """Chained hashes of the full blocks of `token_ids` (the first `stop` blocks when given); `start`:
    hashes already computed, extended in place."""
    hashes = start if start is not None else []
    parent = hashes[-1] if hashes else int.from_bytes(hashlib.blake2b(salt.encode(), digest_size=8).digest(), "little")
    end = len(token_ids) // block_size if stop is None else stop
    for i in range(len(hashes), end):
        chunk = token_ids[i * block_size : (i + 1) * block_size]
        h = hashlib.blake2b(parent.to_bytes(8, "little"), digest_size=8)
        h.update(b"".join(t.to_bytes(4, "little") for t in chunk))
        parent = int.from_bytes(h.digest(), "little")
        hashes.append(parent)
    return hashes


@dataclass
class _Block:
    ref_count: int = 0
    key: tuple[str, int] | None = None  # (group, hash) while its content is registered in the cache


class BlockPool:
    """Block ids 1..num_blocks-1 (0 is the null block), reference counts, the cached-block map and
    the LRU free queue."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks (block 0 is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [_Block() for _ in range(num_blocks)]
        self.blocks[NULL_BLOCK].ref_count = 1  # never free, never allocated
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self.cached: dict[tuple[str, int], int] = {}

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - 1 - len(self.free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise MemoryError(f"{n} KV blocks asked, {len(self.free)} free")
        out = []
        for _ in range(n):
            b, _ = self.free.popitem(last=False)  # least recently freed first
            block = self.blocks[b]
            if block.key is not None:  # evict its cached content
                del self.cached[block.key]
                block.key = None
            block.ref_count = 1
            out.append(b)
        return out

    def release(self, ids: Sequence[int]) -> None:
        """Drop one reference from each; blocks reaching zero go to the end of the free queue (in the
        order given: pass a request's blocks tail first, so its prefix is evicted last)."""
        for b in ids:
            if b == NULL_BLOCK:
                continue
            block = self.blocks[b]
            if block.ref_count <= 0:
                raise AssertionError(f"KV block {b} released more often than taken")
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[b] = None  # its registered content (if any) stays until evicted

    def lookup(self, group: str, h: int) -> int | None:
        return self.cached.get((group, h)) if self.enable_caching else None

    def take(self, b: int) -> None:
        """One more reference to a cached block (a prefix hit)."""
        block = self.blocks[b]
        if block.ref_count == 0:
            del self.free[b]
        block.ref_count += 1

    def register(self, group: str, h: int, b: int) -> None:
        """Record that block b of `group` holds the tokens hashed to h (a no-op when another block
        already does, or when b already has content registered)."""
        if not self.enable_caching:
            return
        key = (group, h)
        block = self.blocks[b]
        if key in self.cached or block.key is not None:
            return
        self.cached[key] = b
        block.key = key


class TableRows:
    """One group's block tables as rows of an int32 array that grows as needed; a row's entries past
    its table's length are the null block."""

    def __init__(self) -> None:
        self.array = np.zeros((64, 64), dtype=np.int32)  # (rows, entries)

    def write(self, row: int, start: int, blocks: Sequence[int]) -> None:
        end = start + len(blocks)
        rows, cols = self.array.shape
        if row >= rows or end > cols:
            grown = np.zeros((max(rows, 2 * row + 2), max(cols, 2 * end)), dtype=np.int32)
            grown[:rows, :cols] = self.array
            self.array = grown
        self.array[row, start:end] = blocks

    def clear(self, row: int, length: int) -> None:
        if length:
            self.array[row, :length] = NULL_BLOCK


@dataclass
class KVGroup:
    name: str
    window: int | None  # None: full attention


@dataclass
class _Tables:
    tables: dict[str, list[int]] = field(default_factory=dict)
    hashes: list[int] = field(default_factory=list)  # of the request's full blocks, all known tokens
    registered: int = 0  # blocks whose hash is registered (a prefix of `hashes`)
    # group -> leading table entries already out of the window (NULL_BLOCK): each step looks at the
    # entries past these only, not at the whole table again.
    dropped: dict[str, int] = field(default_factory=dict)
    row: int = -1  # this request's row in every group's TableRows


class KVCacheManager:
    """Block tables of every request, for each attention group, over one `BlockPool`."""

    def __init__(self, num_blocks: int, block_size: int, groups: Sequence[KVGroup], enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.groups = list(groups)
        self.pool = BlockPool(num_blocks, enable_caching)
        self.requests: dict[str, _Tables] = {}
        self.rows = {g.name: TableRows() for g in self.groups}
        self._free_rows: list[int] = []
        self._num_rows = 0

    def _state(self, request_id: str) -> _Tables:
        state = self.requests.get(request_id)
        if state is None:
            row = self._free_rows.pop() if self._free_rows else self._num_rows
            self._num_rows = max(self._num_rows, row + 1)
            state = self.requests[request_id] = _Tables(tables={g.name: [] for g in self.groups}, row=row)
        return state

    # ---- sizing ----

    def blocks_for(self, group: KVGroup, first_pos: int, end_pos: int) -> int:
        """Blocks a group holds while computing positions [first_pos, end_pos)."""
        bs = self.block_size
        if group.window is None:
            return -(-end_pos // bs)
        lo = max(0, first_pos - group.window + 1) // bs
        return -(-end_pos // bs) - lo

    def max_blocks_needed(self, total_len: int, chunk: int) -> int:
        """The most blocks one request of `total_len` tokens ever holds when computed `chunk` tokens a
        step: what must fit in the pool for it to run at all."""
        most = 0
        for g in self.groups:
            if g.window is None:
                most += -(-total_len // self.block_size)
            else:
                span = min(total_len, g.window - 1 + chunk)
                most += -(-span // self.block_size) + 1
        return most

    # ---- per request ----

    def tables(self, request_id: str) -> dict[str, list[int]]:
        return self.requests[request_id].tables

    def row(self, request_id: str) -> int:
        return self.requests[request_id].row

    def cached_prefix(self, request_id: str, token_ids: Sequence[int], salt: str) -> int:
        """Take the longest cached prefix for a request that holds no blocks; returns its length in
        tokens (a multiple of the block size, < len(token_ids) so at least one token is computed)."""
        state = self._state(request_id)
        if any(state.tables.values()):
            raise AssertionError(f"request {request_id} already holds KV blocks")
        state.hashes = block_hashes(token_ids, self.block_size, salt)
        if not self.pool.enable_caching:
            return 0
        bs = self.block_size
        limit = (len(token_ids) - 1) // bs  # whole blocks that may come from the cache
        full_hits = limit
        for g in self.groups:
            if g.window is None:
                n = 0
                while n < full_hits and self.pool.lookup(g.name, state.hashes[n]) is not None:
                    n += 1
                full_hits = n
        n_blocks = full_hits
        while n_blocks > 0 and not all(self._window_cached(g, state.hashes, n_blocks) for g in self.groups if g.window):
            n_blocks -= 1
        if n_blocks == 0:
            return 0
        length = n_blocks * bs
        for g in self.groups:
            table = state.tables[g.name]
            lo = 0 if g.window is None else max(0, length - g.window + 1) // bs
            for j in range(n_blocks):
                if j < lo:
                    table.append(NULL_BLOCK)
                else:
                    b = self.pool.lookup(g.name, state.hashes[j])
                    self.pool.take(b)
                    table.append(b)
            self.rows[g.name].write(state.row, 0, table)
        state.registered = n_blocks
        return length

    def _window_cached(self, g: KVGroup, hashes: list[int], n_blocks: int) -> bool:
        length = n_blocks * self.block_size
        lo = max(0, length - g.window + 1) // self.block_size
        return all(self.pool.lookup(g.name, hashes[j]) is not None for j in range(lo, n_blocks))

    def allocate(self, request_id: str, num_computed: int, num_new: int) -> bool:
        """Make room for positions [num_computed, num_computed + num_new). Sliding groups first drop
        the blocks that no query from num_computed on can see. False (nothing allocated) when the
        pool is short; the request keeps what it had."""
        state = self._state(request_id)
        bs = self.block_size
        end = num_computed + num_new
        for g in self.groups:
            if g.window is None:
                continue
            table = state.tables[g.name]
            start = state.dropped.get(g.name, 0)
            stop = min(max(0, num_computed - g.window + 1) // bs, len(table))  # blocks before `stop`: out
            if stop <= start:
                continue
            dropped = [b for b in table[start:stop] if b != NULL_BLOCK]
            table[start:stop] = [NULL_BLOCK] * (stop - start)
            self.rows[g.name].write(state.row, start, table[start:stop])
            state.dropped[g.name] = stop
            self.pool.release(dropped[::-1])
        end_blocks = -(-end // bs)
        need = [(name, end_blocks - len(table)) for name, table in state.tables.items()]
        total = sum(n for _, n in need if n > 0)
        if total == 0:  # most decode steps: the last block has room
            return True
        if total > self.pool.num_free:
            return False
        for name, n in need:
            if n > 0:
                table = state.tables[name]
                new = self.pool.allocate(n)
                self.rows[name].write(state.row, len(table), new)
                table.extend(new)
        return True

    def commit(self, request_id: str, token_ids: Sequence[int], num_computed: int, salt: str) -> None:
        """Register the hashes of blocks that are now full of computed tokens (prefix caching)."""
        state = self.requests[request_id]
        full = num_computed // self.block_size
        if full <= state.registered or not self.pool.enable_caching:
            return
        if len(state.hashes) < full:
            state.hashes = block_hashes(token_ids, self.block_size, salt, state.hashes, stop=full)
        for j in range(state.registered, full):
            for g in self.groups:
                b = state.tables[g.name][j]
                if b != NULL_BLOCK:
                    self.pool.register(g.name, state.hashes[j], b)
        state.registered = full

    def free(self, request_id: str) -> None:
        state = self.requests.pop(request_id, None)
        if state is None:
            return
        for name, table in state.tables.items():
            self.pool.release(table[::-1])
            self.rows[name].clear(state.row, len(table))
        self._free_rows.append(state.row)

    @property
    def num_used(self) -> int:
        return self.pool.num_used
