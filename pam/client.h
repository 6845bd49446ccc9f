/*
 * client.h - the bounded request from pam_callerid.so to the local callerid agent.
 *
 * One request line, one reply line over a unix stream socket (contract in DESIGN.md):
 *
 *   request: CALLERID/1 op=account user=alice service=sshd rhost=10.0.0.1 tty=ssh
 *   reply:   CALLERID/1 verdict=adopt job=42 reason=callerid gid=1003 msg=...
 *
 * gid (the adopted job's group) comes only with verdict=adopt, from agents that know it; an
 * older module ignores it as an unknown key, and this one takes its absence as "no group".
 *
 * Namespaces (README "Joining the job's namespaces"): an account request says ns=1 (this
 * module enters the job's namespaces) or ns=0 (join_container=0: it will not); an adopt reply
 * may then name ns=KIND[,KIND...] (user mnt pid net ipc uts cgroup, each at most once, in the
 * order to enter them) and carry exactly that many fds, in that order, as SCM_RIGHTS on its
 * bytes. Received fds are close-on-exec and owned by the caller (cid_close_fds); on any
 * failure cid_exchange has closed them already and says in res->got_fds that some came.
 *
 * The session's socket (account, req->connection): sshd puts SSH_CONNECTION ("remote-ip
 * remote-port local-ip local-port") into the PAM environment; when this process holds the
 * socket it names, that one socket goes with the request's bytes as SCM_RIGHTS (lent: the
 * process keeps it). The agent then reads the session's connection from it instead of walking
 * /proc/<pid>/fd, and checks it as it checks what the walk finds; an agent that does not read
 * it lets the kernel close it, so either side may be older.
 *
 * Lines are at most CID_LINE_MAX bytes including the final '\n'. Values are percent-encoded.
 * The whole exchange (connect + send + receive) is bounded by one deadline.
 *
 * This code knows no PAM: the module (pam_callerid.c) and the test CLI
 * (callerid-pam-client.c) both link it. In the module every symbol here is hidden by
 * -fvisibility=hidden and the version script.
 */
#ifndef CALLERID_CLIENT_H
#define CALLERID_CLIENT_H

#include <stddef.h>

#define CID_MAGIC              "CALLERID/1"
#define CID_LINE_MAX           4096 /* bytes of one line, final '\n' included */
#define CID_JOB_MAX            64   /* job ids: [A-Za-z0-9_.-]{1,64} */
#define CID_GID_DIGITS         10   /* gids: canonical decimal 0..4294967294 */
#define CID_GID_MAX            4294967294UL /* (gid_t)-1 is "no group" */
#define CID_DEFAULT_SOCKET     "/run/callerid/agent.sock"
#define CID_DEFAULT_TIMEOUT_MS 2500
#define CID_MAX_TIMEOUT_MS     120000
#define CID_NS_MAX             7 /* namespace kinds: user mnt pid net ipc uts cgroup */
#define CID_FD_SCAN            1024 /* fds looked at for the session's socket */

enum cid_status {
    CID_OK = 0,
    CID_E_ARG,     /* bad argument, or the request does not fit in one line */
    CID_E_SOCKET,  /* socket() failed */
    CID_E_CONNECT, /* the agent is not there (ENOENT, ECONNREFUSED, ...) */
    CID_E_TIMEOUT, /* the deadline passed (connect, send or receive) */
    CID_E_IO,      /* send/recv/poll failed */
    CID_E_EOF,     /* the agent closed the connection before a full line */
    CID_E_TOOLONG, /* no '\n' within CID_LINE_MAX bytes */
    CID_E_GARBAGE, /* a full line that does not parse */
    CID_E_FDS,     /* fds that do not match the reply's ns= field (or unexpected control data) */
};

enum cid_verdict {
    CID_VERDICT_ADOPT,
    CID_VERDICT_ALLOW,
    CID_VERDICT_DENY,
    CID_VERDICT_ERROR,
};

struct cid_request {
    const char *op; /* account | open_session | close_session */
    const char *user;
    const char *service; /* NULL is sent as an empty value */
    const char *rhost;
    const char *tty;
    const char *ns; /* account: "1" joins the job's namespaces, "0" will not; NULL: not sent */
    const char *connection; /* account: sshd's SSH_CONNECTION; its socket is lent (see above) */
};

