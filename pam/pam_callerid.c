/*
 * pam_callerid.c - PAM glue for callerid: ask the local agent whether this login may proceed
 * and map its verdict to a PAM return code. The module knows no policy; client.c does the
 * bounded socket exchange.
 *
 *   account  [success=ok default=die] pam_callerid.so [socket=PATH] [timeout=MS]
 *            [on_error=ignore|allow|deny] [skip_root=0|1] [join_container=0|1] [debug]
 *   session  optional pam_callerid.so ...   (open_session / close_session, same options)
 *
 * Options are matched exactly. An unknown option or a bad value is logged (LOG_ERR) and
 * ignored, so the default (safe) behaviour stays in force.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/un.h>
#include <syslog.h>

#define PAM_SM_ACCOUNT
#define PAM_SM_SESSION
#include <security/pam_ext.h>
#include <security/pam_modules.h>

#include "client.h"

#define CID_EXPORT __attribute__((visibility("default")))

#define MSG_AGENT_DOWN   "Access denied by callerid: the callerid agent is not available"
#define MSG_DENY_DEFAULT "Access denied by callerid"
#define MSG_BAD_REQUEST  "Access denied by callerid: the login cannot be described to the agent"
#define MSG_NS_FAILED    "Access denied by callerid: cannot enter the job's namespaces"
#define PW_BUF_MAX       (1024 * 1024)

enum on_error { ON_ERROR_DENY, ON_ERROR_ALLOW, ON_ERROR_IGNORE };

enum phase { PHASE_ACCOUNT, PHASE_OPEN_SESSION, PHASE_CLOSE_SESSION };

struct options {
    const char *socket_path;
    int timeout_ms;
    enum on_error on_error;
    int skip_root;
    int join_container; /* enter the job's namespaces the agent hands over (default 1) */
    int debug;
};

static const char *phase_op(enum phase phase)
{
    switch (phase) {
    case PHASE_OPEN_SESSION:
        return "open_session";
    case PHASE_CLOSE_SESSION:
        return "close_session";
    case PHASE_ACCOUNT:
    default:
        return "account";
    }
}

static const char *on_error_str(enum on_error on_error)
{
    switch (on_error) {
    case ON_ERROR_ALLOW:
        return "allow";
    case ON_ERROR_IGNORE:
        return "ignore";
    case ON_ERROR_DENY:
    default:
        return "deny";
    }
}

/* Strict decimal in [min, max]: digits only, no sign, no spaces, no overflow. */
static int parse_int(const char *s, int min, int max, int *out)
{
    long v = 0;

    if (*s == '\0')
        return -1;
    for (; *s != '\0'; s++) {
        if (*s < '0' || *s > '9')
            return -1;
        v = v * 10 + (*s - '0');
        if (v > max)
            return -1;
    }
    if (v < min)
        return -1;
    *out = (int)v;
    return 0;
}

/* The value of "key=value" when `arg` has exactly that key, else NULL (no prefix matching). */
static const char *opt_value(const char *arg, const char *key)
{
    size_t n = strlen(key);

    if (strncmp(arg, key, n) != 0 || arg[n] != '=')
        return NULL;
    return arg + n + 1;
}

static int parse_one(struct options *o, const char *arg)
{
    const char *v;

    if (strcmp(arg, "debug") == 0) {
        o->debug = 1;
    } else if (strcmp(arg, "skip_root") == 0) {
        o->skip_root = 1;
    } else if ((v = opt_value(arg, "skip_root")) != NULL) {
        if (strcmp(v, "0") != 0 && strcmp(v, "1") != 0)
            return -1;
        o->skip_root = v[0] == '1';
    } else if ((v = opt_value(arg, "join_container")) != NULL) {
        if (strcmp(v, "0") != 0 && strcmp(v, "1") != 0)
            return -1;
        o->join_container = v[0] == '1';
    } else if ((v = opt_value(arg, "socket")) != NULL) {
        if (v[0] != '/' || strlen(v) >= sizeof(((struct sockaddr_un *)NULL)->sun_path))
            return -1;
        o->socket_path = v;
    } else if ((v = opt_value(arg, "timeout")) != NULL) {
        if (parse_int(v, 1, CID_MAX_TIMEOUT_MS, &o->timeout_ms) != 0)
            return -1;
    } else if ((v = opt_value(arg, "on_error")) != NULL) {
        if (strcmp(v, "deny") == 0)
            o->on_error = ON_ERROR_DENY;
        else if (strcmp(v, "allow") == 0)
            o->on_error = ON_ERROR_ALLOW;
        else if (strcmp(v, "ignore") == 0)
            o->on_error = ON_ERROR_IGNORE;
        else
            return -1;
    } else {
        return -2;
    }
    return 0;
}

