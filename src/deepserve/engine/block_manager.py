"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts, prefix caching.

A block holds ``block_size`` tokens of K/V for every layer. A full block is named by
a BLAKE2b digest chained over the token ids of the whole prefix up to its end (and
the sequence's cache salt), so two sequences with the same first N*block_size tokens
and the same salt share N blocks. Freed blocks that carry a digest stay findable (LRU
order) until a new allocation needs them.

A digest match alone never serves a block: the block's own tokens and the identity
of the block before it are checked too, so even a digest collision cannot hand one
request another's KV. Each registered block gets a fresh content id; a block records
its parent's content id (or the salt's root digest), so a child whose parent block
was evicted and reused for other tokens no longer matches.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from deepserve.engine.sequence import Sequence


def block_digest(parent: bytes, tokens: list[int]) -> bytes:
    """Collision-resistant name of a block: BLAKE2b over the parent digest and token ids."""
    h = hashlib.blake2b(parent, digest_size=32)
    h.update(array("q", tokens).tobytes())
    return h.digest()


def salt_root(salt: str | None) -> bytes:
    """The digest a sequence's first block chains from: empty without a salt."""
    if not salt:
        return b""
    return hashlib.blake2b(b"deepserve-cache-salt\0" + salt.encode("utf-8", "replace"),
                           digest_size=32).digest()


class BlockManager:
    """Hands out KV blocks to sequences and finds cached prefixes again."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        # What a cached block holds, checked on every hit: its tokens and its parent
        # (the parent's content id, or the salt root digest for a first block).
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.block_parent: list[int | bytes | None] = [None] * num_blocks
        self.block_cid: list[int] = [0] * num_blocks
        self._next_cid = 1
        self.digest = block_digest  # replaceable (tests force collisions)
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.evictable: OrderedDict[int, None] = OrderedDict()  # ref 0 but still cached
        self.cached: dict[bytes, int] = {}  # prefix digest -> block id
        self.queried_tokens = 0
        self.hit_tokens = 0

    # -- capacity -------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free_blocks) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- allocation -----------------------------------------------------------------
    def _take(self) -> int:
        if self.free_blocks:
            block = self.free_blocks.popleft()
        else:
            block, _ = self.evictable.popitem(last=False)
            self._forget(block)
        self.ref_count[block] = 1
        return block

    def _forget(self, block: int) -> None:
        """Drop a cached block's prefix-cache entry and what it held."""
        old = self.block_hash[block]
        if old is not None and self.cached.get(old) == block:
            del self.cached[old]
        self.block_hash[block] = None
        self.block_tokens[block] = None
        self.block_parent[block] = None
        self.block_cid[block] = 0

    def ensure(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow ``seq``'s block table to hold ``num_tokens``; False (no change) if full."""
        extra = self.blocks_needed(num_tokens) - len(seq.block_table)
        if extra <= 0:
            return True
        if extra > self.num_free:
            return False
        seq.block_table.extend(self._take() for _ in range(extra))
        return True

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that no sequence holds (they become plain free
        blocks); blocks in use keep their entries."""
        for block in list(self.evictable):
            self._forget(block)
            self.free_blocks.append(block)
        self.evictable.clear()

    def free(self, seq: Sequence) -> None:
        """Release a sequence's blocks; cached ones stay findable, the tail evicted first."""
        for block in reversed(seq.block_table):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                if self.block_hash[block] is not None:
                    self.evictable[block] = None
                else:
                    self.free_blocks.append(block)
        seq.block_table = []
        seq.num_hashed_blocks = 0
        seq.block_hashes = []
        seq.block_cids = []

    # -- prefix caching -------------------------------------------------------------
    def _block_tokens(self, seq: Sequence, index: int) -> list[int]:
        start = index * self.block_size
        return seq.tokens[start:start + self.block_size]

    def _hash_block(self, seq: Sequence, index: int) -> bytes:
        parent = seq.block_hashes[index - 1] if index else salt_root(seq.cache_salt)
        return self.digest(parent, self._block_tokens(seq, index))

    def _parent_key(self, seq: Sequence, index: int) -> int | bytes:
        if index == 0:
            return salt_root(seq.cache_salt)
        return seq.block_cids[index - 1]

    def match_prefix(self, seq: Sequence, count: bool = True) -> int:
        """Attach cached blocks for the longest cached prefix of a fresh sequence.

        Returns the number of tokens served from cache. At least one token is always
        left to compute, since the last position's logits are needed to sample.
        ``count`` adds the lookup to the hit-rate statistics (first admission only).
        """
        assert not seq.block_table
        if not self.enable_prefix_caching:
            return 0
        max_blocks = (seq.num_tokens - 1) // self.block_size
        if count:
            self.queried_tokens += seq.num_tokens
        for index in range(max_blocks):
            h = self._hash_block(seq, index)
            block = self.cached.get(h)
            if block is None or not self._holds(block, seq, index):
                break
            if self.ref_count[block] == 0:
                del self.evictable[block]
            self.ref_count[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            seq.block_cids.append(self.block_cid[block])
        seq.num_hashed_blocks = len(seq.block_table)
        hit = seq.num_hashed_blocks * self.block_size
        if count:
            self.hit_tokens += hit
        return hit

    def _holds(self, block: int, seq: Sequence, index: int) -> bool:
        """True only if the cached block holds exactly this sequence's block ``index``."""
        return (self.block_parent[block] == self._parent_key(seq, index)
                and self.block_tokens[block] == tuple(self._block_tokens(seq, index)))

    def register_computed(self, seq: Sequence) -> None:
        """Make the sequence's newly completed full blocks findable by later requests."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed // self.block_size
        while seq.num_hashed_blocks < full:
            index = seq.num_hashed_blocks
            h = self._hash_block(seq, index)
            seq.block_hashes.append(h)
            block = seq.block_table[index]
            parent = self._parent_key(seq, index)
            other = self.cached.get(h)
            if parent == 0:
                cid = 0  # the prefix before it could not be verified: never shared
            elif other is None and self.block_hash[block] is None:
                self.block_tokens[block] = tuple(self._block_tokens(seq, index))
                self.block_parent[block] = parent
                cid = self.block_cid[block] = self._next_cid
                self._next_cid += 1
                self.cached[h] = block
                self.block_hash[block] = h
            elif other is not None and self._holds(other, seq, index):
                cid = self.block_cid[other]  # same content computed twice: same identity
            else:
                cid = 0  # digest taken by other content (a collision): not shared
            seq.block_cids.append(cid)
            seq.num_hashed_blocks += 1
