// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Memory-pressure reporter, CO-RE flavour (libbpf): how often and how long the guest's
 * tasks stall in direct reclaim, and whom the OOM killer picks.
 *
 * Only stable tracepoints: vmscan/mm_vmscan_direct_reclaim_{begin,end} and oom/mark_victim,
 * so one object runs on every kernel with BTF. The start time of a reclaim is kept per tid
 * between begin and end (user tasks only); one record per finished reclaim (kind, tid, duration, pages freed)
 * and one per OOM victim go to the ring buffer pv_memory, which the agent forwards as bytes.
 * The same events are also counted in pv_mem_state (reclaims, stall ns, OOM victims, records
 * the ring buffer had no room for), which the host reads to resynchronise after lost records.
 * The host (pvhost/services/memory.py) turns them into balloon decisions. Layout: memory.h.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

#include "memory.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* The fields used, declared here (CO-RE relocations fix their offsets against the running
 * kernel's BTF; no vmlinux.h of the build machine needed). */
struct trace_event_raw_mm_vmscan_direct_reclaim_end_template {
	unsigned long nr_reclaimed;
} __attribute__((preserve_access_index));

struct task_struct {
	unsigned int flags;
} __attribute__((preserve_access_index));

#define PF_KTHREAD 0x00200000 /* include/linux/sched.h, stable since 2.6 */

struct trace_event_raw_mark_victim {
	int pid;
} __attribute__((preserve_access_index));

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, PV_MEMORY_RINGBUF_BYTES);
} pv_memory SEC(".maps");

/* tid -> bpf_ktime_get_ns() at reclaim begin. An LRU: a begin whose end was never seen (the
 * program loaded mid-reclaim) must not fill the table for ever. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, PV_MEMORY_MAX_INFLIGHT);
	__type(key, __u32);
	__type(value, __u64);
} pv_reclaim_start SEC(".maps");

/* Counters the host can read (ReadMap): PV_MEM_STATE_* (memory.h). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, PV_MEM_STATE_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} pv_mem_state SEC(".maps");

static __always_inline void count(__u32 slot, __u64 amount)
{
	__u64 *value = bpf_map_lookup_elem(&pv_mem_state, &slot);

	if (value)
		__sync_fetch_and_add(value, amount);
}

/* A kernel thread in direct reclaim is not the guest's workload short of memory: chiefly
 * the balloon driver's worker taking the pages the host asked back (its reclaim would read
 * as pressure and undo every inflation). */
static __always_inline int in_kthread(void)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();

	return BPF_CORE_READ(task, flags) & PF_KTHREAD;
}

SEC("tracepoint/vmscan/mm_vmscan_direct_reclaim_begin")
int pv_memory_reclaim_begin(void *ctx)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u64 now = bpf_ktime_get_ns();

	if (in_kthread())
		return 0;

	bpf_map_update_elem(&pv_reclaim_start, &tid, &now, BPF_ANY);
	return 0;
}

SEC("tracepoint/vmscan/mm_vmscan_direct_reclaim_end")
int pv_memory_reclaim_end(struct trace_event_raw_mm_vmscan_direct_reclaim_end_template *ctx)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u64 *start = bpf_map_lookup_elem(&pv_reclaim_start, &tid);
	struct pv_memory_event *ev;
	__u64 now, stall;

	if (!start)
		return 0; /* began before the program was loaded */
	now = bpf_ktime_get_ns();
	stall = now - *start;
	/* Counted first, whatever becomes of the record: the host's resynchronisation. */
	count(PV_MEM_STATE_RECLAIMS, 1);
	count(PV_MEM_STATE_STALL_NS, stall);
	ev = bpf_ringbuf_reserve(&pv_memory, sizeof(*ev), 0);
	if (!ev) {
		count(PV_MEM_STATE_LOST, 1);
	} else {
		ev->kind = PV_MEMORY_RECLAIM;
		ev->pid = tid;
		ev->ktime_ns = now;
		ev->duration_ns = stall;
		ev->nr_reclaimed = ctx->nr_reclaimed;
		bpf_ringbuf_submit(ev, 0);
	}
	bpf_map_delete_elem(&pv_reclaim_start, &tid);
	return 0;
}

SEC("tracepoint/oom/mark_victim")
int pv_memory_oom(struct trace_event_raw_mark_victim *ctx)
{
	struct pv_memory_event *ev;

	count(PV_MEM_STATE_OOMS, 1);
	ev = bpf_ringbuf_reserve(&pv_memory, sizeof(*ev), 0);
	if (!ev) {
		count(PV_MEM_STATE_LOST, 1);
		return 0;
	}
	ev->kind = PV_MEMORY_OOM;
	ev->pid = (__u32)ctx->pid;
	ev->ktime_ns = bpf_ktime_get_ns();
	ev->duration_ns = 0;
	ev->nr_reclaimed = 0;
	bpf_ringbuf_submit(ev, 0);
	return 0;
}
