"""One owner per key on an object store: a lease object created exclusively, renewed by a heartbeat.

The S3 counterpart of :mod:`.lock`. The trial whose ``PUT <key>.lock`` with
``If-None-Match: *`` succeeds pre-trains; the lease holds JSON ``{token, host, pid,
label, started, expires}``. A thread renews it every ``heartbeat_s`` by rewriting
it with ``If-Match: <the ETag it wrote last>``: a failed condition means that a
waiter judged this owner dead and broke the lease, and the owner learns it
(``lost``), as with a lock file.

A lease is stale when its owner ran on this host and its process is gone, or when
it was last renewed more than ``stale_after_s`` ago. That age is measured on the
store's clock (the object's ``LastModified`` against the ``Date`` of the answer that
read it), so hosts whose clocks disagree never break a live lease; ``expires`` is
written for people reading the lease. A waiter breaks a stale lease with a delete
conditional on the ETag it read: if the lease was renewed or replaced meanwhile,
the delete fails and the live lease stays.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from r2sweep.core.pretrain_cache.lock import died_on_this_host, owner_record

if TYPE_CHECKING:
    from r2sweep.core.pretrain_cache.objects import Bucket, StoredObject

__all__ = ["Lease", "try_lease", "lease_holder", "is_stale"]


def _parse(found: StoredObject | None) -> dict[str, Any] | None:
    try:
        holder = json.loads(found.data) if found is not None else None
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def lease_holder(bucket: Bucket, name: str) -> dict[str, Any] | None:
    """What the lease says about its owner; None when there is none (or it does not parse)."""
    try:
        return _parse(bucket.get(name))
    except OSError:
        return None


def is_stale(found: StoredObject, stale_after_s: float) -> bool:
    """Whether the owner of the lease ``found`` is dead: its process is gone (same host) or its renewals stopped."""
    return died_on_this_host(_parse(found)) or found.now - found.modified > stale_after_s


def _body(token: str, label: str, started: float, stale_after_s: float) -> bytes:
    return json.dumps({**owner_record(token, label), "started": started, "expires": time.time() + stale_after_s}).encode()


class Lease:
    """The right to pre-train one key, held until :meth:`release` (or the owning thread's death)."""

    def __init__(self, bucket: Bucket, name: str, token: str, etag: str, *, label: str, started: float,
                 heartbeat_s: float, stale_after_s: float) -> None:
        self.bucket = bucket
        self.name = name
        self.token = token
        self.lost = False  # a waiter broke the lease (this owner was judged dead)
        self._etag = etag
        self._label = label
        self._started = started
        self._stale_after_s = stale_after_s
        self._stop = threading.Event()
        self._owner = threading.current_thread()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True,
                                        name=f"r2sweep-lease-{name.rsplit('/', 1)[-1][:8]}")
        self._thread.start()

    def _ours(self) -> str | None:
        """The lease's ETag when it still holds our token (a client's retry may have renewed it twice)."""
        found = self.bucket.get(self.name)
        holder = _parse(found)
        return found.etag if found is not None and holder is not None and holder.get("token") == self.token else None

    def _renew(self) -> None:
        body = _body(self.token, self._label, self._started, self._stale_after_s)
        etag = self.bucket.put(self.name, body, if_match=self._etag)
        if etag is None:
            etag = self._ours()
            if etag is None:
                self.lost = True
                return
        self._etag = etag

    def _beat(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            if not self._owner.is_alive():
                return  # the owner vanished without releasing: let the lease go stale
            try:
                self._renew()
            except OSError:
                continue  # the store did not answer: try again (the lease goes stale if it never does)
            if self.lost:
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()  # a renewal in flight would change the ETag the delete below is conditional on
        try:
            etag = self._ours()
            if etag is not None:
                self.bucket.delete(self.name, if_match=etag)
        except OSError:
            pass  # unreachable store: the lease expires on its own, nothing renews it now

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def try_lease(bucket: Bucket, name: str, *, label: str, heartbeat_s: float = 5.0,
              stale_after_s: float = 60.0) -> Lease | None:
    """Take the lease ``name`` for this thread; None while a live owner holds it (a stale one is broken first)."""
    for _ in range(2):  # at most one stale lease to break before trying again
        token, started = uuid.uuid4().hex, time.time()
        etag = bucket.put(name, _body(token, label, started, stale_after_s), if_none_match=True)
        if etag is None:
            found = bucket.get(name)
            if found is None:
                continue  # released meanwhile
            holder = _parse(found)
            if holder is not None and holder.get("token") == token:
                etag = found.etag  # our own put, retried by the client after it had succeeded
            elif not is_stale(found, stale_after_s):
                return None
            else:
                bucket.delete(name, if_match=found.etag)  # fails if it was renewed or replaced meanwhile
                continue
        return Lease(bucket, name, token, etag, label=label, started=started, heartbeat_s=heartbeat_s,
                     stale_after_s=stale_after_s)
    return None
