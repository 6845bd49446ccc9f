/*
 * tst-codec.c - table tests of the pure wire code in codec.c that the module only reaches
 * through a live agent: cid_sanitize, which cleans an agent's message for a terminal.
 *
 *   tst-codec
 *
 * Prints one line per failing case and "ok N" at the end. Exit status: 0 when every case
 * passed, 1 otherwise.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>

#include "client.h"

struct sanitize_case {
    const char *name;
    const char *in;
    size_t cap;
    const char *want;
};

static const struct sanitize_case sanitize_cases[] = {
    {"plain", "Access denied", 64, "Access denied"},
    {"newline-and-tab-kept", "a\nb\tc", 64, "a\nb\tc"},
    {"escape", "\x1b[31mred", 64, "?[31mred"},
    {"c0-and-del", "a\x01\x7f" "b", 64, "a??b"},
    {"utf8-kept", "n\xc3\xb6" "de \xf0\x9f\x98\x80", 64, "n\xc3\xb6" "de \xf0\x9f\x98\x80"},
    {"c1-csi", "\xc2\x9b" "31m", 64, "??31m"},
    {"bad-continuation", "\xc3\x28", 64, "?("},
    {"cut-4-byte", "x\xf0\x9f\x98", 64, "x???"},
    {"overlong-slash", "\xc0\xaf", 64, "??"},
    {"overlong-3-byte", "\xe0\x80\xaf", 64, "???"},
    {"surrogate", "\xed\xa0\x80", 64, "???"},
    {"above-u10ffff", "\xf4\x90\x80\x80", 64, "????"},
    {"fits-exactly", "abc", 4, "abc"},
    {"truncated", "abcdef", 4, "abc"},
    {"never-mid-character", "a\xc3\xa9", 3, "a"},
    {"cap-1", "abc", 1, ""},
    {"empty", "", 8, ""},
};

static int check_sanitize(const struct sanitize_case *c)
{
    char out[64];

    memset(out, 'Z', sizeof(out));
    cid_sanitize(c->in, out, c->cap);
    if (memchr(out, '\0', c->cap) == NULL || strcmp(out, c->want) != 0) {
        printf("FAIL sanitize %s: got \"%.*s\"\n", c->name, (int)c->cap, out);
        return 1;
    }
    return 0;
}

/* cap == 0 must not write a single byte. */
static int check_sanitize_cap0(void)
{
    char out[1] = {'Z'};

    cid_sanitize("abc", out, 0);
    if (out[0] != 'Z') {
        printf("FAIL sanitize cap-0: wrote into the buffer\n");
        return 1;
    }
    return 0;
}

int main(void)
{
    size_t n = sizeof(sanitize_cases) / sizeof(sanitize_cases[0]);
    size_t i;
    int failed = 0;

    for (i = 0; i < n; i++)
        failed += check_sanitize(&sanitize_cases[i]);
    failed += check_sanitize_cap0();
    if (failed != 0) {
        printf("%d failed\n", failed);
        return 1;
    }
    printf("ok %zu\n", n + 1);
    return 0;
}