static void parse_options(pam_handle_t *pamh, int argc, const char **argv, struct options *o)
{
    int i;
    int r;

    o->socket_path = CID_DEFAULT_SOCKET;
    o->timeout_ms = CID_DEFAULT_TIMEOUT_MS;
    o->on_error = ON_ERROR_DENY;
    o->skip_root = 1;
    o->join_container = 1;
    o->debug = 0;
    for (i = 0; i < argc; i++) {
        if (argv[i] == NULL)
            continue;
        if ((r = parse_one(o, argv[i])) == -2)
            pam_syslog(pamh, LOG_ERR, "unknown option \"%s\" ignored", argv[i]);
        else if (r != 0)
            pam_syslog(pamh, LOG_ERR, "bad value in option \"%s\" ignored, default kept", argv[i]);
    }
}

/* 0 and *uid set when the user exists, ENOENT when it does not, another errno on failure. */
static int lookup_uid(const char *user, uid_t *uid)
{
    struct passwd pw;
    struct passwd *found = NULL;
    size_t size = 1024;
    char *buf = NULL;
    char *nbuf;
    int r;

    for (;;) {
        if ((nbuf = realloc(buf, size)) == NULL) {
            r = ENOMEM;
            goto cleanup;
        }
        buf = nbuf;
        r = getpwnam_r(user, &pw, buf, size, &found);
        if (r != ERANGE || size >= PW_BUF_MAX)
            break;
        size *= 2;
    }
    if (r == 0 && found != NULL)
        *uid = found->pw_uid;
    else if (r == 0 || r == ENOENT || r == ESRCH || r == EBADF || r == EPERM)
        r = ENOENT;

cleanup:
    free(buf);
    return r;
}

static const char *get_item_str(pam_handle_t *pamh, int item)
{
    const void *v = NULL;

    if (pam_get_item(pamh, item, &v) != PAM_SUCCESS)
        return NULL;
    return v;
}

/* Show `msg` as PAM_ERROR_MSG through the application's conversation, if there is one. */
static void tell_user(pam_handle_t *pamh, int flags, const struct options *o, const char *msg)
{
    const void *item = NULL;
    const struct pam_conv *conv;
    char text[CID_LINE_MAX];

    if ((flags & PAM_SILENT) != 0)
        return;
    if (pam_get_item(pamh, PAM_CONV, &item) != PAM_SUCCESS || item == NULL)
        return;
    conv = item;
    if (conv->conv == NULL)
        return;
    cid_sanitize(msg, text, sizeof(text));
    if (pam_error(pamh, "%s", text) != PAM_SUCCESS && o->debug)
        pam_syslog(pamh, LOG_DEBUG, "the conversation did not show the message");
}

static int deny_rc(enum phase phase)
{
    return phase == PHASE_ACCOUNT ? PAM_PERM_DENIED : PAM_SESSION_ERR;
}

/* The agent could not give a verdict: apply on_error. */
static int on_error_rc(pam_handle_t *pamh, int flags, const struct options *o, enum phase phase)
{
    switch (o->on_error) {
    case ON_ERROR_IGNORE:
        return PAM_IGNORE;
    case ON_ERROR_ALLOW:
        return PAM_SUCCESS;
    case ON_ERROR_DENY:
    default:
        if (phase != PHASE_CLOSE_SESSION)
            tell_user(pamh, flags, o, MSG_AGENT_DOWN);
        return deny_rc(phase);
    }
}

