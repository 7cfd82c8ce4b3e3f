"""A pre-training cache under an S3 (or S3-compatible) prefix, ``s3://bucket/prefix``: :class:`.backend.Files`
on objects.

S3 has no rename, so an entry is committed differently from a folder's: its weights
go up first under a name no other writer uses (``weights-<random>.pt``), then its
manifest, naming them, with ``If-None-Match: *``. The manifest is the commit point:
a reader that finds one finds complete weights (and verifies their SHA-256 as on a
folder), and of two writers of one key the first manifest wins, the other's
weights are deleted. Locks are leases (:mod:`.lease`).

The endpoint and credentials come from boto3's usual chain (the environment:
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``; else a profile or the node's role),
never from a sweep's files, and are never logged. Every failure of the store surfaces as an :class:`OSError`, as a
folder's would, so a trial whose cache cannot be reached trains without it.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

from r2sweep.core.errors import ConfigError
from r2sweep.core.pretrain_cache.backend import Item, StorageError
from r2sweep.core.pretrain_cache.lease import Lease, lease_holder, try_lease

__all__ = ["Bucket", "ObjectFolder", "ObjectStoreError", "StoredObject"]

#: A conditional request that lost: 412 when the condition failed, 409 when S3 saw two at once.
_LOST = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}
_MISSING = {"NoSuchKey", "NotFound", "404"}


class ObjectStoreError(StorageError):
    """The object store refused or could not be reached (an OSError: callers treat it as a folder's failure)."""


@dataclass(frozen=True)
class StoredObject:
    data: bytes
    etag: str
    modified: float  # the store's clock
    now: float  # the store's clock when it answered: ages are measured on one clock, whatever this host's says


def _client(uri: str) -> Any:
    try:
        import boto3
    except ImportError:
        raise ConfigError("pretrain_cache", uri, "an s3:// cache needs boto3: pip install 'r2sweep[s3]'") from None
    # boto3's own chain: the environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...), a profile, or the
    # node's role (instance metadata, web identity): what the cluster already gives every process.
    from botocore.exceptions import BotoCoreError

    session = boto3.session.Session(region_name=os.environ.get("AWS_DEFAULT_REGION") or None)
    try:
        credentials = session.get_credentials()
    except BotoCoreError:  # half a key pair in the environment, a profile that does not parse
        credentials = None
    if credentials is None:
        raise ConfigError("pretrain_cache", uri, "credentials for S3: set AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for a store other than AWS), or give the "
                          "node a role or profile")
    return session.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None,
                          region_name=session.region_name or "us-east-1")


def _code(error: Exception) -> str:
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", "")) or str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


def _server_time(response: dict[str, Any]) -> float:
    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    try:
        return parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError):
        return time.time()


