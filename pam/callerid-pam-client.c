/*
 * callerid-pam-client.c - ask the local callerid agent what it would tell pam_callerid.so.
 * Uses the module's own client code (client.c), so it exercises the exact same exchange.
 *
 *   callerid-pam-client [-s SOCKET] [-t MS] [-o OP] [-S SERVICE] [-r RHOST] [-T TTY]
 *                       [-N 0|1] [-C SSH_CONNECTION] USER
 *
 * -C "rip rport lip lport": lend the socket it names with the request (when this process
 * holds it), as the module does with the SSH_CONNECTION sshd puts into the PAM environment.
 * -N sends ns=0|1 (as the module does: whether it enters the job's namespaces; this tool never
 * does, it closes the fds). Prints "verdict=V job=J gid=G ns=KINDS reason=R msg=M" and the
 * timings. Exit status: 0 adopt/allow,
 * 1 deny, 2 verdict=error, 3 the agent could not be asked (unreachable, timeout, garbage),
 * 64 usage.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "client.h"

static int usage(void)
{
    fprintf(stderr, "usage: callerid-pam-client [-s SOCKET] [-t MS] [-o OP] [-S SERVICE] "
                    "[-r RHOST] [-T TTY] [-N 0|1] [-C SSH_CONNECTION] USER\n");
    return 64;
}

int main(int argc, char **argv)
{
    struct cid_request req = {"account", NULL, "callerid-pam-client", NULL, NULL, NULL, NULL};
    struct cid_result res;
    struct cid_reply *reply;
    char kinds[64] = "";
    unsigned i;
    const char *path = CID_DEFAULT_SOCKET;
    char *end = NULL;
    long timeout = CID_DEFAULT_TIMEOUT_MS;
    int status;
    int c;

    while ((c = getopt(argc, argv, "s:t:o:S:r:T:N:C:")) != -1) {
        switch (c) {
        case 's':
            path = optarg;
            break;
        case 't':
            errno = 0;
            timeout = strtol(optarg, &end, 10);
            if (errno != 0 || *end != '\0' || timeout < 1 || timeout > CID_MAX_TIMEOUT_MS)
                return usage();
            break;
        case 'o':
            req.op = optarg;
            break;
        case 'S':
            req.service = optarg;
            break;
        case 'r':
            req.rhost = optarg;
            break;
        case 'T':
            req.tty = optarg;
            break;
        case 'N':
            if (strcmp(optarg, "0") != 0 && strcmp(optarg, "1") != 0)
                return usage();
            req.ns = optarg;
            break;
        case 'C': /* lend the socket it names, as pam_callerid.so does with sshd's */
            req.connection = optarg;
            break;
        default:
            return usage();
        }
    }
    if (argc - optind != 1)
        return usage();
    req.user = argv[optind];
    if ((reply = calloc(1, sizeof(*reply))) == NULL)
        return 3;
    if (cid_exchange(path, (int)timeout, &req, reply, &res) != CID_OK) {
        fprintf(stderr, "callerid-pam-client: %s: %s at %s%s%s\n", path, cid_status_str(res.status),
                res.stage, res.sys_errno != 0 ? ": " : "",
                res.sys_errno != 0 ? strerror(res.sys_errno) : "");
        status = 3;
    } else {
        for (i = 0; i < reply->ns_count; i++) {
            strcat(kinds, i > 0 ? "," : "");
            strcat(kinds, cid_ns_name(reply->ns_kind[i]));
        }
        cid_close_fds(reply);
        printf("verdict=%s job=%s gid=%s ns=%s reason=%s msg=%s\n",
               cid_verdict_str(reply->verdict), reply->job, reply->gid, kinds, reply->reason,
               reply->msg);
        status = reply->verdict == CID_VERDICT_DENY    ? 1
                 : reply->verdict == CID_VERDICT_ERROR ? 2
                                                       : 0;
    }
    printf("timing connect_us=%ld send_us=%ld recv_us=%ld total_us=%ld\n", res.connect_us,
           res.send_us, res.recv_us, res.total_us);
    free(reply);
    return status;
}
