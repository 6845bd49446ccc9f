/*
 * tst-dlopen.c - load a PAM module with dlopen(RTLD_NOW) (any unresolved symbol fails here,
 * as it would inside sshd), check that the pam_sm_* entry points resolve and that internal
 * helpers do not leak out of the module.
 *
 *   tst-dlopen ./pam_callerid.so
 */
#include <dlfcn.h>
#include <stdio.h>

static const char *const wanted[] = {"pam_sm_acct_mgmt", "pam_sm_open_session",
                                     "pam_sm_close_session"};
static const char *const hidden[] = {"cid_exchange",  "cid_parse_reply", "cid_encode_request",
                                     "cid_valid_job", "run_phase",       "parse_options"};

int main(int argc, char **argv)
{
    const char *path = argc > 1 ? argv[1] : "./pam_callerid.so";
    void *h;
    size_t i;
    int bad = 0;

    if ((h = dlopen(path, RTLD_NOW | RTLD_LOCAL)) == NULL) {
        fprintf(stderr, "tst-dlopen: dlopen(%s): %s\n", path, dlerror());
        return 1;
    }
    for (i = 0; i < sizeof(wanted) / sizeof(wanted[0]); i++) {
        if (dlsym(h, wanted[i]) == NULL) {
            fprintf(stderr, "tst-dlopen: %s: missing %s\n", path, wanted[i]);
            bad = 1;
        }
    }
    for (i = 0; i < sizeof(hidden) / sizeof(hidden[0]); i++) {
        if (dlsym(h, hidden[i]) != NULL) {
            fprintf(stderr, "tst-dlopen: %s: %s is exported\n", path, hidden[i]);
            bad = 1;
        }
    }
    if (dlclose(h) != 0) {
        fprintf(stderr, "tst-dlopen: dlclose(%s): %s\n", path, dlerror());
        bad = 1;
    }
    if (!bad)
        printf("tst-dlopen: %s: ok\n", path);
    return bad;
}
