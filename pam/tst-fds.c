/*
 * tst-fds.c - the reply's fds through the module's own client (client.c, codec.c, nsjoin.c).
 *
 * A forked stand-in agent listens on a unix socket in a private directory, reads the request
 * line and answers with a reply line carrying fds (SCM_RIGHTS on its bytes, one sendmsg as the
 * agent does, or split over two). Each case checks cid_exchange's status, what the reply owns,
 * that every received fd is close-on-exec, and that no fd is left open in this process on any
 * path (the fds in /proc/self/fd are counted before and after). Then cid_join_namespaces:
 * namespaces this process is in already are skipped; an fd that is not a namespace is refused.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "client.h"

static int failures;

#define CHECK(cond, what)                                                                      \
    do {                                                                                       \
        if (!(cond)) {                                                                         \
            fprintf(stderr, "FAIL %s: %s (line %d)\n", what, #cond, __LINE__);              \
            failures++;                                                                        \
        }                                                                                      \
    } while (0)

static int open_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    int n = 0;

    if (d == NULL)
        return -1;
    while ((e = readdir(d)) != NULL)
        n += e->d_name[0] != '.';
    closedir(d);
    return n - 1; /* the directory's own fd */
}

/* The stand-in agent: one connection, the reply `line` sent with `nfds` fds of /dev/null (of
 * /proc/self/ns/<kind> when `kind` is set); `split`: the fds on a second sendmsg. */
static void agent(int lsock, const char *line, int nfds, const char *kind, int split)
{
    char buf[CID_LINE_MAX];
    union {
        char buf[CMSG_SPACE(sizeof(int) * 16)];
        struct cmsghdr align;
    } ctl;
    struct msghdr msg;
    struct iovec iov;
    struct cmsghdr *c;
    char path[64];
    int fds[16];
    int conn;
    int i;

    if ((conn = accept(lsock, NULL, NULL)) < 0)
        _exit(2);
    if (read(conn, buf, sizeof(buf)) <= 0)
        _exit(2);
    snprintf(path, sizeof(path), "/proc/self/ns/%s", kind != NULL ? kind : "");
    for (i = 0; i < nfds; i++)
        fds[i] = open(kind != NULL ? path : "/dev/null", O_RDONLY);
    if (split) {
        if (write(conn, line, 1) != 1)
            _exit(2);
        line++;
    }
    memset(&msg, 0, sizeof(msg));
    iov.iov_base = (void *)line;
    iov.iov_len = strlen(line);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (nfds > 0) {
        msg.msg_control = ctl.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
        c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
    }
    if (sendmsg(conn, &msg, MSG_NOSIGNAL) < 0)
        _exit(3);
    close(conn);
    _exit(0);
}

struct tcase {
    const char *name;
    const char *line;
    int nfds;
    const char *kind;
    int split;
    enum cid_status want_status;
    unsigned want_fds; /* owned by the reply on CID_OK */
};

static void run_case(const char sock_path[64], const struct tcase *t)
{
    struct cid_request req = {"account", "alice", "sshd", "10.0.0.1", "ssh", "1", NULL};
    struct cid_reply *reply = calloc(1, sizeof(*reply));
    struct cid_result res;
    struct sockaddr_un sa;
    int before = open_fds();
    int lsock;
    int st = 0;
    unsigned i;
    pid_t pid;

    memset(&sa, 0, sizeof(sa));
    sa.sun_family = AF_UNIX;
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", sock_path);
    unlink(sock_path);
    lsock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (reply == NULL || lsock < 0 || bind(lsock, (struct sockaddr *)&sa, sizeof(sa)) != 0 ||
        listen(lsock, 1) != 0) {
        perror("tst-fds: listen");
        exit(1);
    }
    if ((pid = fork()) == 0)
        agent(lsock, t->line, t->nfds, t->kind, t->split);
    close(lsock);
    cid_exchange(sock_path, 2000, &req, reply, &res);
    waitpid(pid, &st, 0);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, t->name);
    CHECK(res.status == t->want_status, t->name);
    CHECK(res.got_fds == (unsigned)t->nfds || t->nfds > CID_NS_MAX, t->name);
    if (res.status != t->want_status)
        fprintf(stderr, "  %s: status %s\n", t->name, cid_status_str(res.status));
    CHECK(reply->nfds == (res.status == CID_OK ? t->want_fds : 0), t->name);
    for (i = 0; i < reply->nfds; i++)
        CHECK((fcntl(reply->fds[i], F_GETFD) & FD_CLOEXEC) != 0, t->name);
    CHECK(open_fds() == before + (int)reply->nfds, t->name);
    cid_close_fds(reply);
    cid_close_fds(reply); /* idempotent */
    CHECK(open_fds() == before, t->name);
    free(reply);
}

