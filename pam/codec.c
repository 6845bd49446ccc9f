/*
 * codec.c - the PAM socket line format, no I/O: encode a request, parse a reply strictly, and
 * clean a reply's message for a terminal.
 *
 * Values are percent-encoded: alnum and "-_.:/@+,[]" are sent raw, every other byte as %XX
 * (the same safe set as agent/pamproto.py). Decoding is strict: anything the contract does not
 * allow is garbage, so that a confused or hostile peer can never be mistaken for a verdict.
 */
#define _GNU_SOURCE
#include "client.h"

#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#define KEY_MAX    32           /* reply keys: [a-z][a-z0-9_]{0,31} */
#define SAFE_PUNCT "-_.:/@+,[]" /* sent raw; every other byte is %XX (same set as the agent) */

/* ---- encoding ------------------------------------------------------------------------- */

static int is_safe_byte(unsigned char c)
{
    if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'))
        return 1;
    return c != '\0' && strchr(SAFE_PUNCT, c) != NULL;
}

static int put_raw(char *buf, size_t cap, size_t *pos, const char *s, size_t n)
{
    if (n > cap || *pos > cap - n)
        return -1;
    memcpy(buf + *pos, s, n);
    *pos += n;
    return 0;
}

static int put_field(char *buf, size_t cap, size_t *pos, const char *key, const char *value)
{
    static const char hex[] = "0123456789ABCDEF";
    const unsigned char *p;
    char esc[3];

    if (put_raw(buf, cap, pos, " ", 1) != 0 || put_raw(buf, cap, pos, key, strlen(key)) != 0 ||
        put_raw(buf, cap, pos, "=", 1) != 0)
        return -1;
    for (p = (const unsigned char *)(value != NULL ? value : ""); *p != '\0'; p++) {
        if (is_safe_byte(*p)) {
            if (put_raw(buf, cap, pos, (const char *)p, 1) != 0)
                return -1;
            continue;
        }
        esc[0] = '%';
        esc[1] = hex[*p >> 4];
        esc[2] = hex[*p & 0x0f];
        if (put_raw(buf, cap, pos, esc, sizeof(esc)) != 0)
            return -1;
    }
    return 0;
}

int cid_encode_request(const struct cid_request *req, char *buf, size_t cap, size_t *len)
{
    size_t pos = 0;

    if (req == NULL || buf == NULL || len == NULL || req->op == NULL || req->user == NULL)
        return CID_E_ARG;
    if (cap > CID_LINE_MAX)
        cap = CID_LINE_MAX;
    if (put_raw(buf, cap, &pos, CID_MAGIC, strlen(CID_MAGIC)) != 0 ||
        put_field(buf, cap, &pos, "op", req->op) != 0 ||
        put_field(buf, cap, &pos, "user", req->user) != 0 ||
        put_field(buf, cap, &pos, "service", req->service) != 0 ||
        put_field(buf, cap, &pos, "rhost", req->rhost) != 0 ||
        put_field(buf, cap, &pos, "tty", req->tty) != 0 ||
        (req->ns != NULL && put_field(buf, cap, &pos, "ns", req->ns) != 0) ||
        put_raw(buf, cap, &pos, "\n", 1) != 0)
        return CID_E_ARG;
    *len = pos;
    return CID_OK;
}

/* ---- decoding ------------------------------------------------------------------------- */

static int hex_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Decode a percent-encoded value into dst[cap] (NUL-terminated). -1 on a bad escape, an
 * encoded NUL, a raw byte outside 0x21..0x7e or a raw '=', or overflow. The bytes are not
 * required to be UTF-8 here: only msg is ever shown, and cid_sanitize cleans it for display,
 * so a mis-cut multi-byte character cannot turn an agent's deny into an on_error outcome. */
static int decode_value(const char *raw, size_t n, char *dst, size_t cap, size_t *dlen)
{
    size_t i = 0;
    size_t out = 0;
    int hi;
    int lo;
    unsigned char c;

    while (i < n) {
        c = (unsigned char)raw[i];
        if (c == '%') {
            if (n - i < 3 || (hi = hex_value(raw[i + 1])) < 0 || (lo = hex_value(raw[i + 2])) < 0)
                return -1;
            c = (unsigned char)(hi << 4 | lo);
            if (c == '\0')
                return -1;
            i += 3;
        } else {
            if (c < 0x21 || c > 0x7e || c == '=')
                return -1;
            i++;
        }
        if (out + 1 >= cap)
            return -1;
        dst[out++] = (char)c;
    }
    if (cap == 0)
        return -1;
    dst[out] = '\0';
    *dlen = out;
    return 0;
}

