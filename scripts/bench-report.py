#!/usr/bin/python3
"""Helper for scripts/bench.sh (standard library only).

Subcommands:
  ticks PID        print "TREE SYSBUSY SYSTOTAL NPROCS": CPU clock ticks used by
                   PID and every live descendant (utime+stime of all threads,
                   plus cutime+cstime of reaped children), the machine's busy and
                   total ticks from /proc/stat, and the number of live
                   descendant processes.
  fio JSON         print "IOPS MIBPS LAT_AVG_US LAT_P99_US FIO_CPU_PCT ERROR
                   LAT_P50_US LAT_P999_US" from one fio --output-format=json
                   file (latencies: completion latency percentiles).
  report CSV       print the markdown tables (medians over rounds) for the
                   rows bench.sh wrote.
"""
import csv
import json
import os
import re
import statistics
import sys

# Workload keys as bench.sh names them, with the label shown in the tables.
LABELS = {
    "rr4k_qd1": "4k randread QD1",
    "rr4k_qd32": "4k randread QD32",
    "rw4k_qd32": "4k randwrite QD32",
    "sr1m_qd8": "1M seq read QD8",
    "sw1m_qd8": "1M seq write QD8",
}
# Workload keys: {rr,rw,sr,sw}BS[_cCONNS]_qdQD[_iIDLE], or RW_BS_QD[_iIDLE].
KEY = re.compile(r"^(rr|rw|sr|sw)(\d+[km])(?:_c(\d+))?_qd(\d+)$")
GENERIC = re.compile(r"^([a-z]+)_(\d+[kmKM]?)_(\d+)$")
KINDS = {"rr": "randread", "rw": "randwrite", "sr": "seq read", "sw": "seq write"}
# The pair whose per-round ratio the tables give (bench.sh exports them).
REFERENCE = os.environ.get("REFERENCE", "nbdkit")
SUBJECT = os.environ.get("SUBJECT", "flexnbd")


