/*
 * client.c - the bounded exchange with the callerid agent (see client.h for the contract;
 * codec.c encodes the request and parses the reply).
 *
 * One deadline (CLOCK_MONOTONIC) covers connect + send + receive. The socket is
 * non-blocking, close-on-exec, and every send uses MSG_NOSIGNAL so that a vanished agent
 * can never kill sshd with SIGPIPE. EINTR and EAGAIN are handled in exactly one place
 * (xfer_some and the poll in wait_ready).
 *
 * The reply is read with recvmsg(MSG_CMSG_CLOEXEC): fds passed with it (SCM_RIGHTS, the job's
 * namespaces) are collected, at most CID_NS_MAX of them; more, truncated or other control
 * data, or a count that differs from the reply's ns= field is CID_E_FDS. Every fd received is
 * closed on every path but success, where the reply owns them.
 *
 * With req->connection (sshd's SSH_CONNECTION) the request's bytes carry the socket it names,
 * when this process holds it (session_socket): lent, not given; the process keeps it.
 */
#define _GNU_SOURCE
#include "client.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define CONNECT_RETRY_MS 10 /* pause between connect() tries while the backlog is full */

enum xfer_dir { XFER_SEND, XFER_RECV };

/* The fds that came with the reply so far. */
struct fdbox {
    int fds[CID_NS_MAX];
    unsigned n;     /* kept in fds */
    unsigned total; /* received, kept or not */
    int bad;        /* more than CID_NS_MAX, truncated, or control data that is not fds */
};

static void fdbox_close(struct fdbox *box)
{
    unsigned i;

    for (i = 0; i < box->n; i++)
        (void)close(box->fds[i]);
    box->n = 0;
}

/* recv() that also takes the fds passed with the bytes (close-on-exec), checking every
 * control message's level, type and length. */
static ssize_t recv_fds(int fd, void *buf, size_t len, struct fdbox *box)
{
    union {
        char buf[CMSG_SPACE(sizeof(int) * CID_NS_MAX)];
        struct cmsghdr align;
    } ctl;
    struct iovec iov = {.iov_base = buf, .iov_len = len};
    struct msghdr msg;
    struct cmsghdr *c;
    size_t k;
    size_t count;
    ssize_t n;
    int one;

    memset(&msg, 0, sizeof(msg));
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctl.buf;
    msg.msg_controllen = sizeof(ctl.buf);
    if ((n = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC)) < 0)
        return n;
    if ((msg.msg_flags & MSG_CTRUNC) != 0)
        box->bad = 1; /* the kernel closed what did not fit */
    for (c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS ||
            c->cmsg_len < CMSG_LEN(0)) {
            box->bad = 1;
            continue;
        }
        count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (k = 0; k < count; k++) {
            memcpy(&one, CMSG_DATA(c) + k * sizeof(int), sizeof(int));
            box->total++;
            if (box->n < CID_NS_MAX) {
                box->fds[box->n++] = one;
            } else {
                (void)close(one);
                box->bad = 1;
            }
        }
    }
    return n;
}

static long now_us(void)
{
    struct timespec ts;

    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
        return 0;
    return (long)ts.tv_sec * 1000000L + ts.tv_nsec / 1000L;
}

/* Milliseconds left before `deadline_us`, rounded up; 0 when it has passed. */
static int remaining_ms(long deadline_us)
{
    long left = deadline_us - now_us();

    if (left <= 0)
        return 0;
    return (int)((left + 999) / 1000);
}

/* Wait until `fd` is ready for `events`, an error or hang-up is pending, or the deadline
 * passes (-1 with errno ETIMEDOUT). EINTR is retried. */
static int wait_ready(int fd, short events, long deadline_us)
{
    struct pollfd pfd = {.fd = fd, .events = events, .revents = 0};
    int ms;
    int r;

    for (;;) {
        if ((ms = remaining_ms(deadline_us)) == 0) {
            errno = ETIMEDOUT;
            return -1;
        }
        r = poll(&pfd, 1, ms);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -1;
        if (r > 0 && (pfd.revents & (events | POLLERR | POLLHUP | POLLNVAL)) != 0)
            return 0;
    }
}

