/*
 * fuzz_sanitize.c - libFuzzer harness of cid_sanitize.
 *
 * Input: bytes 0-1 = the output capacity (little endian, 0..65535), then the message (up to
 * its first NUL). The message sits in a buffer of exactly strlen + 1 bytes, the output in one
 * of exactly cap bytes. Checked against a reference written from client.h: a well-formed UTF-8
 * character (Unicode table 3-7) that is not a C0 control (but '\n' and '\t'), DEL or a C1
 * control is copied, every other byte becomes '?'; the copy stops before a piece that would
 * not leave room for the NUL. cap == 0 writes nothing.
 */
#define _GNU_SOURCE
#include <string.h>

#include "client.h"
#include "fuzz.h"

/* Length of the well-formed UTF-8 sequence at s (s is NUL-terminated), or 0. */
static size_t wellformed(const unsigned char *s)
{
    unsigned char lo = 0x80;
    unsigned char hi = 0xbf;
    size_t n;
    size_t k;

    if (s[0] <= 0x7f)
        return 1;
    if (s[0] >= 0xc2 && s[0] <= 0xdf)
        n = 2;
    else if (s[0] >= 0xe0 && s[0] <= 0xef)
        n = 3;
    else if (s[0] >= 0xf0 && s[0] <= 0xf4)
        n = 4;
    else
        return 0;
    if (s[0] == 0xe0)
        lo = 0xa0;
    else if (s[0] == 0xed)
        hi = 0x9f;
    else if (s[0] == 0xf0)
        lo = 0x90;
    else if (s[0] == 0xf4)
        hi = 0x8f;
    if (s[1] < lo || s[1] > hi)
        return 0;
    for (k = 2; k < n; k++)
        if (s[k] < 0x80 || s[k] > 0xbf)
            return 0;
    return n;
}

static int allowed(const unsigned char *s, size_t n)
{
    if (n == 1)
        return (s[0] >= 0x20 && s[0] != 0x7f) || s[0] == '\n' || s[0] == '\t';
    return !(n == 2 && s[0] == 0xc2 && s[1] <= 0x9f); /* U+0080..U+009F */
}

static size_t ref_sanitize(const unsigned char *in, char *out, size_t cap)
{
    size_t o = 0;
    size_t n;

    while (*in != '\0') {
        n = wellformed(in);
        if (n == 0 || !allowed(in, n)) {
            if (o + 1 >= cap)
                break;
            out[o++] = '?';
            in++;
        } else {
            if (o + n >= cap)
                break;
            memcpy(out + o, in, n);
            o += n;
            in += n;
        }
    }
    out[o] = '\0';
    return o;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t cap;
    size_t n;
    char *msg;
    char *out;
    char *ref;

    if (size < 2)
        return 0;
    cap = (size_t)data[0] | (size_t)data[1] << 8;
    n = strnlen((const char *)data + 2, size - 2);
    msg = xmalloc(n + 1);
    memcpy(msg, data + 2, n);
    msg[n] = '\0';
    out = xmalloc(cap);
    ref = xmalloc(cap + 1);
    cid_sanitize(msg, out, cap);
    if (cap > 0) {
        CHECK(memchr(out, '\0', cap) != NULL);
        ref_sanitize((const unsigned char *)msg, ref, cap);
        CHECK(strcmp(out, ref) == 0);
        CHECK(strlen(out) <= n);
        if (cap > n)
            CHECK(strlen(out) == n); /* room for everything: nothing is cut */
    }
    free(ref);
    free(out);
    free(msg);
    return 0;
}
