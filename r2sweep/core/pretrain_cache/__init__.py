"""The pre-training cache: a trial whose pre-training was done before (by any trial of any sweep
sharing the cache) takes its weights instead of training again.

:mod:`.key` decides what makes two pre-trainings the same, :mod:`.store` keeps the
entries, :mod:`.lock` makes one trial the owner of a key while it pre-trains. The
entries lie in a folder (:mod:`.folder`) or under an S3 prefix (:mod:`.objects`, whose
owners hold leases, :mod:`.lease`); :mod:`.backend` is what the store asks of either.
:mod:`r2sweep.core.pretraining` is the trial's side of it.
"""

from r2sweep.core.pretrain_cache.key import PRETRAIN_SEMANTICS, CacheKey, NotCacheable, pretrain_key
from r2sweep.core.pretrain_cache.store import Entry, EntryInfo, PretrainCache

__all__ = ["PRETRAIN_SEMANTICS", "CacheKey", "NotCacheable", "pretrain_key", "Entry", "EntryInfo", "PretrainCache"]