static void test_join(void)
{
    struct cid_reply r;
    unsigned failed = 99;

    memset(&r, 0, sizeof(r));
    r.ns_count = r.nfds = 2; /* this process's own: both skipped (joining one's own user
                              * namespace would fail with EINVAL) */
    r.ns_kind[0] = 0;
    r.ns_kind[1] = 1;
    r.fds[0] = open("/proc/self/ns/user", O_RDONLY);
    r.fds[1] = open("/proc/self/ns/mnt", O_RDONLY);
    CHECK(cid_join_namespaces(&r, &failed) == 0, "join own namespaces");
    cid_close_fds(&r);
    r.ns_count = r.nfds = 1; /* not a namespace: refused, nothing entered */
    r.ns_kind[0] = 1;
    r.fds[0] = open("/dev/null", O_RDONLY);
    errno = 0;
    CHECK(cid_join_namespaces(&r, &failed) == -1 && errno == EINVAL && failed == 0,
          "join /dev/null");
    cid_close_fds(&r);
    r.ns_count = 2; /* fds that do not match the kinds */
    r.nfds = 1;
    r.fds[0] = open("/dev/null", O_RDONLY);
    CHECK(cid_join_namespaces(&r, &failed) == -1, "join mismatched");
    cid_close_fds(&r);
}

int main(void)
{
    static const struct tcase cases[] = {
        {"one fd, named", "CALLERID/1 verdict=adopt reason=callerid job=42 ns=mnt msg=\n", 1,
         NULL, 0, CID_OK, 1},
        {"two fds, named", "CALLERID/1 verdict=adopt reason=callerid job=42 ns=mnt,pid msg=\n",
         2, NULL, 0, CID_OK, 2},
        {"fds on the second part",
         "CALLERID/1 verdict=adopt reason=callerid job=42 ns=user,mnt msg=\n", 2, NULL, 1,
         CID_OK, 2},
        {"no ns, no fds", "CALLERID/1 verdict=adopt reason=callerid job=42 msg=\n", 0, NULL, 0,
         CID_OK, 0},
        {"more fds than named", "CALLERID/1 verdict=adopt reason=callerid job=42 ns=mnt msg=\n",
         2, NULL, 0, CID_E_FDS, 0},
        {"fewer fds than named",
         "CALLERID/1 verdict=adopt reason=callerid job=42 ns=mnt,pid msg=\n", 1, NULL, 0,
         CID_E_FDS, 0},
        {"named, none sent", "CALLERID/1 verdict=adopt reason=callerid job=42 ns=mnt msg=\n", 0,
         NULL, 0, CID_E_FDS, 0},
        {"fds without ns", "CALLERID/1 verdict=adopt reason=callerid job=42 msg=\n", 1, NULL, 0,
         CID_E_FDS, 0},
        {"fds with a deny", "CALLERID/1 verdict=deny reason=no_jobs msg=\n", 1, NULL, 0,
         CID_E_FDS, 0},
        {"more than CID_NS_MAX", "CALLERID/1 verdict=adopt reason=callerid job=42 ns=mnt msg=\n",
         12, NULL, 0, CID_E_FDS, 0},
        {"garbage with fds", "CALLERID/1 verdict=adopt reason=callerid job=42 ns=time msg=\n", 1,
         NULL, 0, CID_E_GARBAGE, 0},
        {"ns with a deny", "CALLERID/1 verdict=deny reason=x ns=mnt msg=\n", 1, NULL, 0,
         CID_E_GARBAGE, 0},
        {"no newline", "CALLERID/1 verdict=adopt reason=callerid job=42 ns=mnt msg=", 1, NULL, 0,
         CID_E_EOF, 0},
        {"namespace fds", "CALLERID/1 verdict=adopt reason=callerid job=42 ns=mnt msg=\n", 1,
         "mnt", 0, CID_OK, 1},
    };
    char dir[] = "/tmp/tst-fds.XXXXXX";
    char path[64];
    size_t i;

    signal(SIGPIPE, SIG_IGN);
    if (mkdtemp(dir) == NULL) {
        perror("tst-fds: mkdtemp");
        return 1;
    }
    snprintf(path, sizeof(path), "%s/agent.sock", dir);
    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        run_case(path, &cases[i]);
    test_join();
    unlink(path);
    rmdir(dir);
    if (failures != 0) {
        fprintf(stderr, "tst-fds: %d failure(s)\n", failures);
        return 1;
    }
    printf("tst-fds: %zu exchanges and the join checks passed\n", sizeof(cases) / sizeof(cases[0]));
    return 0;
}