/* One sendmsg() of the request's bytes with the fd `lent` as SCM_RIGHTS (xfer_some retries). */
static ssize_t send_lent(int fd, const void *buf, size_t len, int lent)
{
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } ctl;
    struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
    struct msghdr msg;
    struct cmsghdr *c;

    memset(&msg, 0, sizeof(msg));
    memset(&ctl, 0, sizeof(ctl));
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctl.buf;
    msg.msg_controllen = sizeof(ctl.buf);
    c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &lent, sizeof(int));
    return sendmsg(fd, &msg, MSG_NOSIGNAL);
}

/* One successful send() or recv() of at most `len` bytes (0 = end of stream for a recv),
 * waiting for readiness within the deadline. -1 with errno on failure (ETIMEDOUT at the
 * deadline). The only place where EINTR/EAGAIN on data transfer are retried. */
static ssize_t xfer_some(int fd, void *buf, size_t len, enum xfer_dir dir, long deadline_us,
                         struct fdbox *box, int lent)
{
    ssize_t n;

    for (;;) {
        if (dir == XFER_SEND && lent >= 0)
            n = send_lent(fd, buf, len, lent);
        else if (dir == XFER_SEND)
            n = send(fd, buf, len, MSG_NOSIGNAL);
        else
            n = recv_fds(fd, buf, len, box);
        if (n >= 0)
            return n;
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            return -1;
        if (wait_ready(fd, dir == XFER_SEND ? POLLOUT : POLLIN, deadline_us) != 0)
            return -1;
    }
}

/* "ip port" of a socket address as sshd writes it in SSH_CONNECTION: an IPv4-mapped IPv6
 * address as plain IPv4, no scope. 0, or -1 when it is not an inet address. */
static int addr_text(const struct sockaddr_storage *ss, char *out, size_t cap)
{
    const struct sockaddr_in *v4 = (const struct sockaddr_in *)ss;
    const struct sockaddr_in6 *v6 = (const struct sockaddr_in6 *)ss;
    char ip[INET6_ADDRSTRLEN];
    struct in_addr mapped;

    if (ss->ss_family == AF_INET) {
        if (inet_ntop(AF_INET, &v4->sin_addr, ip, sizeof(ip)) == NULL)
            return -1;
        return snprintf(out, cap, "%s %u", ip, ntohs(v4->sin_port)) < (int)cap ? 0 : -1;
    }
    if (ss->ss_family != AF_INET6)
        return -1;
    if (IN6_IS_ADDR_V4MAPPED(&v6->sin6_addr)) {
        memcpy(&mapped, &v6->sin6_addr.s6_addr[12], sizeof(mapped));
        if (inet_ntop(AF_INET, &mapped, ip, sizeof(ip)) == NULL)
            return -1;
    } else if (inet_ntop(AF_INET6, &v6->sin6_addr, ip, sizeof(ip)) == NULL) {
        return -1;
    }
    return snprintf(out, cap, "%s %u", ip, ntohs(v6->sin6_port)) < (int)cap ? 0 : -1;
}

/* The fd of the socket SSH_CONNECTION ("rip rport lip lport") names, looked for among fds
 * 0..CID_FD_SCAN-1, or -1. sshd's connection is one of a monitor's first fds, so this usually
 * takes a few getsockname calls. */
