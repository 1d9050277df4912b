// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Affinity tracker, bcc flavour: the twin of affinity.bpf.c (same maps, same logic),
 * for guests that carry bcc. `make -C bpf` inlines affinity.h into the copy it writes
 * to extpv/bpfobj/affinity.bcc.c, because the host sends one self-contained source.
 * License (bcc passes it to the kernel): Dual BSD/GPL.
 */
#include "affinity.h"

BPF_RINGBUF_OUTPUT(pv_affinity, PV_AFFINITY_RINGBUF_BYTES / 4096);
BPF_HASH(pv_pending, u32, struct pv_affinity_event, 1024);
BPF_HASH(pv_tracked, u32, struct pv_affinity_tracked, PV_AFFINITY_MAX_TRACKED);
BPF_PERCPU_ARRAY(pv_scratch, struct pv_affinity_event, 1);
BPF_ARRAY(pv_state, u64, PV_STATE_SLOTS);

static __always_inline void count(u32 slot)
{
	u64 *value = pv_state.lookup(&slot);

	if (value)
		__sync_fetch_and_add(value, 1);
}

static __always_inline int same_mask(const struct pv_affinity_tracked *old,
				     const struct pv_affinity_event *ev)
{
	const u64 *a = (const u64 *)old->mask;
	const u64 *b = (const u64 *)ev->mask;

	if (old->mask_bytes != ev->mask_bytes)
		return 0;
#pragma unroll
	for (int i = 0; i < PV_AFFINITY_MASK_BYTES / 8; i++)
		if (a[i] != b[i])
			return 0;
	return 1;
}

TRACEPOINT_PROBE(syscalls, sys_enter_sched_setaffinity)
{
	u32 zero = 0;
	struct pv_affinity_event *ev = pv_scratch.lookup(&zero);
	u64 id = bpf_get_current_pid_tgid();
	u64 len = args->len;

	if (!ev)
		return 0;
	ev->kind = PV_AFFINITY_SET;
	ev->tgid = id >> 32;
	ev->tid = (u32)id;
	ev->target = (u32)args->pid;
	ev->flags = 0;
	ev->ktime_ns = bpf_ktime_get_ns();
	if (len > PV_AFFINITY_MASK_BYTES) {
		len = PV_AFFINITY_MASK_BYTES;
		ev->flags = PV_AFFINITY_F_TRUNCATED;
	}
	ev->mask_bytes = len;
	__builtin_memset(ev->mask, 0, sizeof(ev->mask));
	if (len == 0 || bpf_probe_read_user(ev->mask, len, (const void *)args->user_mask_ptr) < 0)
		return 0;
	pv_pending.update(&ev->tid, ev);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_sched_setaffinity)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	struct pv_affinity_event *ev = pv_pending.lookup(&tid);
	struct pv_affinity_tracked *old, now = {};
	u32 target;

	if (!ev)
		return 0;
	if (args->ret != 0)
		goto done;
	target = ev->target ? ev->target : ev->tid;
	old = pv_tracked.lookup(&target);
	if (old && same_mask(old, ev))
		goto done;
	now.mask_bytes = ev->mask_bytes;
	__builtin_memcpy(now.mask, ev->mask, sizeof(now.mask));
	if (pv_tracked.update(&target, &now) != 0) {
		u32 slot = PV_STATE_OVERFLOW;
		u64 one = 1;

		pv_state.update(&slot, &one);
		ev->flags |= PV_AFFINITY_F_OVERFLOW;
	}
	if (pv_affinity.ringbuf_output(ev, sizeof(*ev), 0) != 0)
		count(PV_STATE_LOST);
done:
	pv_pending.delete(&tid);
	return 0;
}

TRACEPOINT_PROBE(sched, sched_process_fork)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 parent = (u32)id, child = (u32)args->child_pid;
	struct pv_affinity_tracked *mask = pv_tracked.lookup(&parent);
	struct pv_affinity_event *ev;
	u32 flags = PV_AFFINITY_F_INHERITED;

	if (!mask)
		return 0;
	if (pv_tracked.update(&child, mask) != 0) {
		u32 slot = PV_STATE_OVERFLOW;
		u64 one = 1;

		pv_state.update(&slot, &one);
		flags |= PV_AFFINITY_F_OVERFLOW;
	}
	ev = pv_affinity.ringbuf_reserve(sizeof(struct pv_affinity_event));
	if (!ev) {
		count(PV_STATE_LOST);
		return 0;
	}
	ev->kind = PV_AFFINITY_SET;
	ev->tgid = id >> 32;
	ev->tid = parent;
	ev->target = child;
	ev->mask_bytes = mask->mask_bytes;
	ev->flags = flags;
	ev->ktime_ns = bpf_ktime_get_ns();
	__builtin_memcpy(ev->mask, mask->mask, sizeof(ev->mask));
	pv_affinity.ringbuf_submit(ev, 0);
	return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tid = (u32)id, slot = PV_STATE_OVERFLOW;
	struct pv_affinity_event *ev;
	u64 *overflow;

	pv_pending.delete(&tid);
	if (pv_tracked.delete(&tid) != 0) {
		overflow = pv_state.lookup(&slot);
		if (!overflow || !*overflow)
			return 0;
	}
	ev = pv_affinity.ringbuf_reserve(sizeof(struct pv_affinity_event));
	if (!ev) {
		count(PV_STATE_LOST);
		return 0;
	}
	ev->kind = PV_AFFINITY_EXIT;
	ev->tgid = id >> 32;
	ev->tid = tid;
	ev->target = 0;
	ev->mask_bytes = 0;
	ev->flags = 0;
	ev->ktime_ns = bpf_ktime_get_ns();
	__builtin_memset(ev->mask, 0, sizeof(ev->mask));
	pv_affinity.ringbuf_submit(ev, 0);
	return 0;
}