static int valid_key(const char *key, size_t n)
{
    size_t i;

    if (n == 0 || n > KEY_MAX || key[0] < 'a' || key[0] > 'z')
        return 0;
    for (i = 1; i < n; i++) {
        if (!((key[i] >= 'a' && key[i] <= 'z') || (key[i] >= '0' && key[i] <= '9') ||
              key[i] == '_'))
            return 0;
    }
    return 1;
}

int cid_valid_job(const char *job)
{
    size_t i;
    char c;

    for (i = 0; job[i] != '\0'; i++) {
        c = job[i];
        if (i >= CID_JOB_MAX)
            return 0;
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '.' || c == '-'))
            return 0;
    }
    return i > 0;
}

int cid_valid_gid(const char *gid)
{
    unsigned long long v = 0;
    size_t i;

    if (gid[0] == '\0' || (gid[0] == '0' && gid[1] != '\0'))
        return 0;
    for (i = 0; gid[i] != '\0'; i++) {
        if (i >= CID_GID_DIGITS || gid[i] < '0' || gid[i] > '9')
            return 0;
        v = v * 10 + (unsigned long long)(gid[i] - '0');
    }
    return v <= CID_GID_MAX;
}

static int parse_verdict(const char *v, enum cid_verdict *out)
{
    static const struct {
        const char *name;
        enum cid_verdict verdict;
    } table[] = {
        {"adopt", CID_VERDICT_ADOPT},
        {"allow", CID_VERDICT_ALLOW},
        {"deny", CID_VERDICT_DENY},
        {"error", CID_VERDICT_ERROR},
    };
    size_t i;

    for (i = 0; i < sizeof(table) / sizeof(table[0]); i++) {
        if (strcmp(v, table[i].name) == 0) {
            *out = table[i].verdict;
            return 0;
        }
    }
    return -1;
}

/* ---- namespaces ----------------------------------------------------------------------- */

static const struct {
    const char *name;
    int type;
} ns_table[CID_NS_MAX] = {
    {"user", CLONE_NEWUSER}, {"mnt", CLONE_NEWNS},   {"pid", CLONE_NEWPID},
    {"net", CLONE_NEWNET},   {"ipc", CLONE_NEWIPC},  {"uts", CLONE_NEWUTS},
    {"cgroup", CLONE_NEWCGROUP},
};

const char *cid_ns_name(int kind)
{
    return kind >= 0 && kind < CID_NS_MAX ? ns_table[kind].name : NULL;
}

int cid_ns_type(int kind)
{
    return kind >= 0 && kind < CID_NS_MAX ? ns_table[kind].type : 0;
}

void cid_close_fds(struct cid_reply *reply)
{
    unsigned i;

    for (i = 0; i < reply->nfds && i < CID_NS_MAX; i++)
        (void)close(reply->fds[i]);
    reply->nfds = 0;
}

/* "mnt,pid": 1..CID_NS_MAX known kinds, each at most once, no empty item. */
static int parse_ns(const char *v, struct cid_reply *out)
{
    const char *end;
    size_t n;
    unsigned seen = 0;
    int k;

    for (;;) {
        end = strchr(v, ',');
        n = end != NULL ? (size_t)(end - v) : strlen(v);
        for (k = 0; k < CID_NS_MAX; k++) {
            if (strlen(ns_table[k].name) == n && memcmp(ns_table[k].name, v, n) == 0)
                break;
        }
        if (k == CID_NS_MAX || (seen & (1u << k)) != 0 || out->ns_count >= CID_NS_MAX)
            return -1;
        seen |= 1u << k;
        out->ns_kind[out->ns_count++] = k;
        if (end == NULL)
            return 0;
        v = end + 1;
    }
}

/* Bit per known key, to reject duplicates. */
enum { SEEN_VERDICT = 1, SEEN_JOB = 2, SEEN_REASON = 4, SEEN_MSG = 8, SEEN_GID = 16, SEEN_NS = 32 };

/* One "key=value" field. `scratch` holds CID_LINE_MAX bytes. */
static int parse_field(const char *f, size_t n, struct cid_reply *out, unsigned *seen,
                       char *scratch)
{
    const char *eq = memchr(f, '=', n);
    size_t klen;
    size_t vlen;
    unsigned bit = 0;

    if (eq == NULL)
        return -1;
    klen = (size_t)(eq - f);
    if (!valid_key(f, klen) ||
        decode_value(eq + 1, n - klen - 1, scratch, CID_LINE_MAX, &vlen) != 0)
        return -1;
    if (klen == 7 && memcmp(f, "verdict", 7) == 0) {
        bit = SEEN_VERDICT;
        if (parse_verdict(scratch, &out->verdict) != 0)
            return -1;
    } else if (klen == 3 && memcmp(f, "job", 3) == 0) {
        bit = SEEN_JOB;
        if (!cid_valid_job(scratch))
            return -1;
        memcpy(out->job, scratch, vlen + 1);
    } else if (klen == 3 && memcmp(f, "gid", 3) == 0) {
        bit = SEEN_GID;
        if (!cid_valid_gid(scratch))
            return -1;
        memcpy(out->gid, scratch, vlen + 1);
    } else if (klen == 2 && memcmp(f, "ns", 2) == 0) {
        if ((*seen & SEEN_NS) != 0 || parse_ns(scratch, out) != 0)
            return -1;
        bit = SEEN_NS;
    } else if (klen == 6 && memcmp(f, "reason", 6) == 0) {
        bit = SEEN_REASON;
        memcpy(out->reason, scratch, vlen + 1);
    } else if (klen == 3 && memcmp(f, "msg", 3) == 0) {
        bit = SEEN_MSG;
        memcpy(out->msg, scratch, vlen + 1);
    }
    if ((*seen & bit) != 0)
        return -1;
    *seen |= bit;
    return 0;
}