static int session_socket(const char *connection)
{
    char rip[64], lip[64], want_local[96], want_remote[96], got[96];
    unsigned rport, lport;
    struct sockaddr_storage ss;
    socklen_t len;
    char *pct;
    int fd;

    if (connection == NULL ||
        sscanf(connection, "%63s %u %63s %u", rip, &rport, lip, &lport) != 4)
        return -1;
    if ((pct = strchr(rip, '%')) != NULL) /* a link-local address's zone: not in getsockname */
        *pct = '\0';
    if ((pct = strchr(lip, '%')) != NULL)
        *pct = '\0';
    if (snprintf(want_local, sizeof(want_local), "%s %u", lip, lport) >= (int)sizeof(want_local) ||
        snprintf(want_remote, sizeof(want_remote), "%s %u", rip, rport) >= (int)sizeof(want_remote))
        return -1;
    for (fd = 0; fd < CID_FD_SCAN; fd++) {
        len = sizeof(ss);
        if (getsockname(fd, (struct sockaddr *)&ss, &len) != 0)
            continue; /* EBADF, ENOTSOCK */
        if (addr_text(&ss, got, sizeof(got)) != 0 || strcmp(got, want_local) != 0)
            continue;
        len = sizeof(ss);
        if (getpeername(fd, (struct sockaddr *)&ss, &len) != 0)
            continue;
        if (addr_text(&ss, got, sizeof(got)) == 0 && strcmp(got, want_remote) == 0)
            return fd;
    }
    return -1;
}

/* Non-blocking connect bounded by the deadline. A unix socket whose listen backlog is full
 * answers EAGAIN (there is no EINPROGRESS for AF_UNIX): retry every CONNECT_RETRY_MS. */
static int connect_bounded(int fd, const struct sockaddr_un *sa, long deadline_us)
{
    socklen_t salen = (socklen_t)sizeof(*sa);
    int soerr = 0;
    socklen_t soerr_len = (socklen_t)sizeof(soerr);
    int ms;

    for (;;) {
        if (connect(fd, (const struct sockaddr *)sa, salen) == 0 || errno == EISCONN)
            return 0;
        if (errno == EINPROGRESS || errno == EALREADY)
            break;
        if (errno != EAGAIN && errno != EINTR)
            return -1;
        if ((ms = remaining_ms(deadline_us)) == 0) {
            errno = ETIMEDOUT;
            return -1;
        }
        (void)poll(NULL, 0, ms < CONNECT_RETRY_MS ? ms : CONNECT_RETRY_MS);
    }
    if (wait_ready(fd, POLLOUT, deadline_us) != 0)
        return -1;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &soerr_len) != 0)
        return -1;
    if (soerr != 0) {
        errno = soerr;
        return -1;
    }
    return 0;
}

static int send_all(int fd, char *buf, size_t len, long deadline_us)
{
    size_t done = 0;
    ssize_t n;

    while (done < len) {
        n = xfer_some(fd, buf + done, len - done, XFER_SEND, deadline_us, NULL, -1);
        if (n < 0)
            return -1;
        done += (size_t)n;
    }
    return 0;
}

/* Read until a '\n' arrives: CID_OK with the line length (newline included) in *len. */
static int recv_line(int fd, char *buf, size_t cap, size_t *len, long deadline_us,
                     struct fdbox *box)
{
    size_t have = 0;
    ssize_t n;
    const char *nl;

    for (;;) {
        if (have >= cap)
            return CID_E_TOOLONG;
        n = xfer_some(fd, buf + have, cap - have, XFER_RECV, deadline_us, box, -1);
        if (n < 0)
            return errno == ETIMEDOUT ? CID_E_TIMEOUT : CID_E_IO;
        if (n == 0)
            return CID_E_EOF;
        nl = memchr(buf + have, '\n', (size_t)n);
        have += (size_t)n;
        if (nl != NULL) {
            *len = (size_t)(nl - buf) + 1;
            return CID_OK;
        }
    }
}

/* ---- the exchange --------------------------------------------------------------------- */

static int fail(struct cid_result *res, enum cid_status status, const char *stage, int err)
{
    res->status = status;
    res->stage = stage;
    res->sys_errno = err;
    return status;
}

static int io_status(int err)
{
    return err == ETIMEDOUT ? CID_E_TIMEOUT : CID_E_IO;
}

int cid_exchange(const char *path, int timeout_ms, const struct cid_request *req,
                 struct cid_reply *reply, struct cid_result *res)
{
    char reqbuf[CID_LINE_MAX];
    char line[CID_LINE_MAX];
    struct sockaddr_un sa;
    struct fdbox box;
    int lent;
    size_t sent;
    ssize_t n;
    size_t reqlen = 0;
    size_t linelen = 0;
    long start = now_us();
    long deadline = start + (long)timeout_ms * 1000L;
    long t = start;
    int fd = -1;
    int err;
    int r;

