/*
 * fuzz_reply.c - libFuzzer harness of cid_parse_reply (and cid_sanitize of what it yields).
 *
 * The input is one reply line as the agent would send it (final '\n' included or not).
 * cid_parse_reply must never touch a byte outside the line, must accept exactly the lines a
 * reference parser written from client.h accepts, and must decode the same values. Then the
 * message is cleaned with cid_sanitize into a buffer of the module's size, as the module does.
 * The optional gid= (the adopted job's group) is checked the same way as job=, and ns= (the
 * job's namespaces: known kinds, comma-separated, each at most once, only with verdict=adopt)
 * against a reference list parser.
 *
 * With CID_FUZZ_EXPECT_OK set in the environment every input must parse: the test suite runs
 * the harness that way over lines written by the agent's encoder (agent/pamproto.py).
 */
#define _GNU_SOURCE
#include <string.h>

#include "client.h"
#include "fuzz.h"

struct ref_reply {
    int verdict;
    char job[CID_LINE_MAX];
    char gid[CID_LINE_MAX];
    char reason[CID_LINE_MAX];
    char msg[CID_LINE_MAX];
    int ns[CID_NS_MAX];
    unsigned ns_count;
};

/* ns=: "user", "mnt", ... (client.h's order of kinds) separated by single commas. */
static int ref_ns(const char *v, struct ref_reply *ref)
{
    static const char *const kinds[CID_NS_MAX] = {"user", "mnt", "pid", "net",
                                                  "ipc",  "uts", "cgroup"};
    char item[CID_LINE_MAX];
    size_t n;
    unsigned i;
    int k;

    for (;;) {
        n = strcspn(v, ",");
        memcpy(item, v, n);
        item[n] = '\0';
        for (k = 0; k < CID_NS_MAX && strcmp(item, kinds[k]) != 0; k++)
            ;
        if (k == CID_NS_MAX)
            return -1;
        for (i = 0; i < ref->ns_count; i++)
            if (ref->ns[i] == k)
                return -1;
        ref->ns[ref->ns_count++] = k;
        if (v[n] == '\0')
            return 0;
        v += n + 1;
    }
}

