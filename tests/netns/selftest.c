/* Self-test program for netns_mpi.sh (run by selftest.sh, built with mpicc).
 *
 *   selftest info   every rank reports its network namespace, hostname,
 *                   /dev/shm device and MPI_COMM_TYPE_SHARED group; rank 0
 *                   checks that the groups are exactly the R ranks of one
 *                   namespace-host, that hosts differ in namespace, hostname
 *                   and /dev/shm, that no rank is in SELFTEST_ROOT_NS (the
 *                   namespace of the caller), and that Allreduce/Alltoall
 *                   across hosts (TCP) deliver the right data. Prints
 *                   "selftest: info OK" and exits 0, or "selftest: FAIL: ..."
 *                   and exits 1.
 *   selftest cut    two ranks exchange messages (MPI_Isend/MPI_Irecv polled
 *                   with MPI_Test, 3 s deadline each); after some good
 *                   exchanges rank 0 creates $MOEDIST_NETNS_CUT_FILE, the
 *                   harness cuts host 1 off, and each rank then writes
 *                   "rank R: no reply within 3 s after cut" to
 *                   $MOEDIST_NETNS_DIR/rank-R.txt and exits 1.
 */
#define _GNU_SOURCE
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

enum { TEXT = 64 };

struct info {
    char netns[TEXT];
    char host[TEXT];
    long long shm_dev;
    int local_size, local_min, local_max; /* world ranks in the SHARED comm */
    int vader;                            /* a vader segment is mapped */
};

static int env_int(const char *name) {
    const char *v = getenv(name);
    return v ? atoi(v) : -1;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* True when this process maps Open MPI's vader shared-memory segment. */
static int maps_vader_segment(void) {
    FILE *f = fopen("/proc/self/maps", "r");
    char line[4096];
    int found = 0;
    if (!f) return 0;
    while (!found && fgets(line, sizeof line, f)) found = strstr(line, "vader_segment") != NULL;
    fclose(f);
    return found;
}

static int fail(const char *what, int rank) {
    printf("selftest: FAIL: %s (rank %d)\n", what, rank);
    return 1;
}

static int run_info(int rank, int size) {
    const int per_host = env_int("MOEDIST_NETNS_RANKS_PER_HOST");
    const int hosts = env_int("MOEDIST_NETNS_HOSTS");
    const char *root_ns = getenv("SELFTEST_ROOT_NS");
    struct info me, *all = NULL;
    struct stat st;
    MPI_Comm local;
    int bad = 0;

    memset(&me, 0, sizeof me);
    if (readlink("/proc/self/ns/net", me.netns, TEXT - 1) < 0) strcpy(me.netns, "?");
    gethostname(me.host, TEXT - 1);
    me.shm_dev = stat("/dev/shm", &st) == 0 ? (long long)st.st_dev : -1;

    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &local);
    MPI_Comm_size(local, &me.local_size);
    MPI_Allreduce(&rank, &me.local_min, 1, MPI_INT, MPI_MIN, local);
    MPI_Allreduce(&rank, &me.local_max, 1, MPI_INT, MPI_MAX, local);

    /* Cross-host traffic: a sum everyone must agree on, and an Alltoall with
     * 256 KiB per pair (past the eager limit, so TCP rendezvous is used). */
    {
        long long sum = 0, want = (long long)size * (size - 1) / 2, r = rank;
        const int n = 64 * 1024;
        int *out = malloc(sizeof(int) * n * size), *in = malloc(sizeof(int) * n * size);
        MPI_Allreduce(&r, &sum, 1, MPI_LONG_LONG, MPI_SUM, MPI_COMM_WORLD);
        if (sum != want) bad |= fail("Allreduce sum wrong", rank);
        for (int p = 0; p < size; ++p)
            for (int i = 0; i < n; ++i) out[p * n + i] = rank * 1000003 + p * 7 + i;
        MPI_Alltoall(out, n, MPI_INT, in, n, MPI_INT, MPI_COMM_WORLD);
        for (int p = 0; p < size && !bad; ++p)
            for (int i = 0; i < n; ++i)
                if (in[p * n + i] != p * 1000003 + rank * 7 + i) {
                    bad |= fail("Alltoall data wrong", rank);
                    break;
                }
        free(out);
        free(in);
    }
    me.vader = maps_vader_segment();

    if (rank == 0) all = malloc(sizeof *all * size);
    MPI_Gather(&me, sizeof me, MPI_BYTE, all, sizeof me, MPI_BYTE, 0, MPI_COMM_WORLD);
    MPI_Allreduce(MPI_IN_PLACE, &bad, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);

    if (rank == 0) {
        if (!root_ns) bad |= fail("SELFTEST_ROOT_NS was not forwarded (--env)", 0);
        if (per_host < 1 || hosts < 1 || hosts * per_host != size)
            bad |= fail("MOEDIST_NETNS_HOSTS/RANKS_PER_HOST do not match the world size", 0);
        for (int r = 0; r < size && per_host > 0; ++r) {
            const struct info *a = &all[r];
            const int h = r / per_host, lo = h * per_host, hi = lo + per_host - 1;
            printf("selftest: rank %d host %d netns %s hostname %s shm_dev %llx local_size %d"
                   " local_ranks %d-%d vader %s\n",
                   r, h, a->netns, a->host, a->shm_dev, a->local_size, a->local_min, a->local_max,
                   a->vader ? "yes" : "no");
            if (a->local_size != per_host || a->local_min != lo || a->local_max != hi)
                bad |= fail("MPI_COMM_TYPE_SHARED group is not exactly the ranks of one host", r);
            if (root_ns && strcmp(a->netns, root_ns) == 0)
                bad |= fail("rank runs in the caller's network namespace", r);
            if (per_host > 1 && !a->vader)
                bad |= fail("no vader shared-memory segment between ranks of one host", r);
            for (int q = 0; q < r; ++q) {
                const struct info *b = &all[q];
                const int same_host = q / per_host == h;
                if (same_host != (strcmp(a->netns, b->netns) == 0))
                    bad |= fail("network namespace does not match host placement", r);
                if (same_host != (strcmp(a->host, b->host) == 0))
                    bad |= fail("hostname does not match host placement", r);
                if (same_host != (a->shm_dev == b->shm_dev))
                    bad |= fail("/dev/shm is not private per host", r);
            }
        }
        printf(bad ? "selftest: info FAILED\n" : "selftest: info OK\n");
        fflush(stdout);
        free(all);
    }
    MPI_Bcast(&bad, 1, MPI_INT, 0, MPI_COMM_WORLD);
    MPI_Comm_free(&local);
    return bad ? 1 : 0;
}

