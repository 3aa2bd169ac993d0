"""Which adapter should be merged into the base right now. Plain Python: no torch here.

An adapter is merged when the operator asked for it (`--merge NAME`, the admin route) or,
with `--auto-merge`, when it computed at least `threshold` of the tokens over the last
`window_s` seconds. After any switch the next waits a full window (hysteresis), so traffic
costs at most one merge and one unmerge per window.

How other requests are served decides when to unmerge (`MergeConfig.others`):
- corrected: they run beside the merged adapter, each of their tokens paying one more LoRA
  pass of its rank, while the merged adapter's tokens pay none. Auto-merge keeps it merged
  while its share of the tokens stays at least `keep_share` (at 0.5 the tokens saved and the
  corrections cost about the same); a pinned adapter stays merged.
- drained: a merged adapter serves its own requests and nobody else's, so it is merged only
  while its requests are the only ones in the engine, and a request for anything else asks
  for an unmerge at once (correctness first).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Mapping

from ..config import MergeConfig


class MergePolicy:
    def __init__(self, config: MergeConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock
        self.pinned: str | None = config.adapter  # the operator's choice, a name
        self.auto = config.auto
        self._tokens: deque[tuple[float, Counter[str | None]]] = deque()
        # Since when the token shares are observed (start-up, or the last switch), and the
        # last switch itself: a new merge waits a full window after it.
        self._observed_since = clock()
        self._switched_at = float("-inf")

    def record(self, tokens: Mapping[str | None, int]) -> None:
        """Tokens computed in one step, by adapter name (None: the base model)."""
        now = self.clock()
        if tokens:
            self._tokens.append((now, Counter(tokens)))
        horizon = now - self.config.window_s
        while self._tokens and self._tokens[0][0] < horizon:
            self._tokens.popleft()

    def switched(self) -> None:
        """A merge or an unmerge finished: the next one waits a full window."""
        self._observed_since = self._switched_at = self.clock()
        self._tokens.clear()

    def pin(self, name: str | None) -> None:
        """The operator's choice (None: no adapter); it takes effect without waiting."""
        self.pinned = name
        self._switched_at = float("-inf")

    def shares(self) -> dict[str | None, float]:
        """Each adapter's share of the tokens computed over the window."""
        total: Counter[str | None] = Counter()
        for _, counts in self._tokens:
            total.update(counts)
        n = sum(total.values())
        return {name: count / n for name, count in total.items()} if n else {}

    def target(self, demand: Collection[str | None], merged: str | None,
               corrected: bool = False) -> str | None:
        """The adapter that should be merged now, given the adapters (None: the base model)
        of every waiting and running request, the one merged now (or being merged), and
        whether other requests run corrected meanwhile."""
        if self.pinned is not None:
            candidate = self.pinned
        elif self.auto:
            keep = merged is not None and (not corrected or self._keeps(merged))
            candidate = merged if keep else self._hot()
        else:
            return None
        if candidate is None or (not corrected and any(name != candidate for name in demand)):
            return None  # someone else needs the base weights
        if candidate != merged and self.clock() - self._switched_at < self.config.window_s:
            return None
        return candidate

    def _keeps(self, merged: str) -> bool:
        """A corrected merge's hysteresis: kept until a full window shows its share below
        `keep_share`."""
        return (self.clock() - self._observed_since < self.config.window_s
                or self.shares().get(merged, 0.0) >= self.config.keep_share)

    def _hot(self) -> str | None:
        if self.clock() - self._observed_since < self.config.window_s:
            return None  # not a full window of traffic seen yet
        for name, share in self.shares().items():
            if name is not None and share >= self.config.threshold:
                return name
        return None
