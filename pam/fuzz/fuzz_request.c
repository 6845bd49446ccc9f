/*
 * fuzz_request.c - libFuzzer harness of cid_encode_request with arbitrary field strings.
 *
 * Input: byte 0 = flags (bit k set: field k is NULL; fields op, user, service, rhost, tty, ns),
 * bytes 1-2 = the buffer's capacity (little endian, 0..65535), then the six field values
 * separated by NUL bytes (missing ones are ""). Each value sits in its own buffer of exactly
 * its size, and so does the output buffer.
 *
 * Checked against a reference: CID_E_ARG exactly when op or user is NULL or the line would
 * not fit in min(cap, CID_LINE_MAX) bytes; otherwise one line of printable ASCII ending in
 * '\n', the fields in order, each value decoding back to what was given (NULL as ""), but a
 * NULL ns, which is left out.
 */
#define _GNU_SOURCE
#include <string.h>

#include "client.h"
#include "fuzz.h"

#define NFIELDS 6
#define NS_FIELD 5 /* optional: left out when NULL */

static const char *const keys[NFIELDS] = {"op", "user", "service", "rhost", "tty", "ns"};

static int safe(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
           (c != '\0' && strchr("-_.:/@+,[]", c) != NULL);
}

static size_t encoded_len(const char *v)
{
    size_t n = 0;

    for (; v != NULL && *v != '\0'; v++)
        n += safe((unsigned char)*v) ? 1 : 3;
    return n;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1; /* the encoder writes upper-case hex only */
}

/* Check that buf[pos..) starts with " key=<encoding of v>"; returns the position after it. */
static size_t check_field(const char *buf, size_t len, size_t pos, const char *key, const char *v)
{
    const unsigned char *p = (const unsigned char *)(v != NULL ? v : "");
    size_t klen = strlen(key);

    CHECK(pos < len && buf[pos] == ' ');
    pos++;
    CHECK(len - pos > klen && memcmp(buf + pos, key, klen) == 0 && buf[pos + klen] == '=');
    pos += klen + 1;
    for (; *p != '\0'; p++) {
        CHECK(pos < len);
        if (safe(*p)) {
            CHECK((unsigned char)buf[pos] == *p);
            pos++;
        } else {
            CHECK(len - pos >= 3 && buf[pos] == '%');
            CHECK(hexval(buf[pos + 1]) >= 0 && hexval(buf[pos + 2]) >= 0);
            CHECK(hexval(buf[pos + 1]) * 16 + hexval(buf[pos + 2]) == *p);
            pos += 3;
        }
    }
    CHECK(pos < len && (buf[pos] == ' ' || buf[pos] == '\n'));
    return pos;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *vals[NFIELDS] = {NULL, NULL, NULL, NULL, NULL, NULL};
    struct cid_request req;
    size_t cap;
    size_t want;
    size_t len = 0;
    size_t pos;
    size_t i;
    size_t k;
    const uint8_t *p;
    const uint8_t *end;
    const uint8_t *nul;
    unsigned flags;
    char *buf;
    int rc;

    if (size < 3)
        return 0;
    flags = data[0];
    cap = (size_t)data[1] | (size_t)data[2] << 8;
    p = data + 3;
    end = data + size;
    for (k = 0; k < NFIELDS; k++) {
        nul = p < end ? memchr(p, '\0', (size_t)(end - p)) : NULL;
        i = p < end ? (size_t)((nul != NULL ? nul : end) - p) : 0;
        if ((flags & (1u << k)) == 0) {
            vals[k] = xmalloc(i + 1);
            memcpy(vals[k], p, i);
            vals[k][i] = '\0';
        }
        p = nul != NULL ? nul + 1 : end;
    }
    req.op = vals[0];
    req.user = vals[1];
    req.service = vals[2];
    req.rhost = vals[3];
    req.tty = vals[4];
    req.ns = vals[NS_FIELD];

    want = strlen(CID_MAGIC) + 1; /* the final '\n' */
    for (k = 0; k < NFIELDS; k++)
        if (k != NS_FIELD || vals[k] != NULL)
            want += 2 + strlen(keys[k]) + encoded_len(vals[k]);
    buf = xmalloc(cap); /* exactly cap bytes: one byte further is an ASan crash */
    rc = cid_encode_request(&req, buf, cap, &len);
    if (vals[0] == NULL || vals[1] == NULL || want > cap || want > CID_LINE_MAX) {
        CHECK(rc == CID_E_ARG);
    } else {
        CHECK(rc == CID_OK);
        CHECK(len == want && len <= cap && len <= CID_LINE_MAX);
        CHECK(buf[len - 1] == '\n' && memchr(buf, '\n', len - 1) == NULL);
        for (i = 0; i < len - 1; i++)
            CHECK(buf[i] >= 0x20 && buf[i] <= 0x7e);
        CHECK(memcmp(buf, CID_MAGIC, strlen(CID_MAGIC)) == 0);
        pos = strlen(CID_MAGIC);
        for (k = 0; k < NFIELDS; k++)
            if (k != NS_FIELD || vals[k] != NULL)
                pos = check_field(buf, len, pos, keys[k], vals[k]);
        CHECK(pos == len - 1);
    }
    free(buf);
    for (k = 0; k < NFIELDS; k++)
        free(vals[k]);
    return 0;
}
