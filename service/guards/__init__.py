"""The guards: one class per mechanism that can keep sales apart, all behind one protocol (``base.Guard``)."""

from __future__ import annotations

from service.guards.advisory import AdvisoryLock
from service.guards.base import NOTHING_SOLD, SERVICES, Ability, Guard, GuardedSale, Holding
from service.guards.bucket import BucketLock
from service.guards.file_lock import PollingFileLock
from service.guards.host_file import HostFileLock
from service.guards.lease import Lease
from service.guards.nothing import Nothing
from service.guards.row_lock import RowLock
from service.guards.thread_lock import ThreadLock

__all__ = [
    "NOTHING_SOLD",
    "SERVICES",
    "Ability",
    "AdvisoryLock",
    "BucketLock",
    "Guard",
    "GuardedSale",
    "Holding",
    "HostFileLock",
    "Lease",
    "Nothing",
    "PollingFileLock",
    "RowLock",
    "ThreadLock",
]
