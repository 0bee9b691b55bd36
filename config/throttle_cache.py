"""Where the API's throttles keep their counters: the shared cache (Redis), and while it is down a
local one.

Decision (issue 9): with the cache down, throttling fails open to a per-process fallback rather
than failing every request. Each web process then counts on its own, so for the outage the limits
are per process, not shared; login lockout (django-axes) is unaffected, as it counts in the
database. After a failure the shared cache is not asked again for CACHE_RETRY_AFTER seconds, so an
outage costs one socket timeout per process, not one per request.
"""

from __future__ import annotations

import logging
import threading
import time

from django.conf import settings
from django.core.cache import caches
from django.core.cache.backends.locmem import LocMemCache

log = logging.getLogger("chainsaga.outage")


class FallbackCache:
    """The get/set subset DRF's throttles use, over settings' default cache with a local fallback."""

    def __init__(self, alias: str = "default"):
        self.alias = alias
        self.local = LocMemCache("throttle-fallback", {})
        self._down_until = 0.0
        self._lock = threading.Lock()

    def get(self, key, default=None):
        return self._call("get", key, default)

    def set(self, key, value, timeout=None):
        return self._call("set", key, value, timeout)

    def _call(self, method: str, *args):
        if time.monotonic() >= self._down_until:
            try:
                return getattr(caches[self.alias], method)(*args)
            except Exception as exc:  # noqa: BLE001 - any cache backend's failure: counted locally instead
                self._mark_down(exc)
        return getattr(self.local, method)(*args)

    def _mark_down(self, exc: BaseException) -> None:
        with self._lock:
            if time.monotonic() >= self._down_until:
                log.warning(
                    "throttle_cache_down error=%s: counting per process for %ss",
                    type(exc).__name__, settings.CACHE_RETRY_AFTER,
                )
            self._down_until = time.monotonic() + settings.CACHE_RETRY_AFTER


throttle_cache = FallbackCache()
