"""Logging that a hostile or broken peer cannot turn into a flood."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class RateLimitedLog:
    """Logs a message per key at most once every `interval_s`, and says how many were held back."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 256) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.clock = clock
        self.max_keys = max_keys
        self._last: dict[str, tuple[float, int]] = {}  # key -> (logged at, suppressed since)

    def warning(self, key: str, message: str, *args: object) -> bool:
        """True when this call was logged."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval_s:
            self._last[key] = (last[0], last[1] + 1)
            return False
        if last is None and len(self._last) >= self.max_keys:
            self._last.clear()  # many distinct keys: forget them rather than grow
        suppressed = last[1] if last else 0
        suffix = f" ({suppressed} more like it not logged)" if suppressed else ""
        self.logger.warning(message + suffix, *args)
        self._last[key] = (now, 0)
        return True
