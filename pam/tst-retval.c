/*
 * tst-retval.c - run PAM phases against a private service file and print exact results.
 *
 *   tst-retval [-r RHOST] [-t TTY] [-e NAME=VALUE] [-s] [-n] [-f PATH] CONFDIR SERVICE USER OP...
 *
 * OP is acct_mgmt, open_session or close_session. The service is read from CONFDIR/SERVICE
 * through pam_start_confdir (Linux-PAM >= 1.4), so /etc/pam.d is never touched. -s passes
 * PAM_SILENT; -e puts NAME=VALUE into the PAM environment first (as sshd puts SSH_CONNECTION); -n installs a conversation with no function. Output, one line each:
 *
 *   conv error <text>                   (every PAM_ERROR_MSG shown by a module)
 *   <op> rc=<n> <PAM_NAME> ms=<elapsed>
 *   env CALLERID_JOB_ID=<value>|-       (after the last OP; '-' when unset)
 *   env SLURM_JOB_ID=<value>|-
 *   env CALLERID_JOB_GID=<value>|-
 *   env SLURM_JOB_GID=<value>|-
 *   file <PATH>=yes|no                  (-f: whether PATH exists for this process after the
 *                                        OPs: in the namespaces the module entered, if any)
 *
 * Exit status: 0 when every OP ran (whatever it returned), 2 on usage or pam_start failure.
 */
#define _GNU_SOURCE
#include <security/pam_appl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/stat.h>

static const char *const rc_names[] = {
    "PAM_SUCCESS",
    "PAM_OPEN_ERR",
    "PAM_SYMBOL_ERR",
    "PAM_SERVICE_ERR",
    "PAM_SYSTEM_ERR",
    "PAM_BUF_ERR",
    "PAM_PERM_DENIED",
    "PAM_AUTH_ERR",
    "PAM_CRED_INSUFFICIENT",
    "PAM_AUTHINFO_UNAVAIL",
    "PAM_USER_UNKNOWN",
    "PAM_MAXTRIES",
    "PAM_NEW_AUTHTOK_REQD",
    "PAM_ACCT_EXPIRED",
    "PAM_SESSION_ERR",
    "PAM_CRED_UNAVAIL",
    "PAM_CRED_EXPIRED",
    "PAM_CRED_ERR",
    "PAM_NO_MODULE_DATA",
    "PAM_CONV_ERR",
    "PAM_AUTHTOK_ERR",
    "PAM_AUTHTOK_RECOVERY_ERR",
    "PAM_AUTHTOK_LOCK_BUSY",
    "PAM_AUTHTOK_DISABLE_AGING",
    "PAM_TRY_AGAIN",
    "PAM_IGNORE",
    "PAM_ABORT",
    "PAM_AUTHTOK_EXPIRED",
    "PAM_MODULE_UNKNOWN",
    "PAM_BAD_ITEM",
    "PAM_CONV_AGAIN",
    "PAM_INCOMPLETE",
};

static const char *rc_name(int rc)
{
    if (rc >= 0 && (size_t)rc < sizeof(rc_names) / sizeof(rc_names[0]))
        return rc_names[rc];
    return "PAM_?";
}

static int conv_print(int n, const struct pam_message **msg, struct pam_response **resp, void *data)
{
    struct pam_response *r;
    int i;

    (void)data;
    if (n <= 0 || (r = calloc((size_t)n, sizeof(*r))) == NULL)
        return PAM_CONV_ERR;
    for (i = 0; i < n; i++) {
        if (msg[i]->msg_style == PAM_ERROR_MSG)
            printf("conv error %s\n", msg[i]->msg);
        else if (msg[i]->msg_style == PAM_TEXT_INFO)
            printf("conv info %s\n", msg[i]->msg);
        else
            printf("conv prompt %s\n", msg[i]->msg);
    }
    fflush(stdout);
    *resp = r;
    return PAM_SUCCESS;
}

static double now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static int run_op(pam_handle_t *pamh, const char *op, int flags)
{
    double t0 = now_ms();
    int rc;

    if (strcmp(op, "acct_mgmt") == 0)
        rc = pam_acct_mgmt(pamh, flags);
    else if (strcmp(op, "open_session") == 0)
        rc = pam_open_session(pamh, flags);
    else if (strcmp(op, "close_session") == 0)
        rc = pam_close_session(pamh, flags);
    else
        return -1;
    printf("%s rc=%d %s ms=%.1f\n", op, rc, rc_name(rc), now_ms() - t0);
    fflush(stdout);
    return 0;
}

static void print_env(pam_handle_t *pamh, const char *name)
{
    const char *v = pam_getenv(pamh, name);

    printf("env %s=%s\n", name, v != NULL ? v : "-");
}

int main(int argc, char **argv)
{
    struct pam_conv conv = {conv_print, NULL};
    pam_handle_t *pamh = NULL;
    const char *rhost = NULL;
    const char *tty = NULL;
    const char *probe = NULL;
    const char *putenv_arg = NULL;
    struct stat st;
    int flags = 0;
    int status = 2;
    int c;
    int i;
    int rc;

    while ((c = getopt(argc, argv, "r:t:e:snf:")) != -1) {
        switch (c) {
        case 'r':
            rhost = optarg;
            break;
        case 't':
            tty = optarg;
            break;
        case 'e':
            putenv_arg = optarg;
            break;
        case 's':
            flags |= PAM_SILENT;
            break;
        case 'n':
            conv.conv = NULL;
            break;
        case 'f':
            probe = optarg;
            break;
        default:
            goto usage;
        }
    }
    if (argc - optind < 4)
        goto usage;
    rc = pam_start_confdir(argv[optind + 1], argv[optind + 2], &conv, argv[optind], &pamh);
    if (rc != PAM_SUCCESS) {
        fprintf(stderr, "tst-retval: pam_start_confdir: %d\n", rc);
        return 2;
    }
    if ((rhost != NULL && pam_set_item(pamh, PAM_RHOST, rhost) != PAM_SUCCESS) ||
        (tty != NULL && pam_set_item(pamh, PAM_TTY, tty) != PAM_SUCCESS) ||
        (putenv_arg != NULL && pam_putenv(pamh, putenv_arg) != PAM_SUCCESS)) {
        fprintf(stderr, "tst-retval: pam_set_item failed\n");
        goto out;
    }
    for (i = optind + 3; i < argc; i++) {
        if (run_op(pamh, argv[i], flags) != 0) {
            fprintf(stderr, "tst-retval: unknown op %s\n", argv[i]);
            goto out;
        }
    }
    print_env(pamh, "CALLERID_JOB_ID");
    print_env(pamh, "SLURM_JOB_ID");
    print_env(pamh, "CALLERID_JOB_GID");
    print_env(pamh, "SLURM_JOB_GID");
    if (probe != NULL)
        printf("file %s=%s\n", probe, stat(probe, &st) == 0 ? "yes" : "no");
    status = 0;
out:
    pam_end(pamh, PAM_SUCCESS);
    return status;
usage:
    fprintf(stderr, "usage: tst-retval [-r RHOST] [-t TTY] [-e NAME=VALUE] [-s] [-n] [-f PATH] "
                    "CONFDIR SERVICE USER "
                    "OP...\n");
    return 2;
}
