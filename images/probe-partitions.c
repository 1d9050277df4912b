/* 6.1 cgroup v2 cpuset partition probe: run as /init in a tiny initramfs. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/reboot.h>
#include <sys/wait.h>
#include <time.h>
#define R "/sys/fs/cgroup"
static void w(const char *p, const char *v) {
  int fd = open(p, O_WRONLY); int rc = -1, e = 0;
  if (fd >= 0) { rc = write(fd, v, strlen(v)); e = errno; close(fd); } else e = errno;
  printf("W %s <- '%s' : %s\n", p, v, rc < 0 ? strerror(e) : "ok");
}
static void r(const char *p) {
  char b[256] = {0}; int fd = open(p, O_RDONLY);
  if (fd < 0) { printf("R %s : %s\n", p, strerror(errno)); return; }
  int n = read(fd, b, 255); close(fd); if (n > 0 && b[n-1] == '\n') b[n-1] = 0;
  printf("R %s = '%s'\n", p, b);
}
static int pipefd[2];
static void *spin(void *a) { (void)a; int t = syscall(SYS_gettid); write(pipefd[1], &t, sizeof t); for (;;) pause(); }
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec*1e3+t.tv_nsec/1e6;}
static void wq(const char *p, const char *v){int fd=open(p,O_WRONLY);if(fd>=0){write(fd,v,strlen(v));close(fd);}}
int main(void) {
  mount("proc", "/proc", "proc", 0, 0); mount("sysfs", "/sys", "sysfs", 0, 0);
  mount("cgroup2", R, "cgroup2", 0, 0);
  printf("=== PROBE START\n");
  r(R "/cgroup.controllers"); w(R "/cgroup.subtree_control", "+cpuset");
  r(R "/cpuset.cpus.effective");
  mkdir(R "/x", 0755); w(R "/x/cgroup.subtree_control", "+cpuset");
  r(R "/x/cpuset.cpus.exclusive"); r(R "/x/cpuset.cpus.partition");
  printf("--- T0 scratch: empty cpus root partition\n");
  w(R "/x/cpuset.cpus.partition", "root"); r(R "/x/cpuset.cpus.partition"); w(R "/x/cpuset.cpus.partition", "member");
  printf("--- T0b scratch: isolated type\n");
  w(R "/x/cpuset.cpus", "3"); w(R "/x/cpuset.cpus.partition", "isolated"); r(R "/x/cpuset.cpus.partition");
  r(R "/cpuset.cpus.effective"); w(R "/x/cpuset.cpus.partition", "member"); r(R "/cpuset.cpus.effective");
  w(R "/x/cpuset.cpus", "");
  /* a process with 3 threads */
  pipe(pipefd);
  pid_t pid = fork();
  if (pid == 0) { pthread_t t; for (int i = 0; i < 2; i++) pthread_create(&t, 0, spin, 0); spin(0); }
  int tids[3]; for (int i = 0; i < 3; i++) read(pipefd[0], &tids[i], sizeof(int));
  char s[64];
  printf("--- T1 layout x(slice)/vm(domain, threaded domain)/{emu,vcpu0,vcpu1} threaded; pid %d\n", pid);
  mkdir(R "/x/vm", 0755); w(R "/x/vm/cgroup.subtree_control", "+cpuset");
  snprintf(s, sizeof s, "%d", pid); w(R "/x/vm/cgroup.procs", s);
  mkdir(R "/x/vm/emu", 0755); mkdir(R "/x/vm/vcpu0", 0755); mkdir(R "/x/vm/vcpu1", 0755);
  w(R "/x/vm/emu/cgroup.type", "threaded"); w(R "/x/vm/vcpu0/cgroup.type", "threaded"); w(R "/x/vm/vcpu1/cgroup.type", "threaded");
  snprintf(s, sizeof s, "%d", tids[0]); w(R "/x/vm/vcpu0/cgroup.threads", s);
  snprintf(s, sizeof s, "%d", tids[1]); w(R "/x/vm/vcpu1/cgroup.threads", s);
  snprintf(s, sizeof s, "%d", tids[2]); w(R "/x/vm/emu/cgroup.threads", s);
  r(R "/x/vm/cgroup.type"); r(R "/x/vm/vcpu0/cpuset.cpus.effective");
  printf("--- T6 valid chain: x=1-3 root, vm=1,3 root, vcpu0 (threaded) isolated 3\n");
  w(R "/x/cpuset.cpus", "1-3"); w(R "/x/cpuset.cpus.partition", "root"); r(R "/x/cpuset.cpus.partition");
  w(R "/x/vm/cpuset.cpus", "1,3"); w(R "/x/vm/cpuset.cpus.partition", "root"); r(R "/x/vm/cpuset.cpus.partition");
  w(R "/x/vm/vcpu0/cpuset.cpus", "3"); w(R "/x/vm/vcpu0/cpuset.cpus.partition", "isolated"); r(R "/x/vm/vcpu0/cpuset.cpus.partition");
  r(R "/cpuset.cpus.effective"); r(R "/x/cpuset.cpus.effective"); r(R "/x/vm/cpuset.cpus.effective"); r(R "/x/vm/emu/cpuset.cpus.effective"); r(R "/x/vm/vcpu0/cpuset.cpus.effective");
  snprintf(s, sizeof s, "/proc/%d/status", tids[0]);
  { char b[4096]; FILE *f = fopen(s, "r"); while (f && fgets(b, sizeof b, f)) if (!strncmp(b, "Cpus_allowed_list", 17)) printf("vcpu0 %s", b); if (f) fclose(f); }
  printf("--- T6b shrink x to 1,3 (exactly vm's)\n");
  w(R "/x/cpuset.cpus", "1,3"); r(R "/x/cpuset.cpus.partition"); r(R "/x/vm/cpuset.cpus.partition"); r(R "/x/vm/vcpu0/cpuset.cpus.partition"); r(R "/cpuset.cpus.effective");
  printf("--- T6c vcpu1 isolated on 1 (vm's last cpu, emu populated)\n");
  w(R "/x/vm/vcpu1/cpuset.cpus", "1"); w(R "/x/vm/vcpu1/cpuset.cpus.partition", "isolated"); r(R "/x/vm/vcpu1/cpuset.cpus.partition");
  w(R "/x/vm/vcpu1/cpuset.cpus.partition", "member"); w(R "/x/vm/vcpu1/cpuset.cpus", "");
  printf("--- T6d latency: vcpu0 member/isolated x100 on the valid chain\n");
  double t0 = now();
  for (int i = 0; i < 100; i++) { wq(R "/x/vm/vcpu0/cpuset.cpus.partition", "member"); wq(R "/x/vm/vcpu0/cpuset.cpus.partition", "isolated"); }
  printf("100 unpin+pin cycles: %.1f ms\n", now() - t0);
  r(R "/x/vm/vcpu0/cpuset.cpus.partition"); r(R "/cpuset.cpus.effective");
  printf("--- T6e unpin + shrink chain to empty\n");
  w(R "/x/vm/vcpu0/cpuset.cpus.partition", "member"); w(R "/x/vm/vcpu0/cpuset.cpus", "");
  r(R "/x/vm/cpuset.cpus.partition"); r(R "/cpuset.cpus.effective");
  w(R "/x/vm/cpuset.cpus.partition", "member"); w(R "/x/vm/cpuset.cpus", "");
  w(R "/x/cpuset.cpus.partition", "member"); w(R "/x/cpuset.cpus", "");
  r(R "/cpuset.cpus.effective"); r(R "/x/vm/emu/cpuset.cpus.effective");
  printf("--- T5 domain (non-threaded) vcpu: separate process in x/d/c isolated\n");
  kill(pid, SIGKILL); waitpid(pid, 0, 0);
  printf("=== PROBE END\n"); fflush(stdout);
  reboot(RB_POWER_OFF); return 0;
}
