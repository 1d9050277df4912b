/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Event layout of the memory-pressure service: the ONE definition shared by memory.bpf.c
 * (CO-RE, libbpf) and the host's decoder, pvhost/services/memory_event.py, which mirrors it
 * with struct format "<IIQQQ", and its pv_mem_state slots (a unit test compiles this header and
 * checks the mirror).
 *
 * Only fixed-width __u* types: compiled against the program's own declarations (CO-RE).
 */
#ifndef PV_MEMORY_H
#define PV_MEMORY_H

/* Direct reclaims in flight, keyed by tid (a task is in at most one). */
#define PV_MEMORY_MAX_INFLIGHT 4096
/* Ring buffer size (bytes, power of two pages): ~8 000 events of slack. */
#define PV_MEMORY_RINGBUF_BYTES (256 * 1024)

/* Slot indexes of the pv_mem_state array map (__u64 values): cumulative counters the program
 * keeps itself since it was loaded, on every event whether or not its record reached the ring
 * buffer. The host reads them (ReadMap) to learn of what its records never told it: records
 * the ring buffer, the agent or the channel lost. */
#define PV_MEM_STATE_LOST 0     /* events dropped because the ring buffer was full */
#define PV_MEM_STATE_RECLAIMS 1 /* direct reclaims finished (user tasks) */
#define PV_MEM_STATE_STALL_NS 2 /* their total stall time (ns) */
#define PV_MEM_STATE_OOMS 3     /* OOM victims marked */
#define PV_MEM_STATE_SLOTS 4

enum pv_memory_kind {
	PV_MEMORY_RECLAIM = 1, /* a direct reclaim ended: duration_ns, nr_reclaimed */
	PV_MEMORY_OOM = 2,     /* the OOM killer marked pid as its victim */
};

struct pv_memory_event {
	__u32 kind;         /* enum pv_memory_kind */
	__u32 pid;          /* reclaiming task (tid), or the OOM victim's pid */
	__u64 ktime_ns;     /* bpf_ktime_get_ns() at the event (CLOCK_MONOTONIC) */
	__u64 duration_ns;  /* time the task stalled in direct reclaim (0 for OOM) */
	__u64 nr_reclaimed; /* pages that reclaim freed (0 for OOM) */
};

#endif /* PV_MEMORY_H */
