#!/usr/bin/env python3
"""A/B of one node's HTTP publish rate in Redis mode: `longpoll serve --redis` of two checkouts
(A and B, each built), and nginx + Nchan on Redis for reference, interleaved in every repetition
(A, B, Nchan), each with a fresh redis-server; the setup of bench/run's Redis section (server and
Redis on CPU 0, bench/loadgen on CPU 1, 8 keep-alive connections). Prints each run and the
medians. Run it from anywhere but a checkout's root (the server would find that root's modules).

    bench/redis_publish_ab.py /path/to/A /path/to/B [--reps 3] [--seconds 5] [--no-nchan]
"""
import argparse
import importlib.machinery
import importlib.util
import os
import statistics
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))


def load(name, path):
    loader = importlib.machinery.SourceFileLoader(name, path)
    spec = importlib.util.spec_from_loader(name, loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--no-nchan", action="store_true")
    args = ap.parse_args()
    run = load("bench_run", os.path.join(BENCH, "run"))
    sys.path.insert(0, BENCH)
    import redis_bench

    nofile = 4096
    rows = [("A", "ours", os.path.abspath(args.a)), ("B", "ours", os.path.abspath(args.b))]
    if not args.no_nchan:
        rows.append(("nchan", "nchan", None))
    got = {label: [] for label, *_ in rows}
    for rep in range(1, args.reps + 1):
        for label, kind, root in rows:
            if root:
                run.ROOT = root  # Server runs ROOT/bin/longpoll
            r = redis_bench.measure(run.Server, run.loadgen, nofile, kind, "publish", 1, args.seconds,
                                    f"ab{rep}{label}_")
            got[label].append(r.get("rps"))
            print(f"rep {rep} {label:5s} rps={r.get('rps')} bad={r.get('bad')} cpu%={r.get('server_cpu_pct')}",
                  flush=True)
    for label, vals in got.items():
        vals = [v for v in vals if v is not None]
        print(f"median {label:5s} {statistics.median(vals):,.0f} publishes/s  (runs: {vals})")


if __name__ == "__main__":
    main()
