// SPDX-License-Identifier: Apache-2.0
/*
 * spscq — the paper's workload: a Lamport single-producer/single-consumer queue.
 *
 * One producer thread and one consumer thread pin themselves with
 * pthread_setaffinity_np (to CPU 0 and CPU 1 by default), then move 64-bit
 * "packets" through a lock-free ring for a fixed time. The throughput is
 * printed in Mpps (million packets per second); with --json as one JSON
 * object on stdout, so scripts can parse it.
 *
 * Lamport's queue: the producer owns `head`, the consumer owns `tail`; each
 * reads the other's index to see whether the ring is full/empty. Both indices
 * and the slots live on separate cache lines so the two cores only share what
 * the algorithm needs. Each side keeps a cached copy of the other's index and
 * re-reads it only when the cached value says "full"/"empty" (the usual
 * improvement that keeps cross-core cache traffic proportional to batches).
 *
 * Inside a VM the pinning binds the threads to *virtual* CPUs; extpv's agent
 * sees these pthread_setaffinity_np calls and asks the host to pin the vCPUs.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define CACHE_LINE 64
#define DEFAULT_SLOTS 4096 /* power of two */

struct queue {
	_Alignas(CACHE_LINE) _Atomic uint64_t head; /* next slot the producer writes */
	_Alignas(CACHE_LINE) _Atomic uint64_t tail; /* next slot the consumer reads */
	_Alignas(CACHE_LINE) uint64_t mask;
	uint64_t *slots;
};

struct options {
	int producer_cpu;
	int consumer_cpu;
	double duration;
	uint64_t slots;
	int json;
	int hold; /* seconds to stay pinned (and idle) after the run, for tracing demos */
};

struct side {
	struct queue *q;
	int cpu;
	const char *role;
	uint64_t count;
	int pin_errno;
	int pinned_cpu; /* sched_getcpu() after pinning */
};

static _Atomic int stop_flag;
static _Atomic int ready_count;

