"""The Redis section of bench/run: `longpoll serve --redis` against nginx + Nchan with Redis
(nchan_redis_url + nchan_use_redis on), the same redis-server pinned beside the server (CPU 0),
the load generator on CPU 1. Also longpoll's publish rate on 3 Redis masters (--redis-shards)
against 1. Writes docs/performance-redis.md. Python 3 standard library only.
"""
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER_CPU = "0"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    """A private redis-server on a free port of 127.0.0.1, no persistence, pinned to SERVER_CPU."""

    def __init__(self):
        self.port, self.dir = free_port(), tempfile.mkdtemp(prefix="longpoll-redis-")
        self.proc = subprocess.Popen(["taskset", "-c", SERVER_CPU, "redis-server", "--port", str(self.port),
                                      "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", self.dir],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError("redis-server did not start")
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def measure(Server, loadgen, nofile, kind, mode, masters, loop_s, prefix, extra=()):
    redises = [Redis() for _ in range(masters)]
    try:
        srv = Server(kind, nofile, [r.url for r in redises], extra)
        try:
            return loadgen(mode, srv, ["--conns", 8, "--duration", loop_s, "--prefix", prefix], loop_s + 60)
        finally:
            srv.stop()
    finally:
        for r in redises:
            r.stop()


def run(args, nofile, Server, loadgen, say, machine_info, loop_s):
    if not shutil.which("redis-server"):
        say("redis: redis-server is not installed; skipped")
        return
    rows = {  # (label, kind, mode, masters, extra flags); masters 0: no Redis (the reference)
        "catchup": [("longpoll --redis", "ours", "catchup", 1, ()),
                    ("nginx + Nchan, Redis", "nchan", "catchup", 1, ()),
                    ("longpoll --redis --redis-no-cache", "ours", "catchup", 1, ("--redis-no-cache",)),
                    ("longpoll in memory", "ours", "catchup", 0, ())],
        "publish": [("longpoll --redis", "ours", "publish", 1, ()), ("nginx + Nchan, Redis", "nchan", "publish", 1, ()),
                    ("longpoll --redis-shards (3 masters)", "ours", "publish", 3, ()),
                    ("longpoll in memory", "ours", "publish", 0, ())],
    }
    res = {mode: {label: [] for label, *_ in lines} for mode, lines in rows.items()}
    n = [0]
    for rep in range(1, args.reps + 1):
        say(f"redis: repetition {rep}/{args.reps}")
        for mode, lines in rows.items():
            say(f"  redis {mode}: 8 keep-alive connections for {loop_s} s")
            for label, kind, m, masters, extra in lines:
                n[0] += 1
                r = measure(Server, loadgen, nofile, kind, m, masters, loop_s, f"r{n[0]}_", extra)
                res[mode][label].append(r)
                say(f"    {label}: rps={r.get('rps')} bad={r.get('bad')} server_cpu_pct={r.get('server_cpu_pct')}")
    write_report(res, machine_info, args)
    say("redis: wrote docs/performance-redis.md")


def write_report(res, info, args):
    def med(rs, key):
        vals = [r[key] for r in rs if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    lines = [
        "# Performance with Redis: longpoll and nginx + Nchan on the same Redis",
        "",
        f"Written by `bench/run` (its Redis section, bench/redis_bench.py) on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {info['nproc']} CPUs ({info['cpu']}), "
        f"Linux {info['kernel']}, {info['lua']}, nginx {info['nginx']}, Nchan {info['nchan']}; "
        f"{args.reps} repetition(s), medians.",
        "",
        "Each measurement starts a fresh redis-server (no persistence) and a fresh server, both on CPU 0;",
        "the load generator (bench/loadgen.c) runs on CPU 1 with 8 keep-alive connections. Catch-up: every",
        "request asks for the buffered event of a category (one event, no cursor wait). Publish: POSTs of",
        "a small event. The ratio is longpoll / Nchan (above 1: longpoll is faster).",
        "",
        "| measure | longpoll (req/s) | nginx + Nchan (req/s) | ratio |",
        "|---|---|---|---|",
    ]
    for mode, title in (("catchup", "catch-up, one buffered event"), ("publish", "HTTP publish")):
        ours, nchan = med(res[mode]["longpoll --redis"], "rps"), med(res[mode]["nginx + Nchan, Redis"], "rps")
        ratio = f"{ours / nchan:.2f}" if ours and nchan else "-"
        lines.append(f"| {title} | {ours or 0:,.0f} | {nchan or 0:,.0f} | {ratio} |")
    lines += [
        "",
        "## What stands in the way: the same server without Redis, and without the local cache",
        "",
        "| measure | longpoll --redis | --redis-no-cache | longpoll in memory (no Redis) |",
        "|---|---|---|---|",
    ]
    for mode, title in (("catchup", "catch-up (req/s)"), ("publish", "HTTP publish (req/s)")):
        def cell(label):
            v = med(res[mode].get(label, []), "rps")
            return f"{v:,.0f}" if v else "-"
        lines.append(f"| {title} | {cell('longpoll --redis')} | {cell('longpoll --redis --redis-no-cache')} | "
                     f"{cell('longpoll in memory')} |")
    lines += [
        "",
        "A catch-up answered from the node's copy of the stream costs what it costs in memory: the",
        "rest of the gap to Nchan is the HTTP path (Lua), which no Redis change can close.",
    ]
    one = med(res["publish"]["longpoll --redis"], "rps")
    three = med(res["publish"]["longpoll --redis-shards (3 masters)"], "rps")
    lines += [
        "",
        "## Publish on 1 and 3 Redis masters (longpoll, one node)",
        "",
        "| setup | publishes/s | server CPU % |",
        "|---|---|---|",
        f"| 1 master (`--redis`) | {one or 0:,.0f} | {med(res['publish']['longpoll --redis'], 'server_cpu_pct') or 0:.0f} |",
        f"| 3 masters (`--redis-shards`) | {three or 0:,.0f} | "
        f"{med(res['publish']['longpoll --redis-shards (3 masters)'], 'server_cpu_pct') or 0:.0f} |",
        "",
        "One node's publish rate is bound by the node (its Lua and HTTP work on one core), not by Redis:",
        "shards spread Redis's work and memory over several masters, and pay off with several nodes.",
        "",
    ]
    with open(os.path.join(ROOT, "docs", "performance-redis.md"), "w") as f:
        f.write("\n".join(lines))
