#!/usr/bin/env bash
# packaging/build.sh deb|rpm - build the packages from a copy of the working tree, lint them.
#
#   deb   build/deb/callerid-<version>/ <- the tree, with packaging/debian as debian/;
#         dpkg-buildpackage -b there; the .debs land in build/deb/; then lintian on the
#         .changes (fails on errors and warnings; packaging/lintian-suppress lists exceptions)
#   rpm   build/rpm/SOURCES/callerid-<version>.tar.gz <- the tree; rpmbuild -bb with
#         _topdir build/rpm; the .rpms land in build/rpm/RPMS/<arch>/; then rpmlint on the
#         spec and the .rpms (fails on errors and warnings; filters in packaging/rpmlintrc)
#
# The copy holds the tracked files and the untracked ones git does not ignore (so files not
# committed yet are packaged too; .venv, build/, caches and pam/ build products are not), and
# the source tree itself is never written to. Everything runs with the system's PATH: a
# pyenv or venv python3 first in PATH breaks pybuild ("No module named build").
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV PYENV_VERSION
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)

die() { echo "packaging/build.sh: $*" >&2; exit 1; }

stage() {
    local dest=$1
    rm -rf "$dest"
    mkdir -p "$dest"
    if git -C "$top" rev-parse --git-dir >/dev/null 2>&1; then
        git ls-files -z --cached --others --exclude-standard |
            while IFS= read -r -d '' f; do
                if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi
            done |
            tar --null -T - -cf - | tar -C "$dest" -xf -
    else
        tar --exclude=./.git --exclude=./.venv --exclude=./build --exclude='__pycache__' \
            --exclude='*.egg-info' --exclude=./.mypy_cache --exclude=./.pytest_cache \
            --exclude=./.ruff_cache --exclude=./.hypothesis --exclude='pam/*.o' \
            --exclude='pam/*.so' -cf - . | tar -C "$dest" -xf -
        make -s -C "$dest/pam" clean
    fi
}

run_logged() {  # run_logged LOG CMD...: quiet on success, the log's tail on failure
    local log=$1
    shift
    if ! "$@" >"$log" 2>&1; then
        tail -n 60 "$log" >&2
        die "$* failed (full log: $log)"
    fi
}

build_deb() {
    local deb_version out src
    deb_version=$(dpkg-parsechangelog -l packaging/debian/changelog -S Version)
    [ "${deb_version%-*}" = "$version" ] ||
        die "packaging/debian/changelog is at $deb_version, pyproject.toml at $version"
    out=build/deb
    src=$out/callerid-$version
    rm -rf "$out"
    stage "$src"
    rm -rf "$src/debian"
    cp -a packaging/debian "$src/debian"
    (cd "$src" && run_logged ../build.log dpkg-buildpackage -us -uc -b)
    ls -1 "$out"/*.deb
}

build_rpm() {
    local spec_version out
    spec_version=$(sed -n 's/^Version:[[:space:]]*//p' packaging/rpm/callerid.spec)
    [ "$spec_version" = "$version" ] ||
        die "packaging/rpm/callerid.spec is at $spec_version, pyproject.toml at $version"
    out=$top/build/rpm
    rm -rf "$out"
    mkdir -p "$out"/{SOURCES,SPECS,BUILD,RPMS,SRPMS}
    stage "$out/stage/callerid-$version"
    tar -C "$out/stage" -czf "$out/SOURCES/callerid-$version.tar.gz" "callerid-$version"
    cp packaging/rpm/callerid.spec "$out/SPECS/"
    # --nodeps: the BuildRequires name RPM-distribution packages; here they come from apt.
    run_logged "$out/build.log" rpmbuild -bb --nodeps --define "_topdir $out" \
        "$out/SPECS/callerid.spec"
    ls -1 "$out"/RPMS/*/*.rpm
}

lint_deb() {
    local rc=0
    echo "== lintian"
    lintian --fail-on error,warning --suppress-tags-from-file packaging/lintian-suppress \
        build/deb/*.changes >build/deb/lintian.log 2>&1 || rc=$?
    grep -v "^running with root privileges" build/deb/lintian.log || true
    [ "$rc" = 0 ] && echo "lintian: no errors, no warnings"
    return "$rc"
}

lint_rpm() {
    local rc=0
    echo "== rpmlint"
    rpmlint --rpmlintrc packaging/rpmlintrc packaging/rpm/callerid.spec \
        build/rpm/RPMS/*/*.rpm >build/rpm/rpmlint.log 2>&1 || rc=$?
    grep -E ': [EW]: |checked;' build/rpm/rpmlint.log || true
    return "$rc"
}

case "${1:-}" in
    deb) build_deb && lint_deb ;;
    rpm) build_rpm && lint_rpm ;;
    *) die "usage: packaging/build.sh deb|rpm" ;;
esac