struct cid_reply {
    enum cid_verdict verdict;
    char job[CID_JOB_MAX + 1];    /* "" when absent */
    char gid[CID_GID_DIGITS + 1]; /* "" when absent; else cid_valid_gid */
    char reason[CID_LINE_MAX]; /* decoded; "" when absent */
    char msg[CID_LINE_MAX];    /* decoded; "" when absent */
    unsigned ns_count;         /* kinds named by ns= (0: none), only with verdict=adopt */
    int ns_kind[CID_NS_MAX];   /* each a kind index (cid_ns_name), in the order to enter */
    unsigned nfds;             /* fds received: fds[i] is the namespace ns_kind[i] */
    int fds[CID_NS_MAX];       /* owned by the caller once cid_exchange returns CID_OK */
};

struct cid_result {
    enum cid_status status;
    int sys_errno;     /* errno of the failing call, 0 if none */
    const char *stage; /* "encode", "socket", "connect", "send", "recv", "parse", "done" */
    long connect_us;   /* time spent in each stage, microseconds */
    long send_us;
    long recv_us;
    long total_us;
    unsigned got_fds; /* fds that came with the reply (on a failure: closed already) */
    unsigned sent_fds; /* sockets lent with the request: 1 when the session's was found */
};

/* Encode `req` as one '\n'-terminated line into buf[cap]. Returns CID_OK and the length in
 * *len, or CID_E_ARG (missing op/user, or the line would exceed CID_LINE_MAX or cap). */
int cid_encode_request(const struct cid_request *req, char *buf, size_t cap, size_t *len);

/* Parse one reply line of `len` bytes (the final '\n' included). Strict: a missing or unknown
 * verdict, a bad percent escape, a raw byte outside 0x21..0x7e in a field, a malformed or
 * duplicated known key, an invalid job id or an invalid gid is CID_E_GARBAGE. Values are not checked for
 * UTF-8 (the caller cleans msg with cid_sanitize before showing it).
 * Unknown keys are ignored. */
int cid_parse_reply(const char *line, size_t len, struct cid_reply *out);

/* Connect to `path`, send the request and read the reply, all within `timeout_ms`. Never
 * raises SIGPIPE, never changes signal dispositions, never forks. Returns res->status. */
int cid_exchange(const char *path, int timeout_ms, const struct cid_request *req,
                 struct cid_reply *reply, struct cid_result *res);

/* Copy `msg` for a terminal: C0 controls (but '\n' and '\t'), DEL, C1 controls and bytes that
 * are not valid UTF-8 each become '?'. The output is NUL-terminated and fits in out[cap]: a
 * character that would not fit ends the copy (never cut mid-character). cap == 0 writes
 * nothing. */
void cid_sanitize(const char *msg, char *out, size_t cap);

/* A job id the module may put into the environment: [A-Za-z0-9_.-]{1,CID_JOB_MAX}. */
int cid_valid_job(const char *job);

/* A gid the module may put into the environment: canonical decimal (digits only, no sign, no
 * leading zero but "0" itself) of at most CID_GID_DIGITS digits and at most CID_GID_MAX. */
int cid_valid_gid(const char *gid);

/* Namespace kinds by index 0..CID_NS_MAX-1: their /proc/<pid>/ns names and CLONE_NEW* types;
 * NULL / 0 for any other index. */
const char *cid_ns_name(int kind);
int cid_ns_type(int kind);

/* Close the fds a reply carries (idempotent). */
void cid_close_fds(struct cid_reply *reply);

/* Enter the namespaces of reply->fds in order (nsjoin.c): setns(fd, CLONE_NEW<kind>) for each
 * one this process is not in already (compared by device and inode before any is entered).
 * 0 on success; -1 with errno and *failed (the index that failed) otherwise: the process may
 * then be in some of them and must not go on to serve a session. */
int cid_join_namespaces(const struct cid_reply *reply, unsigned *failed);

const char *cid_status_str(int status);
const char *cid_verdict_str(enum cid_verdict verdict);

#endif /* CALLERID_CLIENT_H */
