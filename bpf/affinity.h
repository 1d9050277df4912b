/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Event layout of the affinity tracker: the ONE definition shared by
 * affinity.bpf.c (CO-RE, libbpf), affinity.bcc.c (bcc) and pvagent/affinity_event.py
 * (the Python decoder mirrors it with struct format "<IIIIIIQ" + mask bytes).
 *
 * Only fixed-width __u* types: this header is compiled against vmlinux.h (CO-RE)
 * and against kernel headers (bcc) alike.
 */
#ifndef PV_AFFINITY_H
#define PV_AFFINITY_H

/* Largest CPU mask carried: 1024 CPUs (glibc's CPU_SETSIZE). A longer user mask is
 * cut here; the agent then ignores CPUs beyond it (flag PV_AFFINITY_F_TRUNCATED). */
#define PV_AFFINITY_MAX_CPUS 1024
#define PV_AFFINITY_MASK_BYTES (PV_AFFINITY_MAX_CPUS / 8)

/* Slot indexes of the pv_state array map. */
#define PV_STATE_OVERFLOW 0 /* 1 once pv_tracked was found full */
#define PV_STATE_LOST 1     /* events dropped because the ring buffer was full */
#define PV_STATE_SLOTS 2

/* Live tids whose exit the program reports; beyond this, see PV_AFFINITY_F_OVERFLOW. */
#define PV_AFFINITY_MAX_TRACKED 8192
/* Ring buffer size (bytes, power of two pages): ~25 000 events of slack. */
#define PV_AFFINITY_RINGBUF_BYTES (4 * 1024 * 1024)

enum pv_affinity_kind {
	PV_AFFINITY_SET = 1,  /* a sched_setaffinity() call that returned 0 */
	PV_AFFINITY_EXIT = 2, /* a tracked thread exited (sched_process_exit) */
};

enum pv_affinity_flags {
	/* The user mask was longer than PV_AFFINITY_MASK_BYTES. */
	PV_AFFINITY_F_TRUNCATED = 1,
	/* The tracked-tid table was full: exits of untracked tids may be reported too. */
	PV_AFFINITY_F_OVERFLOW = 2,
	/* Not a call: a new thread/process (target) inherited its creator's (tid) tracked mask
	 * at clone/fork, as the kernel copies affinity; kept across exec, so `taskset` works. */
	PV_AFFINITY_F_INHERITED = 4,
};

struct pv_affinity_event {
	__u32 kind;       /* enum pv_affinity_kind */
	__u32 tgid;       /* caller's process id (global pid namespace) */
	__u32 tid;        /* caller's thread id (global pid namespace) */
	__u32 target;     /* tid argument of the call: 0 means the caller itself */
	__u32 mask_bytes; /* valid bytes of mask[]: min(len argument, PV_AFFINITY_MASK_BYTES) */
	__u32 flags;      /* enum pv_affinity_flags */
	__u64 ktime_ns;   /* bpf_ktime_get_ns() at the tracepoint (CLOCK_MONOTONIC) */
	__u8 mask[PV_AFFINITY_MASK_BYTES]; /* little-endian bitmap, bit n = CPU n */
};

/* Per-target state kept in the kernel: the last mask reported for that tid. Identical
 * repeated calls are not re-reported, which keeps affinity storms off the ring buffer. */
struct pv_affinity_tracked {
	__u32 mask_bytes;
	__u32 pad; /* keeps mask[] 8-byte aligned for word compares */
	__u8 mask[PV_AFFINITY_MASK_BYTES];
};

#endif /* PV_AFFINITY_H */