static int pin_self(int cpu)
{
	cpu_set_t set;

	if (cpu < 0)
		return 0; /* unpinned run: the baseline */
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	return pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

static void wait_start(void)
{
	atomic_fetch_add(&ready_count, 1);
	while (atomic_load_explicit(&ready_count, memory_order_acquire) < 3)
		;
}

static void *producer(void *arg)
{
	struct side *s = arg;
	struct queue *q = s->q;
	uint64_t head = 0, tail_cache = 0, n = 0;
	uint64_t size = q->mask + 1;

	s->pin_errno = pin_self(s->cpu);
	s->pinned_cpu = sched_getcpu();
	wait_start();
	while (!atomic_load_explicit(&stop_flag, memory_order_relaxed)) {
		if (head - tail_cache == size) {
			tail_cache = atomic_load_explicit(&q->tail, memory_order_acquire);
			if (head - tail_cache == size)
				continue; /* full */
		}
		q->slots[head & q->mask] = n++;
		head++;
		atomic_store_explicit(&q->head, head, memory_order_release);
	}
	s->count = n;
	return NULL;
}

static void *consumer(void *arg)
{
	struct side *s = arg;
	struct queue *q = s->q;
	uint64_t tail = 0, head_cache = 0, n = 0, expect = 0;

	s->pin_errno = pin_self(s->cpu);
	s->pinned_cpu = sched_getcpu();
	wait_start();
	while (!atomic_load_explicit(&stop_flag, memory_order_relaxed)) {
		if (tail == head_cache) {
			head_cache = atomic_load_explicit(&q->head, memory_order_acquire);
			if (tail == head_cache)
				continue; /* empty */
		}
		uint64_t v = q->slots[tail & q->mask];
		if (v != expect) {
			fprintf(stderr, "spscq: queue corrupted: got %llu, expected %llu\n",
				(unsigned long long)v, (unsigned long long)expect);
			exit(3);
		}
		expect++;
		n++;
		tail++;
		atomic_store_explicit(&q->tail, tail, memory_order_release);
	}
	s->count = n;
	return NULL;
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void usage(FILE *out)
{
	fprintf(out,
		"usage: spscq [--producer-cpu N] [--consumer-cpu N] [--duration SECONDS]\n"
		"             [--slots N] [--hold SECONDS] [--json]\n"
		"\n"
		"Lamport single-producer/single-consumer queue benchmark (extpv).\n"
		"  --producer-cpu N   CPU the producer pins itself to (default 0, -1: no pinning)\n"
		"  --consumer-cpu N   CPU the consumer pins itself to (default 1, -1: no pinning)\n"
		"  --duration S       measured run time in seconds (default 5)\n"
		"  --slots N          ring size, a power of two (default %d)\n"
		"  --hold S           stay pinned, idle, S seconds after the run (default 0)\n"
		"  --json             print one JSON object instead of text\n",
		DEFAULT_SLOTS);
}

static int parse_int(const char *s, const char *what, long lo, long hi, long *out)
{
	char *end;

	errno = 0;
	long v = strtol(s, &end, 10);
	if (errno || *end || end == s || v < lo || v > hi) {
		fprintf(stderr, "spscq: bad %s '%s' (want an integer in [%ld, %ld])\n", what, s, lo, hi);
		return -1;
	}
	*out = v;
	return 0;
}

static int parse_options(int argc, char **argv, struct options *o)
{
	static const struct option longopts[] = {
		{ "producer-cpu", required_argument, NULL, 'p' },
		{ "consumer-cpu", required_argument, NULL, 'c' },
		{ "duration", required_argument, NULL, 'd' },
		{ "slots", required_argument, NULL, 's' },
		{ "hold", required_argument, NULL, 'H' },
		{ "json", no_argument, NULL, 'j' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	long v;
	int c;
	char *end;

	*o = (struct options){ .producer_cpu = 0, .consumer_cpu = 1, .duration = 5.0,
			       .slots = DEFAULT_SLOTS };
	while ((c = getopt_long(argc, argv, "p:c:d:s:H:jh", longopts, NULL)) != -1) {
		switch (c) {
		case 'p':
			if (parse_int(optarg, "--producer-cpu", -1, CPU_SETSIZE - 1, &v))
				return -1;
			o->producer_cpu = (int)v;
			break;
		case 'c':
			if (parse_int(optarg, "--consumer-cpu", -1, CPU_SETSIZE - 1, &v))
				return -1;
			o->consumer_cpu = (int)v;
			break;
		case 'd':
			errno = 0;
			o->duration = strtod(optarg, &end);
			if (errno || *end || end == optarg || !(o->duration > 0 && o->duration <= 86400)) {
				fprintf(stderr, "spscq: bad --duration '%s' (want seconds in (0, 86400])\n",
					optarg);
				return -1;
			}
			break;
		case 's':
			if (parse_int(optarg, "--slots", 2, 1L << 26, &v) || (v & (v - 1))) {
				fprintf(stderr, "spscq: --slots must be a power of two in [2, 2^26]\n");
				return -1;
			}
			o->slots = (uint64_t)v;
			break;
		case 'H':
			if (parse_int(optarg, "--hold", 0, 86400, &v))
				return -1;
			o->hold = (int)v;
			break;
		case 'j':
			o->json = 1;
			break;
		case 'h':
			usage(stdout);
			exit(0);
		default:
			usage(stderr);
			return -1;
		}
	}
	if (optind != argc) {
		fprintf(stderr, "spscq: unexpected argument '%s'\n", argv[optind]);
		return -1;
	}
	return 0;
}

int main(int argc, char **argv)
{
	struct options o;
	struct queue q = { 0 };
	struct side prod, cons;
	pthread_t tp, tc;
	double t0, t1, mpps;
	int err;

	if (parse_options(argc, argv, &o))
		return 2;
	q.mask = o.slots - 1;
	if (posix_memalign((void **)&q.slots, CACHE_LINE, o.slots * sizeof(uint64_t))) {
		fprintf(stderr, "spscq: out of memory for %llu slots\n", (unsigned long long)o.slots);
		return 1;
	}
	memset(q.slots, 0, o.slots * sizeof(uint64_t));
	prod = (struct side){ .q = &q, .cpu = o.producer_cpu, .role = "producer" };
	cons = (struct side){ .q = &q, .cpu = o.consumer_cpu, .role = "consumer" };

	if ((err = pthread_create(&tp, NULL, producer, &prod)) ||
	    (err = pthread_create(&tc, NULL, consumer, &cons))) {
		fprintf(stderr, "spscq: pthread_create: %s\n", strerror(err));
		return 1;
	}
	while (atomic_load(&ready_count) < 2)
		usleep(100);
	/* A thread that could not pin itself makes the run meaningless: stop now. */
	if (prod.pin_errno || cons.pin_errno)
		atomic_store(&stop_flag, 1);
	t0 = now_s();
	atomic_fetch_add_explicit(&ready_count, 1, memory_order_release);
	/* Sleep in slices so a signal-free run still ends on time. */
	while (!atomic_load(&stop_flag) && now_s() - t0 < o.duration)
		usleep(10000);
	atomic_store(&stop_flag, 1);
	t1 = now_s();
	pthread_join(tp, NULL);
	pthread_join(tc, NULL);

	for (struct side *s = &prod; s; s = (s == &prod) ? &cons : NULL) {
		if (s->pin_errno) {
			fprintf(stderr, "spscq: %s: pthread_setaffinity_np(cpu %d): %s\n", s->role,
				s->cpu, strerror(s->pin_errno));
			return 1;
		}
	}
	mpps = cons.count / (t1 - t0) / 1e6;
	if (o.json)
		printf("{\"mpps\": %.3f, \"packets\": %llu, \"seconds\": %.3f, "
		       "\"producer_cpu\": %d, \"consumer_cpu\": %d, "
		       "\"producer_ran_on\": %d, \"consumer_ran_on\": %d, \"slots\": %llu}\n",
		       mpps, (unsigned long long)cons.count, t1 - t0, o.producer_cpu, o.consumer_cpu,
		       prod.pinned_cpu, cons.pinned_cpu, (unsigned long long)o.slots);
	else
		printf("spscq: %.3f Mpps (%llu packets in %.3f s; producer cpu %d, consumer cpu %d)\n",
		       mpps, (unsigned long long)cons.count, t1 - t0, o.producer_cpu, o.consumer_cpu);
	fflush(stdout);
	if (o.hold)
		sleep((unsigned)o.hold);
	return 0;
}
