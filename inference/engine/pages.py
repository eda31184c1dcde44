"""The KV page pool's bookkeeping on the host: free list, reference counts, prefix table, LRU (no JAX).

`PagePool(num_pages, page_size, prefix_caching=True)` hands out page numbers of the device pool
(jaxmodel/kv_cache.py's `KVPages`); it never touches the pages themselves. Every page is in exactly one
of three states:

- free: holds nothing anyone can find (never written, or evicted);
- used: refcount > 0, in the page table of that many running sequences (shared pages are read-only
  prefix pages: a sequence writes only positions past its prefix hit);
- cached: refcount 0 but registered, so a later prompt can find it; evicted least-recently-used
  when the free list runs dry.

Prefix table: a FULL page is registered under the key (parent key id, tuple of its page_size tokens),
the parent being the key of the page before it in its sequence (the root for the first page). The key
is the exact tokens, not a hash of them, so two different prefixes never collide; a page's key names its
whole prefix through the chain of ids. Ids are never reused: when a page is evicted its key goes, and
any registered page chained below it becomes unreachable (it ages out of the LRU), never mismatched.
A page's K/V depends on every token before it, which is why the chain, not the page's tokens alone, is
the key.
"""

from collections import OrderedDict

ROOT = 0  # the parent id of a sequence's first page


class PagePool:
    """Page numbers of one device pool: allocation, sharing by refcount, prefix lookup, LRU eviction."""

    def __init__(self, num_pages: int, page_size: int, prefix_caching: bool = True):
        if int(num_pages) < 1 or int(page_size) < 1:
            raise ValueError(f"a page pool needs num_pages >= 1 and page_size >= 1, got {num_pages} and {page_size}")
        self.num_pages = int(num_pages)
        self.page_size = int(page_size)
        self.prefix_caching = bool(prefix_caching)
        self._refs = [0] * self.num_pages
        self._free = list(range(self.num_pages - 1, -1, -1))  # a stack: pop() hands out page 0 first
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached pages, least recently used first
        self._table: dict[tuple, int] = {}  # key -> page
        self._key_of: dict[int, tuple[tuple, int]] = {}  # registered page -> (key, key id)
        self._next_id = ROOT + 1
        # Bumped whenever match() or allocate() could give more than before (a page released, a key
        # added): a waiting sequence refused pages is not retried (a long prompt's match costs one dict
        # lookup per page) until it changes.
        self.version = 0

    # -- counts (metrics) ------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._lru)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free) - len(self._lru)

    @property
    def num_available(self) -> int:
        """Pages allocate() can hand out now: free ones and evictable cached ones."""
        return len(self._free) + len(self._lru)

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def registered(self, page: int) -> bool:
        return page in self._key_of

    # -- the four operations ---------------------------------------------------------------------
    def match(self, tokens) -> tuple[list[int], list[int]]:
        """The longest chain of registered full pages spelling a prefix of `tokens`: (pages, key ids).

        Each matched page gains a reference (a cached one leaves the LRU: it is used again). Only whole
        pages match; callers that need the last token computed pass tokens[:-1]."""
        pages, keys = [], []
        if not self.prefix_caching:
            return pages, keys
        parent, size = ROOT, self.page_size
        for i in range(len(tokens) // size):
            page = self._table.get((parent, tuple(tokens[i * size:(i + 1) * size])))
            if page is None:
                break
            self._take(page)
            pages.append(page)
            parent = self._key_of[page][1]
            keys.append(parent)
        return pages, keys

    def allocate(self, n: int) -> list[int] | None:
        """n pages with refcount 1, from the free list, then by evicting the least recently used cached
        pages; None, taking nothing, when fewer than n are available."""
        if n > self.num_available:
            return None
        pages = []
        for _ in range(n):
            if self._free:
                page = self._free.pop()
            else:
                page, _ = self._lru.popitem(last=False)
                key, _ = self._key_of.pop(page)
                del self._table[key]
            self._refs[page] = 1
            pages.append(page)
        return pages

    def register(self, pages, tokens, upto: int, keys: list[int]) -> None:
        """Make the full pages of `tokens` that end at or before position `upto` findable.

        `pages` is a sequence's page table, `keys` the ids of its first len(keys) pages (from match()
        and earlier calls), extended here. A page whose key is already registered (the same prefix
        computed twice, e.g. by two prompts admitted together) stays unregistered and is freed with its
        sequence; the chain continues through the existing key."""
        if not self.prefix_caching:
            return
        size = self.page_size
        for i in range(len(keys), min(upto, len(tokens)) // size):
            key = (keys[-1] if keys else ROOT, tuple(tokens[i * size:(i + 1) * size]))
            page = self._table.get(key)
            if page is None:
                page = pages[i]
                self._table[key] = page
                self._key_of[page] = (key, self._next_id)
                self._next_id += 1
                self.version += 1
            keys.append(self._key_of[page][1])

    def release(self, pages) -> None:
        """Drop one reference to each page; unreferenced registered pages become cached (most recently
        used), unreferenced unregistered ones free."""
        for page in pages:
            if self._refs[page] < 1:
                raise ValueError(f"page {page} released more often than taken")
            self._refs[page] -= 1
            if self._refs[page] == 0:
                self.version += 1
                if page in self._key_of:
                    self._lru[page] = None
                else:
                    self._free.append(page)

    def _take(self, page: int) -> None:
        if self._refs[page] == 0:
            del self._lru[page]  # used again; it re-enters the LRU at the tail when released
        self._refs[page] += 1
