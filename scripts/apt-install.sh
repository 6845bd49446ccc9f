#!/bin/sh
# apt-install.sh PKG...: install the Debian packages that are missing, idempotently, as root.
# Services in those packages (sshd, munged, slurmd, ...) are never started by the install:
# a policy-rc.d that denies it is put in place for the duration if the machine has none.
set -eu
[ "$(id -u)" = 0 ] || { echo "root is needed to apt-get install: $*" >&2; exit 1; }
missing=""
for p in "$@"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q 'install ok installed' ||
        missing="$missing $p"
done
[ -n "$missing" ] || exit 0
echo "apt-get install$missing"
guard=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    guard=1
fi
trap 'if [ -n "$guard" ]; then rm -f /usr/sbin/policy-rc.d; fi' EXIT
apt-get update -qq
# shellcheck disable=SC2086 # word splitting of the package list is wanted
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
