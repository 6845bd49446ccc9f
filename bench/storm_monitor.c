/* One stand-in sshd monitor of the login storm (bench/storm.py), in C as sshd is.
 *
 * It inherits the accepted TCP connection from its parent (the stand-in listener), waits
 * for "go" (EOF on go_fd), then keeps `inflight` PAM account requests open at once on the
 * agent's unix socket (each on its own connection, the exact line pam_callerid.so sends, with
 * its connection lent as SCM_RIGHTS, found as the module finds the one sshd names) until it
 * has sent `requests`. It writes one JSON object to `out`:
 *
 *     {"lat": [ms, ...], "nbad": N, "bad": ["reply", ...], "first": t0, "last": t1}
 *
 * where a reply is bad unless it says verdict=adopt reason=callerid job=<job>, and first/last
 * are wall-clock seconds of the first request and the last reply.
 *
 * usage: storm-monitor AGENT_SOCK LINE JOB REQUESTS INFLIGHT GO_FD OUT
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_INFLIGHT 256
#define REPLY_MAX 4096
#define BAD_KEPT 5

struct slot {
	int fd;
	double started;
	size_t got;
	char buf[REPLY_MAX];
};

static double now(clockid_t clock)
{
	struct timespec ts;
	clock_gettime(clock, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* The session's socket, looked for as pam/client.c's session_socket does (fds from 0 up,
 * getsockname and getpeername on each socket): here the first connected inet one, -1 if none. */
static int session_socket(void)
{
	struct sockaddr_storage ss;
	for (int fd = 0; fd < 1024; fd++) {
		socklen_t len = sizeof(ss);
		if (getsockname(fd, (struct sockaddr *)&ss, &len) != 0 ||
		    (ss.ss_family != AF_INET && ss.ss_family != AF_INET6))
			continue;
		len = sizeof(ss);
		if (getpeername(fd, (struct sockaddr *)&ss, &len) == 0)
			return fd;
	}
	return -1;
}

static int start(struct slot *s, const struct sockaddr_un *addr, const char *line, size_t len)
{
	union {
		char buf[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} ctl;
	struct iovec iov = {.iov_base = (void *)line, .iov_len = len};
	struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
	int lent = session_socket();
	s->started = now(CLOCK_MONOTONIC);
	s->got = 0;
	if (lent >= 0) {
		memset(&ctl, 0, sizeof(ctl));
		msg.msg_control = ctl.buf;
		msg.msg_controllen = sizeof(ctl.buf);
		struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(c), &lent, sizeof(int));
	}
	s->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s->fd < 0 || connect(s->fd, (const struct sockaddr *)addr, sizeof(*addr)) < 0 ||
	    sendmsg(s->fd, &msg, MSG_NOSIGNAL) != (ssize_t)len) {
		perror("storm-monitor: request");
		return -1;
	}
	return 0;
}

/* The reply's value of `key` equals `want`. */
static int field_is(const char *reply, const char *key, const char *want)
{
	char pat[128];
	snprintf(pat, sizeof(pat), " %s=%s", key, want);
	const char *at = strstr(reply, pat);
	if (at == NULL)
		return 0;
	char end = at[strlen(pat)];
	return end == ' ' || end == '\n' || end == '\0';
}

int main(int argc, char **argv)
{
	if (argc != 8) {
		fprintf(stderr, "usage: %s SOCK LINE JOB REQUESTS INFLIGHT GO_FD OUT\n", argv[0]);
		return 2;
	}
	const char *line = argv[2], *job = argv[3];
	int todo = atoi(argv[4]), inflight = atoi(argv[5]), go_fd = atoi(argv[6]);
	size_t len = strlen(line);
	if (inflight < 1 || inflight > MAX_INFLIGHT || todo < 1) {
		fprintf(stderr, "storm-monitor: bad counts\n");
		return 2;
	}
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", argv[1]);

	for (;;) { /* EOF on go_fd: every monitor starts together */
		char c;
		ssize_t r = read(go_fd, &c, 1);
		if (r > 0 || (r < 0 && errno == EINTR))
			continue;
		break;
	}
	close(go_fd);

	double *lat = calloc((size_t)todo, sizeof(double));
	static struct slot slots[MAX_INFLIGHT];
	struct pollfd pfd[MAX_INFLIGHT];
	char bad[BAD_KEPT][REPLY_MAX];
	int nlat = 0, nbad = 0, open_ = 0;
	double first = now(CLOCK_REALTIME), last = first;
	for (int i = 0; i < inflight && todo > 0; i++, todo--, open_++)
		if (start(&slots[open_], &addr, line, len) < 0)
			return 1;
	while (open_ > 0) {
		for (int i = 0; i < open_; i++)
			pfd[i] = (struct pollfd){.fd = slots[i].fd, .events = POLLIN};
		if (poll(pfd, (nfds_t)open_, -1) < 0) {
			if (errno == EINTR)
				continue;
			perror("storm-monitor: poll");
			return 1;
		}
		for (int i = open_ - 1; i >= 0; i--) {
			if (!pfd[i].revents)
				continue;
			struct slot *s = &slots[i];
			ssize_t n = read(s->fd, s->buf + s->got, REPLY_MAX - 1 - s->got);
			if (n > 0) {
				s->got += (size_t)n;
				if (s->buf[s->got - 1] != '\n' && s->got < REPLY_MAX - 1)
					continue;
			}
			s->buf[s->got] = '\0';
			lat[nlat++] = (now(CLOCK_MONOTONIC) - s->started) * 1000.0;
			if (!(field_is(s->buf, "verdict", "adopt") && field_is(s->buf, "reason", "callerid") &&
			      field_is(s->buf, "job", job))) {
				if (nbad < BAD_KEPT)
					snprintf(bad[nbad], REPLY_MAX, "%s", s->buf);
				nbad++;
			}
			close(s->fd);
			last = now(CLOCK_REALTIME);
			if (todo > 0) {
				todo--;
				if (start(s, &addr, line, len) < 0)
					return 1;
			} else {
				slots[i] = slots[--open_];
			}
		}
	}

	FILE *out = fopen(argv[7], "w");
	if (out == NULL) {
		perror("storm-monitor: output");
		return 1;
	}
	fprintf(out, "{\"lat\": [");
	for (int i = 0; i < nlat; i++)
		fprintf(out, "%s%.4f", i ? ", " : "", lat[i]);
	fprintf(out, "], \"nbad\": %d, \"bad\": [", nbad);
	for (int i = 0; i < nbad && i < BAD_KEPT; i++) {
		fprintf(out, "%s\"", i ? ", " : "");
		for (const char *p = bad[i]; *p; p++) /* replies are ASCII; escape JSON specials */
			if (*p == '"' || *p == '\\')
				fprintf(out, "\\%c", *p);
			else if (*p >= 0x20)
				fputc(*p, out);
		fputc('"', out);
	}
	fprintf(out, "], \"first\": %.6f, \"last\": %.6f}\n", first, last);
	return fclose(out) == 0 ? 0 : 1;
}
