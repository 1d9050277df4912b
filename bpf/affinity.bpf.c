// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Affinity tracker, CO-RE flavour (libbpf). Reports successful sched_setaffinity()
 * calls with the whole user mask, and the exit of threads whose mask was reported.
 *
 * Only stable tracepoints: syscalls/sys_{enter,exit}_sched_setaffinity,
 * sched/sched_process_fork (a tracked mask is inherited by new threads) and
 * sched/sched_process_exit, so one object runs on every kernel with BTF (no kprobes,
 * no fentry). The user mask is read at sys_enter (the pointer is only valid then),
 * stashed per caller tid, and reported at sys_exit only if the call returned 0.
 *
 * Threads pinned before the object was loaded: pv_affinity_scan, a task iterator in a
 * "?iter/task" section. Agents of protocol 4 load an object's iterators and run each once
 * after the other programs are attached, before they answer the load (a generic rule: an
 * object fills its maps with what was there before it); the host then reads pv_tracked.
 * Older agents skip programs that are not auto-loaded ("?"), so the same object still loads
 * there (their own /proc scan does this job).
 *
 * Twin: affinity.bcc.c (same maps, same logic, bcc dialect, no iterator). Layout: affinity.h.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

#include "affinity.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* The few kernel types used, declared here instead of a generated vmlinux.h so the build
 * does not need the build machine's BTF. preserve_access_index makes every field access
 * a CO-RE relocation: libbpf fixes the offsets against the running kernel's BTF. */
struct trace_entry {
	unsigned short type;
	unsigned char flags;
	unsigned char preempt_count;
	int pid;
} __attribute__((preserve_access_index));

struct trace_event_raw_sys_enter {
	struct trace_entry ent;
	long id;
	unsigned long args[6];
} __attribute__((preserve_access_index));

struct trace_event_raw_sys_exit {
	struct trace_entry ent;
	long id;
	long ret;
} __attribute__((preserve_access_index));

struct trace_event_raw_sched_process_fork {
	struct trace_entry ent;
	int child_pid; /* only the fields used: CO-RE finds them by name (the comm fields
			* changed from char[16] to __data_loc between kernel versions) */
} __attribute__((preserve_access_index));

struct cpumask {
	unsigned long bits[1]; /* the kernel's size (NR_CPUS) comes from bpf_core_type_size */
} __attribute__((preserve_access_index));

struct task_struct {
	int pid; /* the thread id, in the global pid namespace */
	unsigned int flags;
	const struct cpumask *cpus_ptr;
} __attribute__((preserve_access_index));

struct bpf_iter_meta;

struct bpf_iter__task {
	struct bpf_iter_meta *meta;
	struct task_struct *task;
} __attribute__((preserve_access_index));

#define PF_KTHREAD 0x00200000 /* include/linux/sched.h: kernel threads are bound by it */

/* The service's records (struct pv_affinity_event), decoded by the host's affinity service. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, PV_AFFINITY_RINGBUF_BYTES);
} pv_affinity SEC(".maps");

/* Calls between sys_enter and sys_exit, keyed by caller tid. A plain hash, not an LRU
 * (which may evict a live entry and so lose a call); sys_exit always runs, and thread exit
 * removes the entry as well. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, struct pv_affinity_event);
} pv_pending SEC(".maps");

/* Target tid -> last reported mask. Filters exits (only tracked tids are reported) and
 * suppresses identical repeated calls (storms). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PV_AFFINITY_MAX_TRACKED);
	__type(key, __u32);
	__type(value, struct pv_affinity_tracked);
} pv_tracked SEC(".maps");

/* Event under construction (too large for the 512-byte stack with the rest). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pv_affinity_event);
} pv_scratch SEC(".maps");

/* Counters the agent reads: PV_STATE_OVERFLOW, PV_STATE_LOST. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, PV_STATE_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} pv_state SEC(".maps");

static __always_inline void count(__u32 slot)
{
	__u64 *value = bpf_map_lookup_elem(&pv_state, &slot);

	if (value)
		__sync_fetch_and_add(value, 1);
}

static __always_inline int same_mask(const struct pv_affinity_tracked *old,
				     const struct pv_affinity_event *ev)
{
	const __u64 *a = (const __u64 *)old->mask;
	const __u64 *b = (const __u64 *)ev->mask;

	if (old->mask_bytes != ev->mask_bytes)
		return 0;
#pragma unroll
	for (int i = 0; i < PV_AFFINITY_MASK_BYTES / 8; i++)
		if (a[i] != b[i])
			return 0;
	return 1;
}

SEC("tracepoint/syscalls/sys_enter_sched_setaffinity")
int pv_affinity_enter(struct trace_event_raw_sys_enter *ctx)
{
	__u32 zero = 0;
	struct pv_affinity_event *ev = bpf_map_lookup_elem(&pv_scratch, &zero);
	__u64 id = bpf_get_current_pid_tgid();
	__u64 len = ctx->args[1];

	if (!ev)
		return 0;
	ev->kind = PV_AFFINITY_SET;
	ev->tgid = id >> 32;
	ev->tid = (__u32)id;
	ev->target = (__u32)ctx->args[0];
	ev->flags = 0;
	ev->ktime_ns = bpf_ktime_get_ns();
	if (len > PV_AFFINITY_MASK_BYTES) {
		len = PV_AFFINITY_MASK_BYTES;
		ev->flags = PV_AFFINITY_F_TRUNCATED;
	}
	ev->mask_bytes = len;
	__builtin_memset(ev->mask, 0, sizeof(ev->mask));
	/* A bad pointer makes the syscall fail with EFAULT too: nothing to report. */
	if (len == 0 || bpf_probe_read_user(ev->mask, len, (const void *)ctx->args[2]) < 0)
		return 0;
	bpf_map_update_elem(&pv_pending, &ev->tid, ev, BPF_ANY);
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_sched_setaffinity")
int pv_affinity_exit(struct trace_event_raw_sys_exit *ctx)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct pv_affinity_event *ev = bpf_map_lookup_elem(&pv_pending, &tid);
	struct pv_affinity_tracked *old, now = {};
	__u32 target;

	if (!ev)
		return 0;
	if (ctx->ret != 0)
		goto done;
	target = ev->target ? ev->target : ev->tid;
	old = bpf_map_lookup_elem(&pv_tracked, &target);
	if (old && same_mask(old, ev))
		goto done; /* nothing new: the agent already has this mask for this tid */
	now.mask_bytes = ev->mask_bytes;
	__builtin_memcpy(now.mask, ev->mask, sizeof(now.mask));
	if (bpf_map_update_elem(&pv_tracked, &target, &now, BPF_ANY) != 0) {
		__u32 slot = PV_STATE_OVERFLOW;
		__u64 one = 1;

		bpf_map_update_elem(&pv_state, &slot, &one, BPF_ANY);
		ev->flags |= PV_AFFINITY_F_OVERFLOW;
	}
	if (bpf_ringbuf_output(&pv_affinity, ev, sizeof(*ev), 0) != 0)
		count(PV_STATE_LOST);
