#!/usr/bin/env python3
"""A/B two vx6-bench binaries: alternate them, then compare means.

This VM drifts by ±10 % within minutes, so two runs made a quarter of an hour
apart say little. Running the two builds in turns, several times, puts both
under the same drift; the report gives each binary's mean throughput, CPU per
GiB and relay ÷ direct ratio.

    cargo build --release -p vx6-bench && cp target/release/vx6-bench /tmp/a
    # ... change something ...
    cargo build --release -p vx6-bench && cp target/release/vx6-bench /tmp/b
    python3 scripts/ab-bench.py /tmp/a /tmp/b [--pairs 4] [--transport tcp|quic]
"""

import argparse
import os
import statistics
import subprocess
import sys


def run_once(binary, transport, size):
    only = "vx6-tcp,relay-tcp" if transport == "tcp" else "vx6-quic,relay-quic"
    out = subprocess.run(
        [binary, "--quick", "--no-resolve", "--no-sim", "--no-ssh",
         "--bytes", size, "--only", only],
        capture_output=True, text=True, check=True,
    ).stdout
    label = "TCP" if transport == "tcp" else "QUIC"
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("|")]
        # The throughput table: | case | up | up × TCP | down | down × TCP | CPU up / down | ...
        if len(cells) > 7 and cells[1] in (f"VX6 direct, {label}", f"VX6 relay 3 hops, {label}"):
            if cells[1] in rows:
                continue
            try:
                cpu_up, cpu_down = (float(x) for x in cells[6].split("/"))
                rows[cells[1]] = (float(cells[2]), float(cells[4]), cpu_up, cpu_down)
            except ValueError:
                continue
    direct = rows.get(f"VX6 direct, {label}")
    relay = rows.get(f"VX6 relay 3 hops, {label}")
    if not direct or not relay:
        sys.exit(f"{binary}: no throughput rows in its report")
    return direct + relay


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--transport", choices=["tcp", "quic"], default="tcp")
    p.add_argument("--bytes", default="256MiB")
    args = p.parse_args()
    results = {args.a: [], args.b: []}
    for i in range(args.pairs):
        for b in (args.a, args.b):
            r = run_once(b, args.transport, args.bytes)
            results[b].append(r)
            print(f"pair {i + 1}: {os.path.basename(b):>12}  direct {r[0]:.0f}/{r[1]:.0f}"
                  f"  relay {r[4]:.0f}/{r[5]:.0f} MiB/s  relay CPU {r[6]:.2f}/{r[7]:.2f} s/GiB",
                  flush=True)
    print()
    print("| binary | direct up / down MiB/s | relay up / down MiB/s | relay CPU s/GiB up / down | relay ÷ direct up / down |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for b, rs in results.items():
        m = [statistics.mean(col) for col in zip(*rs)]
        print(f"| {b} | {m[0]:.0f} / {m[1]:.0f} | {m[4]:.0f} / {m[5]:.0f} | {m[6]:.2f} / {m[7]:.2f}"
              f" | {m[4] / m[0]:.3f} / {m[5] / m[1]:.3f} |")


if __name__ == "__main__":
    main()
