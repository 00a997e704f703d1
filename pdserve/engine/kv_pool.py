"""Page allocator of the KV pool (plain Python: the tensor lives in the runner).

Pages are integers in [0, num_pages). Paired verbs: `can_alloc` / `alloc` / `free`.
"""

from __future__ import annotations


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 1:
            raise ValueError("the KV pool needs at least one page")
        if page_size < 1:
            raise ValueError("page_size must be >= 1")
        self.num_pages = num_pages
        self.page_size = page_size
        # LIFO: recently freed pages are warm in cache
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._is_free = bytearray(b"\x01") * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    def can_alloc(self, n: int) -> bool:
        return n <= len(self._free)

    def alloc(self, n: int) -> list[int] | None:
        """n pages, or None (nothing taken) when fewer are free."""
        if n > len(self._free):
            return None
        if n == 0:
            return []
        out = self._free[-n:]
        del self._free[-n:]
        for p in out:
            self._is_free[p] = 0
        return out

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if self._is_free[p]:
                raise RuntimeError(f"double free of KV page {p}")
            self._is_free[p] = 1
        self._free.extend(pages)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)