/* One exchange with the peer: both send and receive, polled with MPI_Test
 * until done or until `deadline_s` passed. Returns 1 on success. */
static int exchange(int rank, int peer, int seq, double deadline_s) {
    int out = rank * 100000 + seq, in = -1, done_s = 0, done_r = 0;
    MPI_Request rq[2];
    const double end = now_s() + deadline_s;
    MPI_Irecv(&in, 1, MPI_INT, peer, seq, MPI_COMM_WORLD, &rq[0]);
    MPI_Isend(&out, 1, MPI_INT, peer, seq, MPI_COMM_WORLD, &rq[1]);
    while (!(done_r && done_s)) {
        if (!done_r) MPI_Test(&rq[0], &done_r, MPI_STATUS_IGNORE);
        if (!done_s) MPI_Test(&rq[1], &done_s, MPI_STATUS_IGNORE);
        if (now_s() > end) return 0; /* requests stay pending; we exit soon */
        usleep(200);
    }
    return in == peer * 100000 + seq;
}

static void write_rank_file(int rank, const char *text) {
    const char *dir = getenv("MOEDIST_NETNS_DIR");
    char path[4096];
    FILE *f;
    snprintf(path, sizeof path, "%s/rank-%d.txt", dir ? dir : ".", rank);
    f = fopen(path, "w");
    if (f) {
        fprintf(f, "%s\n", text);
        fclose(f);
    }
    printf("%s\n", text);
    fflush(stdout);
}

static int run_cut(int rank, int size) {
    const char *cut_file = getenv("MOEDIST_NETNS_CUT_FILE");
    const int before = 20; /* good exchanges before asking for the cut */
    const double give_up_s = 15; /* the cut never came: fail, don't hang */
    char text[256];
    double cut_at = 0;
    int seq = 0, after = 0;

    if (size != 2 || !cut_file) {
        if (rank == 0) printf("selftest: FAIL: cut mode needs 2 ranks and --cut-after-file\n");
        return 2;
    }
    for (; seq < before; ++seq)
        if (!exchange(rank, 1 - rank, seq, 3.0)) {
            snprintf(text, sizeof text, "rank %d: exchange %d failed before the cut", rank, seq);
            write_rank_file(rank, text);
            return 2;
        }
    if (rank == 0) {
        FILE *f = fopen(cut_file, "w");
        if (f) fclose(f);
    }
    cut_at = now_s();
    for (;; ++seq, ++after) {
        if (!exchange(rank, 1 - rank, seq, 3.0)) {
            snprintf(text, sizeof text,
                     "rank %d: no reply within 3 s after cut (%d good exchanges before, %d after"
                     " the cut file, gave up %.1f s after it)",
                     rank, before, after, now_s() - cut_at);
            write_rank_file(rank, text);
            return 1;
        }
        if (now_s() - cut_at > give_up_s) {
            snprintf(text, sizeof text, "rank %d: still connected %.0f s after the cut file", rank,
                     give_up_s);
            write_rank_file(rank, text);
            return 2;
        }
        usleep(1000);
    }
}

int main(int argc, char **argv) {
    int rank, size, rc;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (argc == 2 && strcmp(argv[1], "info") == 0) {
        rc = run_info(rank, size);
    } else if (argc == 2 && strcmp(argv[1], "cut") == 0) {
        rc = run_cut(rank, size);
        /* Leave without MPI_Finalize: its barrier-like teardown would wait
         * for the unreachable peer. */
        fflush(stdout);
        _exit(rc);
    } else {
        if (rank == 0) fprintf(stderr, "usage: %s info|cut\n", argv[0]);
        rc = 2;
    }
    MPI_Finalize();
    return rc;
}