/* Put NAME=value into the PAM environment for each of `names` (replacing what is there). */
static void put_env(pam_handle_t *pamh, const char *const names[2], const char *value)
{
    char env[sizeof("CALLERID_JOB_GID=") + CID_JOB_MAX];
    size_t i;
    int n;
    int r;

    for (i = 0; i < 2; i++) {
        n = snprintf(env, sizeof(env), "%s=%s", names[i], value);
        if (n < 0 || (size_t)n >= sizeof(env))
            continue;
        if ((r = pam_putenv(pamh, env)) != PAM_SUCCESS)
            pam_syslog(pamh, LOG_ERR, "pam_putenv(%s): %s", names[i], pam_strerror(pamh, r));
    }
}

/* The adopted job into the session's environment: its id, and its group when the agent told
 * it (an agent that does not send gid= leaves the group variables as they are). */
static void export_job(pam_handle_t *pamh, const struct cid_reply *reply)
{
    static const char *const job_names[2] = {"CALLERID_JOB_ID", "SLURM_JOB_ID"};
    static const char *const gid_names[2] = {"CALLERID_JOB_GID", "SLURM_JOB_GID"};

    if (cid_valid_job(reply->job))
        put_env(pamh, job_names, reply->job);
    if (cid_valid_gid(reply->gid))
        put_env(pamh, gid_names, reply->gid);
}

/* An adopt reply's namespaces: entered (join_container=1), or closed unused (=0). 0, or -1
 * when they could not all be entered (the caller denies: fail closed). */
static int join_namespaces(pam_handle_t *pamh, const struct options *o, const char *user,
                           const struct cid_reply *reply)
{
    unsigned failed = 0;

    if (reply->nfds == 0)
        return 0;
    if (!o->join_container) {
        pam_syslog(pamh, LOG_INFO, "user %s: not entering job %s's namespaces (join_container=0)",
                   user, reply->job);
        return 0;
    }
    if (cid_join_namespaces(reply, &failed) != 0) {
        pam_syslog(pamh, LOG_ERR, "user %s: cannot enter job %s's %s namespace: %m; denied", user,
                   reply->job, failed < reply->ns_count ? cid_ns_name(reply->ns_kind[failed]) : "?");
        return -1;
    }
    if (o->debug)
        pam_syslog(pamh, LOG_DEBUG, "user %s: entered job %s's %u namespace(s)", user, reply->job,
                   reply->nfds);
    return 0;
}

/* Map a parsed reply to a PAM code. */
static int verdict_rc(pam_handle_t *pamh, int flags, const struct options *o, enum phase phase,
                      const char *user, const struct cid_reply *reply)
{
    switch (reply->verdict) {
    case CID_VERDICT_ADOPT:
        pam_syslog(pamh, LOG_INFO, "%s: user %s adopted into job %s%s%s (reason=%s)",
                   phase_op(phase), user, reply->job[0] != '\0' ? reply->job : "?",
                   reply->gid[0] != '\0' ? ", group " : "", reply->gid, reply->reason);
        if (join_namespaces(pamh, o, user, reply) != 0) {
            tell_user(pamh, flags, o, MSG_NS_FAILED);
            return deny_rc(phase);
        }
        if (phase != PHASE_CLOSE_SESSION)
            export_job(pamh, reply);
        return PAM_SUCCESS;
    case CID_VERDICT_ALLOW:
        if (o->debug)
            pam_syslog(pamh, LOG_DEBUG, "%s: user %s allowed (reason=%s)", phase_op(phase), user,
                       reply->reason);
        return PAM_SUCCESS;
    case CID_VERDICT_DENY:
        pam_syslog(pamh, LOG_NOTICE, "%s: user %s denied (reason=%s)", phase_op(phase), user,
                   reply->reason);
        if (phase != PHASE_CLOSE_SESSION)
            tell_user(pamh, flags, o, reply->msg[0] != '\0' ? reply->msg : MSG_DENY_DEFAULT);
        return deny_rc(phase);
    case CID_VERDICT_ERROR:
    default:
        pam_syslog(pamh, LOG_ERR, "%s: user %s: the agent reported an error (reason=%s)",
                   phase_op(phase), user, reply->reason);
        return on_error_rc(pamh, flags, o, phase);
    }
}

