"""What both halves of the connector share: counters that log each kind of failure once, and a
client that reconnects by itself after the sidecar restarts."""

import logging
import threading
import time

# Under vLLM's logger, so that its handlers (and level) show the connector's lines too.
log = logging.getLogger("vllm.prefixd")


class Counters:
    """Named counters (thread-safe). `bump` also logs the first occurrence of each kind, with
    context, and every later one only at debug level: a sidecar that is down for a minute must
    not flood the engine's log."""

    def __init__(self):
        self._lock = threading.Lock()
        self._n = {}
        self._logged = set()

    def add(self, name, n=1):
        with self._lock:
            self._n[name] = self._n.get(name, 0) + n

    def bump(self, kind, message):
        with self._lock:
            self._n[kind] = self._n.get(kind, 0) + 1
            first = kind not in self._logged
            self._logged.add(kind)
        if first:
            log.warning("prefixd: %s (counted as %r; later ones are logged at debug level)", message, kind)
        else:
            log.debug("prefixd: %s", message)

    def snapshot(self, extra=None):
        with self._lock:
            d = dict(self._n)
        if extra:
            d.update(extra)
        return d

    def take(self):
        """The counts since the last take (for vLLM's per-interval stats)."""
        with self._lock:
            d, self._n = self._n, {}
        return d


class Unavailable(Exception):
    """The sidecar could not be reached (recently): the caller treats it as a miss."""


class ReconnectingClient:
    """A `prefixd.Client`, made by `connect` (at start-up) or on first use, and made again after
    its session is lost (the sidecar restarted, or was down), at most once per `reconnect_s`."""

    def __init__(self, cfg, endpoint, name, counters, *, transports=None, device=None, force_remote=False):
        self.cfg = cfg
        self.endpoint = endpoint
        self.name = name
        self.counters = counters
        self.transports = transports
        self.device = device
        self.force_remote = force_remote
        self._lock = threading.Lock()
        self._client = None
        self._next_try = 0.0
        self._connector = None  # the thread of a connect started by get_nowait
        self._connector_lock = threading.Lock()

    def get(self):
        with self._lock:
            if self._client is not None:
                return self._client
            now = time.monotonic()
            self._refuse_while_recent(now)
            self._next_try = now + self.cfg.reconnect_s
            import prefixd

            t0 = time.monotonic()
            try:
                self._client = prefixd.Client(
                    self.endpoint,
                    name=self.name,
                    device=self.device,
                    transports=self.transports,
                    force_remote=self.force_remote,
                    timeout=self.cfg.timeout_s,
                    token_file=self.cfg.token_file,
                    tls_ca=self.cfg.tls_ca,
                    tls_cert=self.cfg.tls_cert,
                    tls_key=self.cfg.tls_key,
                )
            except (prefixd.PrefixdError, OSError) as e:
                self.counters.bump("connect_failed", f"cannot connect to prefixd at {self.endpoint}: {e}")
                raise Unavailable(str(e)) from e
            self.counters.add("connects")
            log.info("prefixd: %s connected to %s in %.0f ms", self.name, self.endpoint, (time.monotonic() - t0) * 1000)
            return self._client

    def _refuse_while_recent(self, now):
        """Raises Unavailable until `reconnect_s` has passed since the last connect attempt."""
        if now < self._next_try:
            raise Unavailable(f"prefixd at {self.endpoint} was unreachable moments ago")

    def get_nowait(self):
        """The client if connected; otherwise None, having started a connect on a thread of its
        own (one at a time). For the engine loop: a connect to a sidecar that does not answer
        takes the whole call timeout, and the loop must not wait for it. Raises Unavailable
        while the last attempt's failure is recent."""
        c = self._client
        if c is not None:
            return c
        with self._connector_lock:
            if self._connector is not None and self._connector.is_alive():
                return None
            self._refuse_while_recent(time.monotonic())
            self._connector = threading.Thread(target=self.connect, name="prefixd-connect", daemon=True)
            self._connector.start()
        return None

    def connect(self):
        """Connects now, if not connected (also `get_nowait`'s thread). Called at start-up: a
        process's first connect took about a second per engine on 2x H200 (2026-11-30; likely
        UCX loading its CUDA transports), and made on the first request it stalled the engine
        loop under the first burst of requests. A sidecar that is not up yet is logged and
        counted here; the first call after `reconnect_s` tries again."""
        try:
            self.get()
        except Unavailable:
            pass

    def drop(self, why):
        """Forgets the session (after it was lost); the next call connects again."""
        with self._lock:
            c, self._client = self._client, None
        if c is not None:
            self.counters.bump("session_lost", f"session with prefixd at {self.endpoint} lost ({why}); reconnecting")
            try:
                c.close()
            except Exception:
                pass

    def call(self, method, *args, **kwargs):
        """`method` of the native client; a lost session is dropped (and the error raised)."""
        c = self.get()
        return self._dropping_lost(lambda: getattr(c._c, method)(*args, **kwargs))

    def take(self, pending):
        """The answer of a call started in the background (`*_start`), as `call` gives one."""
        return self._dropping_lost(pending.result)

    def _dropping_lost(self, fn):
        import prefixd

        try:
            return fn()
        except prefixd.SessionLostError as e:
            self.drop(str(e))
            raise

    def release(self, lease_id):
        try:
            self.call("release", lease_id)
        except Exception:
            pass  # the lease runs out at its TTL

    def close(self):
        with self._lock:
            c, self._client = self._client, None
        if c is not None:
            try:
                c.close()
            except Exception:
                pass
