/*
 * fuzz.h - what the libFuzzer harnesses of codec.c share: the entry point's prototype and
 * CHECK, which aborts (a crash libFuzzer reports and saves) when an invariant does not hold.
 *
 * Each harness checks codec.c against an independent reference written from the contract in
 * client.h (differential fuzzing), under ASan and UBSan, with every buffer codec.c reads or
 * writes allocated at its exact size so that one byte too far is a crash.
 */
#ifndef CALLERID_FUZZ_H
#define CALLERID_FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #cond);           \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

/* malloc that never returns NULL (a fuzzer out of memory is not a finding). */
static inline void *xmalloc(size_t n)
{
    void *p = malloc(n);

    if (p == NULL)
        abort();
    return p;
}

#endif /* CALLERID_FUZZ_H */