static void log_failure(pam_handle_t *pamh, const struct options *o, const struct cid_result *res)
{
    if (res->sys_errno != 0) {
        errno = res->sys_errno;
        pam_syslog(pamh, LOG_ERR, "agent %s: %s at %s: %m (on_error=%s)", o->socket_path,
                   cid_status_str(res->status), res->stage, on_error_str(o->on_error));
    } else {
        pam_syslog(pamh, LOG_ERR, "agent %s: %s at %s (on_error=%s)", o->socket_path,
                   cid_status_str(res->status), res->stage, on_error_str(o->on_error));
    }
}

/* The whole decision for one phase; see the comment above pam_sm_acct_mgmt. */
static int run_phase(pam_handle_t *pamh, int flags, int argc, const char **argv, enum phase phase)
{
    struct options o;
    struct cid_request req;
    struct cid_reply *reply = NULL;
    char timing[512] = "";
    struct cid_result res;
    const char *user = NULL;
    uid_t uid = (uid_t)-1;
    int rc = PAM_SERVICE_ERR;
    int r;

    parse_options(pamh, argc, argv, &o);
    if ((r = pam_get_user(pamh, &user, NULL)) != PAM_SUCCESS) {
        pam_syslog(pamh, LOG_ERR, "cannot get the user name: %s", pam_strerror(pamh, r));
        rc = r;
        goto cleanup;
    }
    if (user == NULL || user[0] == '\0') {
        pam_syslog(pamh, LOG_ERR, "empty user name");
        rc = PAM_USER_UNKNOWN;
        goto cleanup;
    }
    if ((r = lookup_uid(user, &uid)) == ENOENT) {
        pam_syslog(pamh, LOG_NOTICE, "unknown user %s", user);
        rc = PAM_USER_UNKNOWN;
        goto cleanup;
    }
    if (r != 0) {
        errno = r;
        pam_syslog(pamh, LOG_ERR, "getpwnam_r(%s): %m; asking the agent", user);
    } else if (uid == 0 && o.skip_root) {
        if (o.debug)
            pam_syslog(pamh, LOG_DEBUG, "%s: user %s has uid 0: skip_root, ignored",
                       phase_op(phase), user);
        rc = PAM_IGNORE;
        goto cleanup;
    }

    req.op = phase_op(phase);
    req.user = user;
    req.service = get_item_str(pamh, PAM_SERVICE);
    req.rhost = get_item_str(pamh, PAM_RHOST);
    req.tty = get_item_str(pamh, PAM_TTY);
    req.ns = phase != PHASE_ACCOUNT ? NULL : o.join_container ? "1" : "0";
    /* the socket sshd names as the session's is lent: the agent reads the connection from it */
    req.connection = phase == PHASE_ACCOUNT ? pam_getenv(pamh, "SSH_CONNECTION") : NULL;
    if ((reply = calloc(1, sizeof(*reply))) == NULL) {
        pam_syslog(pamh, LOG_CRIT, "out of memory");
        rc = PAM_BUF_ERR;
        goto cleanup;
    }
    r = cid_exchange(o.socket_path, o.timeout_ms, &req, reply, &res);
    if (o.debug) /* logged with the return line: one log write fewer in the login's path */
        (void)snprintf(timing, sizeof(timing),
                       "; user %s: %s at %s; connect %ld us, send %ld us (%u lent), recv %ld us, "
                       "total %ld us",
                       user, cid_status_str(res.status), res.stage, res.connect_us, res.send_us,
                       res.sent_fds, res.recv_us, res.total_us);
    if (r == CID_E_ARG) {
        pam_syslog(pamh, LOG_ERR, "%s: user %s: the request does not fit in one line: denied",
                   req.op, user);
        if (phase != PHASE_CLOSE_SESSION)
            tell_user(pamh, flags, &o, MSG_BAD_REQUEST);
        rc = deny_rc(phase);
        goto cleanup;
    }
    if (r == CID_E_FDS || (r != CID_OK && res.got_fds > 0)) { /* namespaces: fail closed */
        log_failure(pamh, &o, &res);
        pam_syslog(pamh, LOG_ERR, "%s: user %s: the reply carried %u fd(s): denied", req.op, user,
                   res.got_fds);
        if (phase != PHASE_CLOSE_SESSION)
            tell_user(pamh, flags, &o, MSG_NS_FAILED);
        rc = deny_rc(phase);
        goto cleanup;
    }
    if (r != CID_OK) {
        log_failure(pamh, &o, &res);
        rc = on_error_rc(pamh, flags, &o, phase);
        goto cleanup;
    }
    rc = verdict_rc(pamh, flags, &o, phase, user, reply);

cleanup:
    if (reply != NULL) {
        cid_close_fds(reply);
        memset(reply, 0, sizeof(*reply));
        free(reply);
    }
    /* the options are logged here, not while parsing: no log write (a wake-up of syslog)
     * before the agent is asked, in the login's path */
    if (o.debug)
        pam_syslog(pamh, LOG_DEBUG,
                   "%s: returning %d (%s)%s; options: socket=%s timeout=%d on_error=%s "
                   "skip_root=%d join_container=%d",
                   phase_op(phase), rc, pam_strerror(pamh, rc), timing, o.socket_path,
                   o.timeout_ms, on_error_str(o.on_error), o.skip_root, o.join_container);
    return rc;
}

