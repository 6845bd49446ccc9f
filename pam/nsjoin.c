/*
 * nsjoin.c - enter the job's namespaces whose fds came with an adopt reply (client.h). No PAM:
 * the module calls it after the agent adopted this process (the sshd monitor) into the job, so
 * the session it forks next starts inside them; the test programs call it too.
 *
 * Before anything is entered, each fd is compared (device and inode) with the namespace this
 * process is in already (/proc/self/ns/<kind>; for pid, pid_for_children, the one setns
 * changes); those are skipped (setns into one's own user namespace fails with EINVAL). The
 * rest are entered in the reply's order with setns(fd, CLONE_NEW<kind>): the kernel refuses
 * an fd that is not a namespace of that kind. The first failure stops: the caller denies.
 */
#define _GNU_SOURCE
#include "client.h"

#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

/* Whether `fd` is the namespace of kind `kind` this process is in (for pid: its children). */
static int already_in(int fd, int kind)
{
    char path[64];
    const char *name = cid_ns_name(kind);
    struct stat a;
    struct stat b;
    int n;

    if (name == NULL)
        return 0;
    n = snprintf(path, sizeof(path), "/proc/self/ns/%s",
                 strcmp(name, "pid") == 0 ? "pid_for_children" : name);
    if (n < 0 || (size_t)n >= sizeof(path))
        return 0;
    if (fstat(fd, &a) != 0 || stat(path, &b) != 0)
        return 0;
    return a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

int cid_join_namespaces(const struct cid_reply *reply, unsigned *failed)
{
    int skip[CID_NS_MAX];
    unsigned i;
    int type;

    *failed = 0;
    if (reply->nfds != reply->ns_count || reply->nfds > CID_NS_MAX) {
        errno = EINVAL;
        return -1;
    }
    for (i = 0; i < reply->nfds; i++) /* all compared before the first setns */
        skip[i] = already_in(reply->fds[i], reply->ns_kind[i]);
    for (i = 0; i < reply->nfds; i++) {
        if (skip[i])
            continue;
        if ((type = cid_ns_type(reply->ns_kind[i])) == 0) {
            *failed = i;
            errno = EINVAL;
            return -1;
        }
        if (setns(reply->fds[i], type) != 0) {
            *failed = i;
            return -1;
        }
    }
    return 0;
}
