# /etc/profile.d/callerid-job-group.sh - start an ssh login in the group of its batch job.
#
# pam_callerid.so puts CALLERID_JOB_GID (and SLURM_JOB_GID) into the environment of a session
# it adopted into a job: the group the job runs with (sbatch --gid, or the group it was
# submitted from). sshd itself always starts the session with the user's primary group, and a
# PAM module cannot change that. This snippet, sourced by interactive login shells (bash, sh,
# dash: /etc/profile reads /etc/profile.d/*.sh), replaces the shell once, early, by a new login
# shell running with the job's group, so files created from the session belong to the job's
# group as they do in the job itself (newgrp done for the user).
#
# It does nothing unless all of these hold:
#   - the shell is interactive ("ssh node" with a terminal; "ssh node cmd", scp, sftp, rsync
#     and "ssh node < script" never reach it or are left alone: their exec semantics,
#     exit status and stdin stay exactly as without it);
#   - CALLERID_JOB_GID is a number, differs from the current group, and is one of the
#     user's groups already (`id -G`: never a password prompt, never a group the user could
#     not switch to by hand);
#   - sg(1) exists and a trial `sg GROUP -c true` succeeds (so the exec below cannot fail and
#     leave the user without a shell);
#   - CALLERID_JOB_GROUP_SWITCHED is unset (it is set for the new shell: no loop).
# Limits: the new shell is a fresh login shell (the current one has read /etc/profile up to
# here; ~/.profile and ~/.bash_profile are read by the new one); zsh, fish and csh do not read
# /etc/profile.d; "ssh node cmd" keeps the primary group (run `sg "$(getent group
# "$SLURM_JOB_GID" | cut -d: -f1)" -c cmd` there); processes started before the switch (the
# sshd session itself) keep the primary group. Remove or disable the file to turn it off.

if [ -n "${CALLERID_JOB_GID-}" ] && [ -z "${CALLERID_JOB_GROUP_SWITCHED-}" ]; then
    case $- in
    *i*)
        case $CALLERID_JOB_GID in
        '' | *[!0-9]*) ;;
        *)
            if [ "$(id -g)" != "$CALLERID_JOB_GID" ] && command -v sg >/dev/null 2>&1 &&
                id -G | tr ' ' '\n' | grep -qx "$CALLERID_JOB_GID"; then
                callerid_job_group=$(getent group "$CALLERID_JOB_GID" | cut -d: -f1)
                if [ -n "$callerid_job_group" ] &&
                    sg "$callerid_job_group" -c true </dev/null >/dev/null 2>&1; then
                    CALLERID_JOB_GROUP_SWITCHED=1
                    export CALLERID_JOB_GROUP_SWITCHED
                    exec sg "$callerid_job_group" -c 'exec "${SHELL:-/bin/sh}" -l'
                fi
                unset callerid_job_group
            fi
            ;;
        esac
        ;;
    esac
fi