/*
 * Account phase: may this user log in here, and into which job?
 *
 * Order: options, then PAM_USER (a pam_get_user failure returns its code; an empty or unknown
 * user is PAM_USER_UNKNOWN), then root: with skip_root (default) a uid-0 user gets PAM_IGNORE
 * at once, with no socket I/O, so an agent outage never locks root out nor delays it.
 *
 * Allow (PAM_SUCCESS): the agent answered verdict=adopt (CALLERID_JOB_ID and SLURM_JOB_ID are
 *   put into the PAM environment when a valid job=J came with it, CALLERID_JOB_GID and
 *   SLURM_JOB_GID when a valid gid=G did, replacing any value already there: the job the
 *   session was adopted into is the one they must describe; a reply without gid= leaves them
 *   alone) or verdict=allow (nothing exported). sshd copies the PAM environment into the
 *   session after pam_open_session, so what is set here reaches the user's shell.
 * Deny (PAM_PERM_DENIED, the agent's msg shown as PAM_ERROR_MSG): verdict=deny; and a request
 *   that cannot be encoded in one line, whatever on_error says.
 * on_error (default deny: PAM_PERM_DENIED + "...agent is not available"; allow: PAM_SUCCESS;
 *   ignore: PAM_IGNORE): no socket, connection refused, timeout (connect+send+recv share one
 *   deadline of timeout= ms), the agent closed without a reply, a reply longer than 4096 bytes,
 *   a malformed reply (bad prefix, bad escape, missing/unknown verdict, invalid job id), and
 *   verdict=error.
 * Namespaces (fail closed, whatever on_error says): the request says ns=1 (ns=0 with
 *   join_container=0). An adopt reply naming ns=KINDS comes with one fd per kind; the module
 *   enters them in order (setns) before it returns PAM_SUCCESS, so the session sshd forks next
 *   starts in the job's namespaces. A setns that fails, or a reply that came with fds and is
 *   otherwise wrong (malformed, fds that do not match ns=, truncated control data), is
 *   PAM_PERM_DENIED with "cannot enter the job's namespaces": a session never gets in outside
 *   namespaces its job has. With join_container=0 fds are closed unused and the adoption
 *   stands (pam_slurm_adopt's join_container=false). Every received fd is closed on return.
 * A failed getpwnam_r (NSS error, not "no such user") is logged and the agent is asked.
 * Out of memory: PAM_BUF_ERR.
 */
CID_EXPORT int pam_sm_acct_mgmt(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    return run_phase(pamh, flags, argc, argv, PHASE_ACCOUNT);
}

/*
 * Session phases: the same exchange with op=open_session / op=close_session. adopt/allow ->
 * PAM_SUCCESS, deny -> PAM_SESSION_ERR, agent failures -> on_error (deny -> PAM_SESSION_ERR).
 * skip_root applies as in the account phase. close_session never shows a message.
 */
CID_EXPORT int pam_sm_open_session(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    return run_phase(pamh, flags, argc, argv, PHASE_OPEN_SESSION);
}

CID_EXPORT int pam_sm_close_session(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    return run_phase(pamh, flags, argc, argv, PHASE_CLOSE_SESSION);
}
