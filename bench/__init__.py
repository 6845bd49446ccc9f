"""callerid's benchmarks (`make bench`): run each from the repo top, as root.

    .venv/bin/python -m bench.run [--only login,storm] [--quick]    every part, one table
    .venv/bin/python -m bench.<part> [options]                      one part on its own

Parts: decision, login, mesh, resolution, scale, storm (see each module's docstring and
docs/performance.md). The `_`-modules are their pieces; some run as child processes
(`python -m bench._conns`, `bench._zygote`, ...), with the repo top as their working
directory. This file imports nothing: those children include processes run by the system
python3 as a throwaway user, which must not need the project's dependencies.
"""