static int hexval(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Decode a value: raw bytes 0x21..0x7e but '=' and '%', or %XX but %00. */
static int ref_decode(const unsigned char *v, size_t n, char *out)
{
    size_t i;
    size_t o = 0;

    for (i = 0; i < n; i++) {
        if (v[i] == '%') {
            if (n - i < 3 || hexval(v[i + 1]) < 0 || hexval(v[i + 2]) < 0)
                return -1;
            out[o] = (char)(hexval(v[i + 1]) * 16 + hexval(v[i + 2]));
            if (out[o] == '\0')
                return -1;
            o++;
            i += 2;
        } else if (v[i] >= 0x21 && v[i] <= 0x7e && v[i] != '=') {
            out[o++] = (char)v[i];
        } else {
            return -1;
        }
    }
    out[o] = '\0';
    return 0;
}

static int ref_key(const unsigned char *k, size_t n)
{
    size_t i;

    if (n < 1 || n > 32 || !(k[0] >= 'a' && k[0] <= 'z'))
        return 0;
    for (i = 1; i < n; i++)
        if (!((k[i] >= 'a' && k[i] <= 'z') || (k[i] >= '0' && k[i] <= '9') || k[i] == '_'))
            return 0;
    return 1;
}

static int ref_job(const char *j)
{
    size_t n = strlen(j);
    size_t i;

    if (n < 1 || n > CID_JOB_MAX)
        return 0;
    for (i = 0; i < n; i++)
        if (!((j[i] >= 'A' && j[i] <= 'Z') || (j[i] >= 'a' && j[i] <= 'z') ||
              (j[i] >= '0' && j[i] <= '9') || j[i] == '_' || j[i] == '.' || j[i] == '-'))
            return 0;
    return 1;
}

/* A gid: 1 to 10 digits, no leading zero but "0", at most 2^32 - 2 ((gid_t)-1 is no group). */
static int ref_gid(const char *g)
{
    size_t n = strlen(g);
    size_t i;

    if (n < 1 || n > 10 || (n > 1 && g[0] == '0'))
        return 0;
    for (i = 0; i < n; i++)
        if (g[i] < '0' || g[i] > '9')
            return 0;
    return n < 10 || strcmp(g, "4294967294") <= 0; /* equal lengths: compare as text */
}

/* 0 and *ref filled when the line is a valid reply; -1 otherwise. */
static int ref_parse(const unsigned char *line, size_t len, struct ref_reply *ref, char *tmp)
{
    static const char *const verdicts[] = {"adopt", "allow", "deny", "error"};
    static const char *const known[] = {"verdict", "job", "reason", "msg", "gid", "ns"};
    const size_t mlen = strlen(CID_MAGIC);
    int seen[6] = {0, 0, 0, 0, 0, 0};
    size_t start;
    size_t end;
    size_t eq;
    size_t k;

    memset(ref, 0, sizeof(*ref));
    ref->verdict = -1;
    if (len < 1 || len > CID_LINE_MAX || line[len - 1] != '\n')
        return -1;
    len--;
    if (len < mlen || memcmp(line, CID_MAGIC, mlen) != 0)
        return -1;
    for (start = mlen; start < len; start = end) {
        if (line[start] != ' ')
            return -1;
        start++;
        for (end = start; end < len && line[end] != ' '; end++)
            ;
        for (eq = start; eq < end && line[eq] != '='; eq++)
            ;
        if (eq == end || !ref_key(line + start, eq - start) ||
            ref_decode(line + eq + 1, end - eq - 1, tmp) != 0)
            return -1;
        for (k = 0; k < 6; k++) {
            if (eq - start != strlen(known[k]) || memcmp(line + start, known[k], eq - start) != 0)
                continue;
            if (seen[k]++)
                return -1;
            if (k == 0) {
                for (ref->verdict = 3; ref->verdict >= 0; ref->verdict--)
                    if (strcmp(tmp, verdicts[ref->verdict]) == 0)
                        break;
                if (ref->verdict < 0)
                    return -1;
            } else if (k == 1) {
                if (!ref_job(tmp))
                    return -1;
                strcpy(ref->job, tmp);
            } else if (k == 4) {
                if (!ref_gid(tmp))
                    return -1;
                strcpy(ref->gid, tmp);
            } else if (k == 5) {
                if (ref_ns(tmp, ref) != 0)
                    return -1;
            } else {
                strcpy(k == 2 ? ref->reason : ref->msg, tmp);
            }
        }
    }
    if (seen[5] && ref->verdict != 0)
        return -1; /* namespaces only with verdict=adopt */
    return seen[0] ? 0 : -1;
}

static void check_terminated(const char *s, size_t cap)
{
    CHECK(memchr(s, '\0', cap) != NULL);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct ref_reply ref;
    static char tmp[CID_LINE_MAX + 1];
    static int expect_ok = -1;
    struct cid_reply *out = xmalloc(sizeof(*out));
    char *text = xmalloc(CID_LINE_MAX); /* the module's tell_user buffer */
    int want;
    int got;

    if (expect_ok < 0)
        expect_ok = getenv("CID_FUZZ_EXPECT_OK") != NULL;
    got = cid_parse_reply((const char *)data, size, out);
    want = ref_parse(data, size, &ref, tmp);
    if (expect_ok)
        CHECK(got == CID_OK);
    CHECK(got == CID_OK || got == CID_E_GARBAGE);
    CHECK((got == CID_OK) == (want == 0));
    if (got == CID_OK) {
        check_terminated(out->job, sizeof(out->job));
        check_terminated(out->gid, sizeof(out->gid));
        check_terminated(out->reason, sizeof(out->reason));
        check_terminated(out->msg, sizeof(out->msg));
        CHECK((int)out->verdict == ref.verdict);
        CHECK(strcmp(out->job, ref.job) == 0);
        CHECK(out->job[0] == '\0' || cid_valid_job(out->job));
        CHECK(strcmp(out->gid, ref.gid) == 0);
        CHECK(out->gid[0] == '\0' || cid_valid_gid(out->gid));
        CHECK(strcmp(out->reason, ref.reason) == 0);
        CHECK(strcmp(out->msg, ref.msg) == 0);
        CHECK(out->ns_count == ref.ns_count && out->nfds == 0);
        CHECK(memcmp(out->ns_kind, ref.ns, ref.ns_count * sizeof(int)) == 0);
        CHECK(strcmp(cid_verdict_str(out->verdict), "?") != 0);
        cid_sanitize(out->msg, text, CID_LINE_MAX);
        check_terminated(text, CID_LINE_MAX);
        CHECK(strlen(text) == strlen(out->msg)); /* one '?' per byte it replaces, never a cut */
    }
    free(text);
    free(out);
    return 0;
}