int cid_parse_reply(const char *line, size_t len, struct cid_reply *out)
{
    char scratch[CID_LINE_MAX];
    const size_t mlen = strlen(CID_MAGIC);
    unsigned seen = 0;
    size_t pos;
    const char *sp;
    size_t flen;

    if (line == NULL || out == NULL)
        return CID_E_ARG;
    memset(out, 0, sizeof(*out));
    if (len == 0 || len > CID_LINE_MAX || line[len - 1] != '\n')
        return CID_E_GARBAGE;
    len--; /* the '\n' */
    if (len < mlen || memcmp(line, CID_MAGIC, mlen) != 0)
        return CID_E_GARBAGE;
    for (pos = mlen; pos < len; pos += flen) {
        if (line[pos] != ' ')
            return CID_E_GARBAGE;
        pos++;
        sp = memchr(line + pos, ' ', len - pos);
        flen = (sp != NULL ? (size_t)(sp - line) : len) - pos;
        if (parse_field(line + pos, flen, out, &seen, scratch) != 0)
            return CID_E_GARBAGE;
    }
    if ((seen & SEEN_VERDICT) == 0)
        return CID_E_GARBAGE;
    if ((seen & SEEN_NS) != 0 && out->verdict != CID_VERDICT_ADOPT)
        return CID_E_GARBAGE; /* namespaces are joined only by an adopted session */
    return CID_OK;
}

/* ---- display ------------------------------------------------------------------------- */

/* Length of the valid UTF-8 sequence at s[0..n) (no overlong forms, surrogates or code
 * points above U+10FFFF), or 0 when s does not start one. */
static size_t utf8_len(const unsigned char *s, size_t n)
{
    size_t extra;
    size_t k;
    uint32_t cp;

    if (s[0] < 0x80)
        return 1;
    if (s[0] >= 0xc2 && s[0] <= 0xdf) {
        extra = 1;
        cp = s[0] & 0x1f;
    } else if (s[0] >= 0xe0 && s[0] <= 0xef) {
        extra = 2;
        cp = s[0] & 0x0f;
    } else if (s[0] >= 0xf0 && s[0] <= 0xf4) {
        extra = 3;
        cp = s[0] & 0x07;
    } else {
        return 0;
    }
    if (extra >= n)
        return 0;
    for (k = 1; k <= extra; k++) {
        if ((s[k] & 0xc0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[k] & 0x3f);
    }
    if ((extra == 2 && cp < 0x800) || (extra == 3 && cp < 0x10000) || cp > 0x10ffff ||
        (cp >= 0xd800 && cp <= 0xdfff) || (cp >= 0x80 && cp <= 0x9f))
        return 0; /* the last test rejects C1 controls (U+0080..U+009F) */
    return extra + 1;
}

void cid_sanitize(const char *msg, char *out, size_t cap)
{
    const unsigned char *p = (const unsigned char *)msg;
    size_t left = strlen(msg);
    size_t o = 0;
    size_t n;

    if (cap == 0)
        return;
    while (left > 0) {
        n = utf8_len(p, left);
        if (n == 1 && ((*p < 0x20 && *p != '\n' && *p != '\t') || *p == 0x7f))
            n = 0;
        if ((n == 0 ? 1 : n) >= cap - o)
            break;
        if (n == 0) {
            out[o++] = '?';
            n = 1;
        } else {
            memcpy(out + o, p, n);
            o += n;
        }
        p += n;
        left -= n;
    }
    out[o] = '\0';
}

const char *cid_verdict_str(enum cid_verdict verdict)
{
    switch (verdict) {
    case CID_VERDICT_ADOPT:
        return "adopt";
    case CID_VERDICT_ALLOW:
        return "allow";
    case CID_VERDICT_DENY:
        return "deny";
    case CID_VERDICT_ERROR:
        return "error";
    default:
        return "?";
    }
}
