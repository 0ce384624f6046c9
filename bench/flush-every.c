/* flush-every DEV PERIOD_MS SECONDS: the application flush of bench/device.sh's I/O profile
 * (sustained-load test). It opens DEV and calls fsync(2) on it every PERIOD_MS milliseconds
 * for SECONDS seconds, on an absolute schedule (clock_nanosleep, TIMER_ABSTIME) so that the
 * period does not stretch by the time each fsync takes; a slot that an fsync overran is skipped
 * and counted as late. fsync of a block device is blkdev_fsync: it writes back the device's page
 * cache (nothing here: fio uses O_DIRECT) and then issues an empty REQ_PREFLUSH, i.e. a FLUSH
 * request to the driver (ublk: UBLK_IO_OP_FLUSH to the server) when the device advertises a
 * volatile write cache. The guest script checks that the flushes arrived by the flush counter of
 * /sys/block/DEV/stat (field 16) before and after. BLKFLSBUF (`blockdev --flushbufs`) would not
 * do: it only writes back and drops the page cache, without a FLUSH to the device.
 *
 * `flush-every DEV 0 0` makes one fsync at once (the guest script empties the null_blk devices'
 * write caches with it before each measurement).
 *
 * Prints one line on standard output at the end:
 *   FLUSHER flushes=N late=N mean_us=N max_us=N
 * Exits non-zero if DEV cannot be opened or an fsync fails.
 *
 * Built by bench/device.sh as a static binary (the guest has no libc of its own for it):
 *   cc -O2 -static -o flush-every bench/flush-every.c */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static long long ns(const struct timespec *t) { return (long long)t->tv_sec * 1000000000LL + t->tv_nsec; }

static struct timespec from_ns(long long v) {
    struct timespec t = { .tv_sec = v / 1000000000LL, .tv_nsec = v % 1000000000LL };
    return t;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s DEV PERIOD_MS SECONDS\n", argv[0]);
        return 2;
    }
    long period_ms = atol(argv[2]), secs = atol(argv[3]);
    int once = period_ms == 0 && secs == 0;
    if (!once && (period_ms <= 0 || secs <= 0)) {
        fprintf(stderr, "flush-every: PERIOD_MS and SECONDS must be positive\n");
        return 2;
    }
    int fd = open(argv[1], O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        fprintf(stderr, "flush-every: open %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    if (once) {
        if (fsync(fd) != 0) {
            fprintf(stderr, "flush-every: fsync %s: %s\n", argv[1], strerror(errno));
            return 1;
        }
        return 0;
    }
    const long long period = period_ms * 1000000LL;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    const long long start = ns(&now), end = start + secs * 1000000000LL;
    long long next = start + period, total_ns = 0, max_ns = 0;
    long flushes = 0, late = 0;
    while (next <= end) {
        struct timespec at = from_ns(next);
        int rc;
        while ((rc = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &at, NULL)) == EINTR)
            ;
        if (rc != 0) {
            fprintf(stderr, "flush-every: clock_nanosleep: %s\n", strerror(rc));
            return 1;
        }
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        if (fsync(fd) != 0) {
            fprintf(stderr, "flush-every: fsync %s: %s\n", argv[1], strerror(errno));
            return 1;
        }
        clock_gettime(CLOCK_MONOTONIC, &b);
        long long took = ns(&b) - ns(&a);
        total_ns += took;
        if (took > max_ns)
            max_ns = took;
        flushes++;
        /* The next slot on the fixed grid; slots an fsync ran over are skipped, not bunched up. */
        next += period;
        while (next <= ns(&b)) {
            next += period;
            late++;
        }
    }
    printf("FLUSHER flushes=%ld late=%ld mean_us=%lld max_us=%lld\n", flushes, late,
           flushes ? total_ns / flushes / 1000 : 0, max_ns / 1000);
    return 0;
}