class Bucket:
    """Objects under one prefix of one bucket, by names relative to the prefix (a thread-safe client)."""

    def __init__(self, uri: str) -> None:
        scheme, _, rest = uri.partition("://")
        bucket, _, prefix = rest.partition("/")
        if scheme.lower() != "s3" or len(bucket) < 3:
            raise ConfigError("pretrain_cache", uri, "a folder, or an S3 prefix s3://bucket/prefix")
        self.name = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self._s3 = _client(uri)

    def url(self, name: str) -> str:
        return f"s3://{self.name}/{self.prefix}{name}"

    @contextmanager
    def _failing_as_oserror(self, name: str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as error:
            message = error.response.get("Error", {}).get("Message", "")
            raise ObjectStoreError(f"{self.url(name)}: {_code(error)} {message}".rstrip()) from None
        except BotoCoreError as error:
            raise ObjectStoreError(f"{self.url(name)}: {error}") from None

    def get(self, name: str) -> StoredObject | None:
        with self._failing_as_oserror(name):
            try:
                answer = self._s3.get_object(Bucket=self.name, Key=self.prefix + name)
            except Exception as error:
                if _code(error) in _MISSING:
                    return None
                raise
            data = answer["Body"].read()
        return StoredObject(data, answer["ETag"], answer["LastModified"].timestamp(), _server_time(answer))

    def exists(self, name: str) -> bool:
        with self._failing_as_oserror(name):
            try:
                self._s3.head_object(Bucket=self.name, Key=self.prefix + name)
            except Exception as error:
                if _code(error) in _MISSING:
                    return False
                raise
        return True

    def put(self, name: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str | None:
        """Write ``name`` (at most 5 GB: one request); its new ETag, or None when the condition failed.

        ``if_none_match``: only if there is no such object; ``if_match``: only if it is still that ETag.
        """
        conditions = {"IfNoneMatch": "*"} if if_none_match else {"IfMatch": if_match} if if_match else {}
        with self._failing_as_oserror(name):
            try:
                return self._s3.put_object(Bucket=self.name, Key=self.prefix + name, Body=data, **conditions)["ETag"]
            except Exception as error:
                if conditions and (_code(error) in _LOST or (if_match and _code(error) in _MISSING)):
                    return None
                raise

    def delete(self, name: str, *, if_match: str | None = None) -> bool:
        """Delete ``name`` (only if it is still ``if_match``); False when the condition failed."""
        conditions = {"IfMatch": if_match} if if_match else {}
        with self._failing_as_oserror(name):
            try:
                self._s3.delete_object(Bucket=self.name, Key=self.prefix + name, **conditions)
            except Exception as error:
                if conditions and _code(error) in _LOST | _MISSING:
                    return False
                raise
        return True

    def listing(self, folder: str) -> list[Item]:
        start = f"{self.prefix}{folder.strip('/')}/"
        items = []
        with self._failing_as_oserror(folder):
            for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=start):
                items.extend(Item(o["Key"][len(start):], o["Size"], o["LastModified"].timestamp())
                             for o in page.get("Contents", ()))
        return items

    def delete_all(self, names: list[str]) -> None:
        for first in range(0, len(names), 1000):  # DeleteObjects takes 1000 keys a request
            batch = names[first:first + 1000]
            with self._failing_as_oserror(batch[0]):
                answer = self._s3.delete_objects(Bucket=self.name, Delete={
                    "Objects": [{"Key": self.prefix + n} for n in batch], "Quiet": True})
            if answer.get("Errors"):
                error = answer["Errors"][0]
                raise ObjectStoreError(f"s3://{self.name}/{error.get('Key')}: {error.get('Code')} {error.get('Message', '')}")


class _Upload:
    """An entry held in memory until :meth:`publish` uploads it, the manifest last."""

    def __init__(self, bucket: Bucket, folder: str, marker: str) -> None:
        self.bucket = bucket
        self.folder = folder
        self.marker = marker
        # Unique: two writers of one key never overwrite each other's weights, so the weights a manifest
        # names are the bytes its writer hashed.
        self.weights = f"weights-{uuid.uuid4().hex[:16]}.pt"
        self._weights = b""
        self._markers: list[str] = []
        self._uploaded = self._published = False

    def save(self, state: dict[str, Any]) -> str:
        import torch

        buffer = io.BytesIO()
        torch.save(state, buffer)
        self._weights = buffer.getvalue()
        return hashlib.sha256(self._weights).hexdigest()

    def touch(self, name: str) -> None:
        self._markers.append(name)  # uploaded once the entry is committed: a losing writer marks nothing

    def publish(self, manifest: bytes) -> bool:
        # Again after a corrupt entry was discarded (with everything under its prefix): weights first, always.
        self.bucket.put(f"{self.folder}/{self.weights}", self._weights)
        self._uploaded = True
        name = f"{self.folder}/{self.marker}"
        if self.bucket.put(name, manifest, if_none_match=True) is None:
            there = self.bucket.get(name)
            if there is None or there.data != manifest:  # equal: the client retried our own put
                return False
        self._published = True
        for marker in self._markers:
            self.bucket.put(f"{self.folder}/{marker}", b"")
        return True

    def close(self) -> None:
        if self._uploaded and not self._published:
            try:
                self.bucket.delete(f"{self.folder}/{self.weights}")
            except OSError:
                pass  # deleted with the entry's prefix, by prune or a discard


class ObjectFolder:
    """The cache's objects under ``s3://bucket/prefix``."""

    def __init__(self, uri: str, marker: str) -> None:
        self.bucket = Bucket(uri)
        self.root = uri.rstrip("/")
        self.marker = marker

    def location(self, name: str) -> str:
        return self.bucket.url(name)

    def read(self, name: str) -> bytes | None:
        found = self.bucket.get(name)
        return None if found is None else found.data

    def write(self, name: str, data: bytes) -> None:
        self.bucket.put(name, data)  # a PUT replaces an object whole

    def touch(self, name: str) -> None:
        self.bucket.put(name, b"")

    def delete(self, name: str) -> None:
        self.bucket.delete(name)

    def committed(self, folder: str) -> bool:
        # Weights without a manifest are a writer's upload in progress (or a dead writer's): not an entry yet.
        return self.bucket.exists(f"{folder}/{self.marker}")

    def verified(self, name: str, sha256: str) -> io.BytesIO | None:
        found = self.bucket.get(name)
        if found is None or hashlib.sha256(found.data).hexdigest() != sha256:
            return None
        return io.BytesIO(found.data)

    def remove(self, folder: str) -> None:
        self.bucket.delete(f"{folder}/{self.marker}")  # first: readers stop seeing the entry
        self.bucket.delete_all([f"{folder}/{item.name}" for item in self.bucket.listing(folder)])

    def stage(self, folder: str) -> _Upload:
        return _Upload(self.bucket, folder, self.marker)

    def listing(self, folder: str) -> list[Item]:
        return self.bucket.listing(folder)

    def remove_leftovers(self, folder: str, max_age_s: float) -> None:
        # A writer that died between its weights and its manifest left an entry without a manifest;
        # one younger than max_age_s may still be on its way up.
        groups: dict[str, list[Item]] = {}
        for item in self.bucket.listing(folder):
            groups.setdefault(item.name.split("/", 1)[0], []).append(item)
        now = time.time()
        doomed = [f"{folder}/{item.name}" for group, items in groups.items()
                  if not any(i.name == f"{group}/{self.marker}" for i in items)
                  and all(now - i.mtime > max_age_s for i in items) for item in items]
        self.bucket.delete_all(doomed)

    def claim(self, name: str, *, label: str, heartbeat_s: float, stale_after_s: float) -> Lease | None:
        return try_lease(self.bucket, name, label=label, heartbeat_s=heartbeat_s, stale_after_s=stale_after_s)

    def holder(self, name: str) -> dict[str, Any] | None:
        return lease_holder(self.bucket, name)