def stat_fields(pid):
    """Return (ppid, ticks) for one process from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        raw = f.read()
    # The command name is in parentheses and may hold anything; the fixed
    # fields start after the last closing parenthesis.
    fields = raw[raw.rindex(")") + 1:].split()
    # fields[0] is field 3 of proc(5) (state), so field N is fields[N - 3].
    ppid = int(fields[4 - 3])
    ticks = sum(int(fields[n - 3]) for n in (14, 15, 16, 17))
    return ppid, ticks


def tree_ticks(root):
    procs = {}
    kids = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        try:
            ppid, ticks = stat_fields(pid)
        except (OSError, ValueError, IndexError):
            continue  # gone while we looked
        procs[pid] = ticks
        kids.setdefault(ppid, []).append(pid)
    total = 0
    count = -1  # the root itself is not a descendant
    stack, seen = [root], set()
    while stack:
        pid = stack.pop()
        if pid in seen or pid not in procs:
            continue
        seen.add(pid)
        total += procs[pid]
        count += 1
        stack.extend(kids.get(pid, ()))
    return total, max(count, 0)


def machine_ticks():
    with open("/proc/stat") as f:
        cols = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is already
    # counted in user)
    cols = cols[:8]
    idle = cols[3] + cols[4]
    return sum(cols) - idle, sum(cols)


def cmd_ticks(pid):
    tree, n = tree_ticks(int(pid))
    busy, total = machine_ticks()
    print(tree, busy, total, n)


def cmd_fio(path):
    with open(path) as f:
        text = f.read()
    # fio can print warnings ahead of the JSON document.
    doc = json.loads(text[text.index("{"):])
    # With group_reporting the one job stands for every job (connection).
    job = doc["jobs"][0]
    iops = mib = lat = 0.0
    pct = {"50.000000": 0.0, "99.000000": 0.0, "99.900000": 0.0}
    for side in ("read", "write"):
        s = job.get(side, {})
        if not s.get("total_ios"):
            continue
        iops += s["iops"]
        mib += s["bw_bytes"] / 1048576.0
        lat = s["lat_ns"]["mean"] / 1000.0
        got = s.get("clat_ns", {}).get("percentile", {})
        # A mixed workload reports the slower side's percentiles.
        for k in pct:
            pct[k] = max(pct[k], got.get(k, 0) / 1000.0)
    # fio gives the jobs' CPU as an average per job; the client's CPU is
    # the sum over them.
    jobs = int(job.get("job options", {}).get("numjobs", 1))
    cpu = (job.get("usr_cpu", 0.0) + job.get("sys_cpu", 0.0)) * jobs
    print(f"{iops:.1f} {mib:.2f} {lat:.1f} {pct['99.000000']:.1f} {cpu:.1f} {job.get('error', 0)} "
          f"{pct['50.000000']:.1f} {pct['99.900000']:.1f}")


def parse_key(wl):
    """Return (kind, bs, conns, qd, idle, base) for a workload key; kind is
    None for a key of neither form."""
    base, idle = wl, 0
    m = re.match(r"^(.+)_i(\d+)$", wl)
    if m:
        base, idle = m.group(1), int(m.group(2))
    m = KEY.match(base)
    if m:
        return m.group(1), m.group(2), int(m.group(3) or 1), int(m.group(4)), idle, base
    m = GENERIC.match(base)
    if m:
        return m.group(1), m.group(2), 1, int(m.group(3)), idle, base
    return None, "", 1, 1, idle, base


def bs_bytes(bs):
    n = int(re.sub(r"\D", "", bs) or 0)
    return n * {"k": 1 << 10, "m": 1 << 20}.get(bs[-1:].lower(), 1)


def sort_key(wl):
    kind, bs, conns, qd, idle, _ = parse_key(wl)
    kinds = list(KINDS)
    return (kinds.index(kind) if kind in kinds else len(kinds), bs_bytes(bs), qd, conns, idle)


def label(wl):
    if wl in LABELS:
        return LABELS[wl]
    kind, bs, conns, qd, idle, _ = parse_key(wl)
    if kind is None:
        return wl
    text = f"{bs} {KINDS.get(kind, kind)}"
    if conns > 1 or idle:
        text += f" {conns} conn" + ("s" if conns > 1 else "")
    text += f" QD{qd}"
    if idle:
        text += f" + {idle} idle"
    return text


def fmt_us(v):
    if v is None:
        return "-"
    if v >= 10000:
        return f"{v / 1000:.1f} ms"
    return f"{v:.0f} µs"


def fmt_iops(v):
    if v >= 100000:
        return f"{v / 1000:.0f}k"
    if v >= 10000:
        return f"{v / 1000:.1f}k"
    return f"{v:.0f}"


def median(xs):
    return statistics.median(xs) if xs else None


def cmd_report(path):
    with open(path) as f:
        every = list(csv.DictReader(f))
    rows = [r for r in every if r["error"] == "0"]
    failed = [r for r in every if r["error"] != "0"]
    if failed:
        print("Failed runs, left out of the tables: " + "; ".join(
            f"round {r['round']} {r['server']} {r['workload']} ({r['error']})" for r in failed))
        print()
    servers, workloads = [], []
    data = {}  # (server, workload) -> list of rows
    for r in rows:
        if r["server"] not in servers:
            servers.append(r["server"])
        if r["workload"] not in workloads:
            workloads.append(r["workload"])
        data.setdefault((r["server"], r["workload"]), []).append(r)
    # Keep the subject first and the reference second, others in run order.
    servers.sort(key=lambda s: (s != SUBJECT, s != REFERENCE))
    workloads.sort(key=sort_key)
    have_pair = SUBJECT in servers and REFERENCE in servers

    def med(server, wl, field):
        return median([float(r[field]) for r in data.get((server, wl), [])])

    def paired_ratio(wl, field, invert=False, pair=(SUBJECT, REFERENCE), base=None):
        """Median over rounds of subject/reference, each pair from one round
        (or of wl against base on one server, with pair=(server, server))."""
        a = {r["round"]: float(r.get(field) or 0) for r in data.get((pair[0], wl), [])}
        b = {r["round"]: float(r.get(field) or 0) for r in data.get((pair[1], base or wl), [])}
        ratios = []
        for rnd in a.keys() & b.keys():
            num, den = (b[rnd], a[rnd]) if invert else (a[rnd], b[rnd])
            if den > 0:
                ratios.append(num / den)
        return median(ratios)

    def spread(wl):
        """Largest (max - min) / median of IOPS among the servers, in %."""
        worst = 0.0
        for s in servers:
            xs = [float(r["iops"]) for r in data.get((s, wl), [])]
            if len(xs) > 1 and statistics.median(xs) > 0:
                worst = max(worst, (max(xs) - min(xs)) / statistics.median(xs) * 100)
        return worst

    nrounds = max((len(v) for v in data.values()), default=0)

    print(f"### Throughput (median of {nrounds} rounds)")
    print()
    head = ["workload"] + servers
    if have_pair:
        head.append(f"{SUBJECT} / {REFERENCE}")
    head.append("spread")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for wl in workloads:
        cells = [label(wl)]
        for s in servers:
            iops = med(s, wl, "iops")
            if iops is None:
                cells.append("-")
            elif wl.startswith(("sr1m", "sw1m")) or "_1m_" in wl:
                cells.append(f"{med(s, wl, 'mibps'):.0f} MiB/s")
            else:
                cells.append(f"{fmt_iops(iops)} IOPS")
        if have_pair:
            r = paired_ratio(wl, "iops")
            cells.append("-" if r is None else f"**{r:.2f}**")
        cells.append(f"{spread(wl):.0f}%")
        print("| " + " | ".join(cells) + " |")
    print()
    print("IOPS and MiB/s are fio's figures for the measured period (ramp excluded). "
          f"`{SUBJECT} / {REFERENCE}` is the median of the per-round ratios (above 1: "
          f"{SUBJECT} is faster). `spread` is the largest (max-min)/median of one "
          "server's rounds for that workload: the run-to-run noise.")
    print()
    print("### Server CPU (median; % of one core, and CPU time per operation)")
    print()
    head = ["workload"] + servers
    if have_pair:
        head.append(f"µs/op {SUBJECT} / {REFERENCE}")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for wl in workloads:
        cells = [label(wl)]
        for s in servers:
            pct = med(s, wl, "srv_cpu_pct")
            per = med(s, wl, "srv_us_per_op")
            cells.append("-" if pct is None else f"{pct:.0f}% · {per:.1f} µs")
        if have_pair:
            r = paired_ratio(wl, "srv_us_per_op")
            cells.append("-" if r is None else f"**{r:.2f}**")
        print("| " + " | ".join(cells) + " |")
    print()
    print("CPU is utime+stime of the server's process tree (all threads, and reaped "
          "children) over the whole fio run; µs/op = CPU seconds per second / IOPS. "
          f"For the µs/op ratio, below 1 means {SUBJECT} spends less CPU per request.")
    print()
    print("### Client CPU and disturbance (median)")
    print()
    head = ["workload"] + [f"{s}: fio · others" for s in servers]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for wl in workloads:
        cells = [label(wl)]
        for s in servers:
            fc = med(s, wl, "fio_cpu_pct")
            other = med(s, wl, "other_pct")
            cells.append("-" if fc is None else f"{fc:.0f}% · {other:.0f}%")
        print("| " + " | ".join(cells) + " |")
    print()
    print(f"`fio` is the client's own CPU; `others` is what the rest of the machine "
          f"used during the run (all {os.cpu_count()} cores busy = "
          f"{100 * os.cpu_count()}%, minus server and fio). Much CPU to others "
          "means the run competed with unrelated work.")
    print()
    # raw.csv files written before the percentile columns have none.
    has_percentiles = bool(rows) and "lat_p50_us" in rows[0]
    latency_table(servers, workloads, med, paired_ratio, have_pair, has_percentiles)
    idle_table(servers, workloads, data, med, paired_ratio)


def latency_table(servers, workloads, med, paired_ratio, have_pair, has_percentiles):
    busy = [wl for wl in workloads if parse_key(wl)[4] == 0]
    if not busy or not has_percentiles:
        return
    print("### Latency and CPU per request (median)")
    print()
    head = ["workload"]
    for s in servers:
        head += [f"{s} IOPS", "p50", "p99", "p99.9", "µs/op"]
    if have_pair:
        head += [f"IOPS {SUBJECT} / {REFERENCE}", f"p99 {SUBJECT} / {REFERENCE}"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for wl in busy:
        cells = [label(wl)]
        for s in servers:
            iops = med(s, wl, "iops")
            if iops is None:
                cells += ["-"] * 5
                continue
            cells.append(fmt_iops(iops))
            for field in ("lat_p50_us", "lat_p99_us", "lat_p999_us"):
                cells.append(fmt_us(med(s, wl, field)))
            cells.append(f"{med(s, wl, 'srv_us_per_op'):.1f}")
        if have_pair:
            for field in ("iops", "lat_p99_us"):
                r = paired_ratio(wl, field)
                cells.append("-" if r is None else f"**{r:.2f}**")
        print("| " + " | ".join(cells) + " |")
    print()
    print("IOPS is the sum over the workload's connections; p50, p99 and p99.9 are fio's "
          "completion latency percentiles over all of them (submission to completion of "
          "one request, as seen by the client); µs/op is the server's CPU time per request. "
          f"Ratios are medians of per-round ratios: for IOPS above 1, for p99 below 1, "
          f"{SUBJECT} does better.")


def idle_table(servers, workloads, data, med, paired_ratio):
    pairs = []
    for wl in workloads:
        _, _, _, _, idle, base = parse_key(wl)
        if idle and base in workloads:
            pairs.append((wl, base, idle))
    if not pairs:
        return
    print()
    print("### Busy connections beside idle ones (median)")
    print()
    head = ["workload", "server", "IOPS alone · beside idle", "p99 alone · beside idle",
            "p99 beside / alone", "p99.9 beside / alone", "µs/op alone · beside idle",
            "idle kept open"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for wl, base, idle in pairs:
        for s in servers:
            if med(s, wl, "iops") is None or med(s, base, "iops") is None:
                continue
            p99 = paired_ratio(wl, "lat_p99_us", pair=(s, s), base=base)
            p999 = paired_ratio(wl, "lat_p999_us", pair=(s, s), base=base)
            kept = min(int(float(r.get("idle_open") or 0)) for r in data[(s, wl)])
            cells = [
                f"{label(base)} + {idle} idle",
                s,
                f"{fmt_iops(med(s, base, 'iops'))} · {fmt_iops(med(s, wl, 'iops'))}",
                f"{fmt_us(med(s, base, 'lat_p99_us'))} · {fmt_us(med(s, wl, 'lat_p99_us'))}",
                "-" if p99 is None else f"**{p99:.2f}**",
                "-" if p999 is None else f"{p999:.2f}",
                f"{med(s, base, 'srv_us_per_op'):.1f} · {med(s, wl, 'srv_us_per_op'):.1f}",
                f"{kept} of {idle}",
            ]
            print("| " + " | ".join(cells) + " |")
    print()
    print("Each idle run opens that many connections to the same server, completes the "
          "handshake on each and sends nothing on them while fio runs (internal/benchtools/"
          "idlers), right after the run without them (right before it in even rounds). "
          "Ratios are medians of per-round ratios on the same server; the serve-at-scale target is "
          "a p99 ratio of at most 1.1. `idle kept open` is the fewest, over the rounds, still "
          "open when fio ended: below the count, the server dropped idle clients.")


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    cmd, arg = sys.argv[1], sys.argv[2]
    if cmd == "ticks":
        cmd_ticks(arg)
    elif cmd == "fio":
        cmd_fio(arg)
    elif cmd == "report":
        cmd_report(arg)
    else:
        sys.exit(f"unknown subcommand {cmd!r}\n{__doc__}")


if __name__ == "__main__":
    main()
