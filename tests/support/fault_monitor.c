/* One stand-in sshd monitor for the fault tests (tests/support/faultstorm.py), in C.
 *
 * The same command line as bench/storm_monitor.c (so bench/_standin_sshd.py execs it with
 * the session connection held), but every request goes through pam_callerid.so's own client
 * code (pam/client.c: cid_exchange, one deadline over connect + send + receive), so each
 * login ends exactly as the module would see it. Requests are sequential (one login at a
 * time, as a real monitor). The deadline is CALLERID_FAULT_TIMEOUT_MS (default: the
 * module's 2500 ms). It writes one JSON object to OUT:
 *
 *     {"job": "42", "res": [[start, ms, "outcome"], ...], "lat": [ms, ...], "nbad": N, "bad": [],
 *      "first": t0, "last": t1}
 *
 * start is CLOCK_MONOTONIC seconds (the same clock as Python's time.monotonic), outcome is
 * "<verdict>:<reason>:<job>" for an answer or "fail:<cid_status_str>:" when the agent could
 * not be asked (the module then applies on_error); first/last are wall-clock seconds.
 *
 * usage: fault-monitor AGENT_SOCK LINE JOB REQUESTS INFLIGHT GO_FD OUT
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "client.h"

#define MAX_REQUESTS 1000
#define OUTCOME_MAX 160

static double now(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* The value of `key=` in the request line, copied into out[cap] ("" when absent). */
static void field(const char *line, const char *key, char *out, size_t cap)
{
    char pat[32];
    snprintf(pat, sizeof(pat), " %s=", key);
    const char *at = strstr(line, pat);
    size_t n = 0;
    if (at != NULL)
        for (at += strlen(pat); at[n] != '\0' && at[n] != ' ' && at[n] != '\n'; n++)
            ;
    if (n >= cap)
        n = cap - 1;
    memcpy(out, at != NULL ? at : "", n);
    out[n] = '\0';
}

int main(int argc, char **argv)
{
    if (argc != 8) {
        fprintf(stderr, "usage: %s SOCK LINE JOB REQUESTS INFLIGHT GO_FD OUT\n", argv[0]);
        return 2;
    }
    int todo = atoi(argv[4]), go_fd = atoi(argv[6]);
    const char *env = getenv("CALLERID_FAULT_TIMEOUT_MS");
    int timeout_ms = env != NULL ? atoi(env) : CID_DEFAULT_TIMEOUT_MS;
    if (todo < 1 || todo > MAX_REQUESTS || timeout_ms < 1) {
        fprintf(stderr, "fault-monitor: bad counts\n");
        return 2;
    }
    char user[256], service[64], rhost[64], tty[64];
    field(argv[2], "user", user, sizeof(user));
    field(argv[2], "service", service, sizeof(service));
    field(argv[2], "rhost", rhost, sizeof(rhost));
    field(argv[2], "tty", tty, sizeof(tty));
    struct cid_request req = {"account", user, service, rhost, tty};

    for (;;) { /* EOF on go_fd: every monitor starts together */
        char c;
        ssize_t r = read(go_fd, &c, 1);
        if (r > 0 || (r < 0 && errno == EINTR))
            continue;
        break;
    }
    close(go_fd);

    static double start[MAX_REQUESTS], ms[MAX_REQUESTS];
    static char outcome[MAX_REQUESTS][OUTCOME_MAX];
    struct cid_reply *reply = calloc(1, sizeof(*reply));
    if (reply == NULL)
        return 1;
    double first = now(CLOCK_REALTIME), last = first;
    for (int i = 0; i < todo; i++) {
        struct cid_result res;
        start[i] = now(CLOCK_MONOTONIC);
        int st = cid_exchange(argv[1], timeout_ms, &req, reply, &res);
        ms[i] = (now(CLOCK_MONOTONIC) - start[i]) * 1000.0;
        if (st == CID_OK)
            snprintf(outcome[i], OUTCOME_MAX, "%s:%.60s:%s", cid_verdict_str(reply->verdict),
                     reply->reason, reply->job);
        else
            snprintf(outcome[i], OUTCOME_MAX, "fail:%s:", cid_status_str(st));
        for (char *p = outcome[i]; *p; p++) /* JSON-safe: reasons are machine words */
            if (*p == '"' || *p == '\\' || *p < 0x20)
                *p = '?';
        last = now(CLOCK_REALTIME);
    }

    FILE *out = fopen(argv[7], "w");
    if (out == NULL) {
        perror("fault-monitor: output");
        return 1;
    }
    fprintf(out, "{\"job\": \"%s\", \"res\": [", argv[3]);
    for (int i = 0; i < todo; i++)
        fprintf(out, "%s[%.6f, %.4f, \"%s\"]", i ? ", " : "", start[i], ms[i], outcome[i]);
    fprintf(out, "], \"lat\": [");
    for (int i = 0; i < todo; i++)
        fprintf(out, "%s%.4f", i ? ", " : "", ms[i]);
    fprintf(out, "], \"nbad\": 0, \"bad\": [], \"first\": %.6f, \"last\": %.6f}\n", first, last);
    free(reply);
    return fclose(out) == 0 ? 0 : 1;
}