    memset(res, 0, sizeof(*res));
    memset(&sa, 0, sizeof(sa));
    memset(&box, 0, sizeof(box));
    if (reply != NULL)
        reply->nfds = 0;
    if (path == NULL || strlen(path) >= sizeof(sa.sun_path) || timeout_ms <= 0 || reply == NULL) {
        fail(res, CID_E_ARG, "encode", EINVAL);
        goto cleanup;
    }
    if (cid_encode_request(req, reqbuf, sizeof(reqbuf), &reqlen) != CID_OK) {
        fail(res, CID_E_ARG, "encode", EMSGSIZE);
        goto cleanup;
    }
    sa.sun_family = AF_UNIX;
    memcpy(sa.sun_path, path, strlen(path) + 1);
    /* found before connecting: the request follows the connect at once, so that the agent,
     * woken by the connect, finds the line there already */
    lent = session_socket(req->connection);

    if ((fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0)) < 0) {
        fail(res, CID_E_SOCKET, "socket", errno);
        goto cleanup;
    }
    r = connect_bounded(fd, &sa, deadline);
    err = errno;
    res->connect_us = now_us() - t;
    if (r != 0) {
        fail(res, err == ETIMEDOUT ? CID_E_TIMEOUT : CID_E_CONNECT, "connect", err);
        goto cleanup;
    }
    t = now_us();
    sent = 0;
    r = 0;
    if (lent >= 0) { /* the fd goes with the first bytes sent */
        n = xfer_some(fd, reqbuf, reqlen, XFER_SEND, deadline, NULL, lent);
        r = n < 0 ? -1 : 0;
        sent = n < 0 ? 0 : (size_t)n;
        res->sent_fds = n < 0 ? 0 : 1;
    }
    if (r == 0)
        r = send_all(fd, reqbuf + sent, reqlen - sent, deadline);
    err = errno;
    res->send_us = now_us() - t;
    if (r != 0) {
        fail(res, io_status(err), "send", err);
        goto cleanup;
    }
    t = now_us();
    r = recv_line(fd, line, sizeof(line), &linelen, deadline, &box);
    err = errno;
    res->recv_us = now_us() - t;
    res->got_fds = box.total;
    if (r != CID_OK) {
        fail(res, r, "recv", r == CID_E_IO || r == CID_E_TIMEOUT ? err : 0);
        goto cleanup;
    }
    if (cid_parse_reply(line, linelen, reply) != CID_OK) {
        fail(res, CID_E_GARBAGE, "parse", 0);
        goto cleanup;
    }
    if (box.bad || box.n != reply->ns_count) {
        fail(res, CID_E_FDS, "fds", 0);
        goto cleanup;
    }
    memcpy(reply->fds, box.fds, sizeof(box.fds));
    reply->nfds = box.n;
    box.n = 0; /* the reply owns them now */
    fail(res, CID_OK, "done", 0);

cleanup:
    fdbox_close(&box);
    if (fd >= 0)
        (void)close(fd);
    res->total_us = now_us() - start;
    return res->status;
}

const char *cid_status_str(int status)
{
    switch (status) {
    case CID_OK:
        return "ok";
    case CID_E_ARG:
        return "bad request";
    case CID_E_SOCKET:
        return "cannot create a socket";
    case CID_E_CONNECT:
        return "cannot connect to the agent";
    case CID_E_TIMEOUT:
        return "timed out";
    case CID_E_IO:
        return "i/o error";
    case CID_E_EOF:
        return "the agent closed the connection without a reply";
    case CID_E_TOOLONG:
        return "reply line too long";
    case CID_E_GARBAGE:
        return "malformed reply";
    case CID_E_FDS:
        return "the reply's file descriptors do not match its ns field";
    default:
        return "unknown status";
    }
}