done:
	bpf_map_delete_elem(&pv_pending, &tid);
	return 0;
}

SEC("tracepoint/sched/sched_process_fork")
int pv_affinity_fork(struct trace_event_raw_sched_process_fork *ctx)
{
	/* Fires in the creator; the kernel has copied its affinity to the new task. */
	__u64 id = bpf_get_current_pid_tgid();
	__u32 parent = (__u32)id, child = (__u32)ctx->child_pid;
	struct pv_affinity_tracked *mask = bpf_map_lookup_elem(&pv_tracked, &parent);
	struct pv_affinity_event *ev;
	__u32 flags = PV_AFFINITY_F_INHERITED;

	if (!mask)
		return 0; /* untracked creator: the common case costs one lookup */
	if (bpf_map_update_elem(&pv_tracked, &child, mask, BPF_ANY) != 0) {
		__u32 slot = PV_STATE_OVERFLOW;
		__u64 one = 1;

		bpf_map_update_elem(&pv_state, &slot, &one, BPF_ANY);
		flags |= PV_AFFINITY_F_OVERFLOW;
	}
	ev = bpf_ringbuf_reserve(&pv_affinity, sizeof(*ev), 0);
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
	bpf_ringbuf_submit(ev, 0);
	return 0;
}

SEC("tracepoint/sched/sched_process_exit")
int pv_affinity_thread_exit(void *ctx)
{
	/* sched_process_exit fires in the exiting thread itself, once per thread. */
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)id, slot = PV_STATE_OVERFLOW;
	struct pv_affinity_event *ev;
	__u64 *overflow;

	bpf_map_delete_elem(&pv_pending, &tid);
	if (bpf_map_delete_elem(&pv_tracked, &tid) != 0) {
		/* Not tracked: report it only if the table ever overflowed. */
		overflow = bpf_map_lookup_elem(&pv_state, &slot);
		if (!overflow || !*overflow)
			return 0;
	}
	ev = bpf_ringbuf_reserve(&pv_affinity, sizeof(*ev), 0);
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
	bpf_ringbuf_submit(ev, 0);
	return 0;
}

/* Read a task's allowed CPUs into a PV_AFFINITY_MASK_BYTES bitmap; the bytes read, or 0. */
static __always_inline __u32 read_cpus(const struct task_struct *task, __u8 *mask)
{
	__u32 size = bpf_core_type_size(struct cpumask);

	if (size > PV_AFFINITY_MASK_BYTES)
		size = PV_AFFINITY_MASK_BYTES;
	if (size == 0 || bpf_probe_read_kernel(mask, size, BPF_CORE_READ(task, cpus_ptr)) < 0)
		return 0;
	return size;
}

SEC("?iter/task")
int pv_affinity_scan(struct bpf_iter__task *ctx)
{
	/* Run once by the agent after load: every user thread whose allowed CPUs differ from
	 * the reader's (the agent runs unpinned) goes into pv_tracked, so its exit is reported
	 * and the host finds its request there. An entry a tracepoint wrote meanwhile is newer:
	 * BPF_NOEXIST keeps it. Tasks come in pid order; the iterator holds no locks we wait on. */
	struct task_struct *task = ctx->task;
	struct task_struct *self = bpf_get_current_task_btf();
	struct pv_affinity_tracked now = {};
	__u64 mine[PV_AFFINITY_MASK_BYTES / 8] = {};
	const __u64 *theirs = (const __u64 *)now.mask;
	__u32 tid;
	int same = 1;

	if (!task || (task->flags & PF_KTHREAD))
		return 0;
	now.mask_bytes = read_cpus(task, now.mask);
	if (now.mask_bytes == 0 || read_cpus(self, (__u8 *)mine) != now.mask_bytes)
		return 0;
#pragma unroll
	for (int i = 0; i < PV_AFFINITY_MASK_BYTES / 8; i++)
		if (theirs[i] != mine[i])
			same = 0;
	if (same)
		return 0; /* the default mask: no request */
	tid = task->pid;
	if (bpf_map_update_elem(&pv_tracked, &tid, &now, BPF_NOEXIST) == -7 /* E2BIG: full */) {
		__u32 slot = PV_STATE_OVERFLOW;
		__u64 one = 1;

		bpf_map_update_elem(&pv_state, &slot, &one, BPF_ANY);
	}
	return 0;
}
