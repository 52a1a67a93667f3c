"""A new instance, in state `created`: an ID, an address, and its data disk."""

from __future__ import annotations

import shutil

from mvm.context import Host
from mvm.errors import QuotaExceeded
from mvm.lifecycle import disks, netops, quota, specs
from mvm.model import Event, Instance, PoolRef, Reason, State, new_instance_id
from mvm.store.locks import tenant_lock_name
from mvm.util import private


def create(ctx: Host, ref: PoolRef, reason: Reason = Reason.USER, locked: bool = False) -> Instance:
    """`locked`: the caller holds the tenant's lock (addresses are allocated under it)."""
    store = ctx.store
    pool = store.pool(ref.tenant, ref.pool)
    tenant = store.tenant(ref.tenant)
    lock = ctx.locks.lock(tenant_lock_name(ref.tenant)) if not locked else None
    if lock is not None:
        lock.__enter__()
    try:
        try:
            quota.check_create(store, ref)  # counted under the tenant's lock: no race
        except QuotaExceeded as e:
            store.event(Event("instance.create-refused", e.message, Reason.QUOTA, ref.tenant,
                              ref.pool, cause=e.message.split("quota: ", 1)[-1]))
            raise
        iid = new_instance_id()
        host_index, ip, mac = netops.allocate(store, tenant, pool, iid)
        i = Instance(iid, ref.tenant, ref.pool, State.CREATED, pool.current, host_index, ip, mac)
        d = specs.instance_dir(ctx.layout, i)
        try:
            private.mkdirs(d.parent)
            d.mkdir(mode=0o700)
            if pool.data_disk:
                disks.create_data_disk(specs.data_disk_path(ctx.layout, i), pool.data_disk)
            store.add_instance(i, Event("instance.create", f"created {iid}", reason,
                                        ref.tenant, ref.pool, iid))
        except BaseException:
            shutil.rmtree(d, ignore_errors=True)
            raise
        return i
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)
