#!/usr/bin/python3
"""Helper for scripts/bench-migrate.sh (standard library only).

Subcommands:
  same SRC DST       exit 0 if the two files hold the same bytes. Only where
                     either file has data (SEEK_DATA) is read, so a 16 GiB
                     sparse file compares in the time its data takes.
  split SERVE_LOG    print "COPY_MS TAIL_MS" from a migration source's log (-v):
                     from "mirror started" to the last "pass complete" (the
                     copy), and from there to "hand-off complete" (flush of
                     the destination, freeze, DISC); "- -" if not found.
  stall-header       print the header of stall.csv.
  stall-row ROUND MIGLOAD_JSON FREEZE_LOG_MS FREEZE_REPLY_MS MIRROR_MS ERROR
                     print one stall.csv row from migload's report.
  stall-say          read one stall.csv row on stdin, print it for a person.
  report RAW_CSV STALL_CSV
                     print the markdown tables (medians over rounds).
"""
import csv
import io
import json
import os
import statistics
import sys

CHUNK = 4 << 20


def data_extents(fd, size):
    """Yield (start, end) of the data regions of an open file."""
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after off
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        off = end


def merged(a, b):
    """The union of two sorted lists of ranges, as sorted disjoint ranges."""
    out = []
    for s, e in sorted(a + b):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def cmd_same(src, dst):
    with open(src, "rb") as f, open(dst, "rb") as g:
        size = os.fstat(f.fileno()).st_size
        if os.fstat(g.fileno()).st_size != size:
            print(f"sizes differ: {size} and {os.fstat(g.fileno()).st_size}", file=sys.stderr)
            return 1
        ranges = merged(list(data_extents(f.fileno(), size)), list(data_extents(g.fileno(), size)))
        # Two buffers reused throughout: a fresh bytes object per read
        # would cost page faults on every chunk.
        a, b = bytearray(CHUNK), bytearray(CHUNK)
        for start, end in ranges:
            off = start
            while off < end:
                n = min(CHUNK, end - off)
                if n < CHUNK:
                    a, b = bytearray(n), bytearray(n)
                if os.preadv(f.fileno(), [a], off) != n or os.preadv(g.fileno(), [b], off) != n or a != b:
                    print(f"differ within [{off}, {off + n})", file=sys.stderr)
                    return 1
                off += n
    return 0


def log_seconds(line):
    """Seconds since midnight of a console log line ("15:04:05.000 ...")."""
    h, m, s = line[:12].split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def cmd_split(path):
    marks = {}
    try:
        with open(path) as f:
            for line in f:
                for key in ("mirror started", "pass complete", "hand-off complete"):
                    if key in line:
                        marks[key] = log_seconds(line)  # the last one of each
    except (OSError, ValueError):
        pass
    if len(marks) < 3:
        print("- -")
        return 0
    copy = marks["pass complete"] - marks["mirror started"]
    tail = marks["hand-off complete"] - marks["pass complete"]
    # A migration across midnight would make these negative.
    print(f"{copy * 1000:.0f} {tail * 1000:.0f}" if copy >= 0 and tail >= 0 else "- -")
    return 0


STALL_FIELDS = [
    "round", "max_ms", "max_replayed_ms", "replay_held_ms", "replay_recover_ms", "max_dial_ms", "dial_failures",
    "max_plain_ms", "p50_ms", "p99_ms", "p999_ms", "writes",
    "reconnects", "errors", "verify_errors", "before_max_ms", "during_max_ms", "after_max_ms", "freeze_log_ms", "freeze_reply_ms", "mirror_ms", "error",
]


def cmd_stall_header():
    print(",".join(STALL_FIELDS))


def cmd_stall_row(rnd, path, freeze_log, freeze_reply, mirror_ms, error, via="direct"):
    row = {k: "" for k in STALL_FIELDS}
    row.update(round=rnd, freeze_log_ms=freeze_log, freeze_reply_ms=freeze_reply, mirror_ms=mirror_ms)
    problems = [error] if error else []
    try:
        with open(path) as f:
            rep = json.load(f)
        for k in ("max_ms", "max_replayed_ms", "replay_held_ms", "replay_recover_ms", "max_dial_ms", "dial_failures",
                  "max_plain_ms", "p50_ms", "p99_ms", "p999_ms", "writes",
                  "reconnects", "errors", "verify_errors"):
            row[k] = rep.get(k, "")
        for ph in rep.get("phases", []):
            row[f"{ph['name']}_max_ms"] = ph["max_ms"]
        if rep.get("errors"):
            problems.append(f"{rep['errors']} writes failed")
        if rep.get("verify_errors"):
            problems.append(f"{rep['verify_errors']} blocks read back wrong")
        if via == "proxy" and rep.get("reconnects"):
            problems.append(f"{rep['reconnects']} client reconnections: the proxy did not hide the hand-off")
        elif via != "proxy" and not rep.get("reconnects"):
            problems.append("no client reconnected")
    except (OSError, ValueError) as e:
        if not error:
            problems.append(f"no migload report ({e.__class__.__name__})")
    row["error"] = "; ".join(problems)
    out = io.StringIO()
    csv.DictWriter(out, STALL_FIELDS, lineterminator="\n").writerow(row)
    sys.stdout.write(out.getvalue())


def cmd_stall_say():
    row = next(csv.DictReader(sys.stdin, STALL_FIELDS))
    msg = (f"longest write {row['max_ms']} ms (replayed {row['max_replayed_ms']}: held "
           f"{row['replay_held_ms']}, reconnect+replay {row['replay_recover_ms']}; otherwise "
           f"{row['max_plain_ms']}; before/during/after the migration {row['before_max_ms']}/"
           f"{row['during_max_ms']}/{row['after_max_ms']}), p50 {row['p50_ms']} p99 {row['p99_ms']} ms, freeze "
           f"{row['freeze_log_ms'] or '?'} ms, {row['writes']} writes, {row['reconnects']} reconnects")
    if row["error"]:
        msg += f"  ERROR: {row['error']}"
    print(msg)


def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def median(xs):
    return statistics.median(xs) if xs else None


def nearest_rank(xs, p):
    xs = sorted(xs)
    if not xs:
        return None
    i = max(0, min(len(xs) - 1, -(-len(xs) * p // 100) - 1))
    return xs[int(i)]


def spread(xs):
    m = median(xs)
    return (max(xs) - min(xs)) / m * 100 if xs and m else 0


def f_s(v):
    return "n/a" if v is None else f"{v:.2f} s"


def f_ratio(v):
    return "n/a" if v is None else f"**{v:.2f}**"


def f_ms(v):
    return "n/a" if v is None else f"{v:.1f} ms"


def copy_tables(rows):
    """random1g and sparse16g tables from raw.csv rows."""
    by = {}  # (workload, subject) -> {round: row}
    for r in rows:
        by.setdefault((r["workload"], r["subject"]), {})[int(r["round"])] = r

    def ok_secs(wl, subj):
        return {k: float(v["seconds"]) for k, v in by.get((wl, subj), {}).items()
                if not v["error"] and num(v["seconds"])}

    errors = [r for r in rows if r["error"]]
    out = []
    titles = {"random1g": "random1g: 1 GiB of random data",
              "random1g-mem": "random1g-mem: the same into destinations in memory (tmpfs)"}
    for wl in ("random1g", "random1g-mem"):
        if not any(w == wl for w, _ in by):
            continue
        size = 1 << 30
        flex = ok_secs(wl, "flexnbd")
        peers = [s for s in ("nbdcopy", "nbdcopy-flush") if (wl, s) in by]
        subjects = ["flexnbd"] + peers
        names = {"flexnbd": "flexnbd migration", "nbdcopy": "nbdcopy", "nbdcopy-flush": "nbdcopy --flush"}
        out.append(f"### {titles[wl]} (median over rounds)")
        out.append("")
        out.append("| |" + "".join(f" {names[s]} |" for s in subjects))
        out.append("|---" * (1 + len(subjects)) + "|")

        def line(label, fn):
            out.append(f"| {label} |" + "".join(f" {fn(s)} |" for s in subjects))

        def med_col(s, key):
            vals = [num(v[key]) for v in by.get((wl, s), {}).values() if not v["error"]]
            return median([v for v in vals if v is not None])

        def secs(s):
            return list(ok_secs(wl, s).values())

        line("time", lambda s: f_s(median(secs(s))))
        line("MiB/s", lambda s: f"{size / 1048576 / median(secs(s)):.0f}" if secs(s) else "n/a")
        line("spread", lambda s: f"{spread(secs(s)):.0f}%" if secs(s) else "n/a")
        line("rounds (s)", lambda s: " / ".join(
            f"{v:.2f}" for _, v in sorted(ok_secs(wl, s).items())) or "n/a")
        line("CPU · others", lambda s: "n/a" if med_col(s, "cpu_pct") is None else
             f"{med_col(s, 'cpu_pct'):.0f}% · {med_col(s, 'others_pct'):.0f}%")
        flex_rows = by.get((wl, "flexnbd"), {})
        mir = [num(v["mirror_ms"]) for v in flex_rows.values() if not v["error"] and num(v["mirror_ms"])]
        frz = [num(v["freeze_ms"]) for v in flex_rows.values() if not v["error"] and num(v["freeze_ms"])]
        out.append("")
        for s in peers:
            ratios = [ok_secs(wl, s)[k] / flex[k] for k in flex if k in ok_secs(wl, s)]
            name = "nbdcopy --flush" if s == "nbdcopy-flush" else "nbdcopy"
            target = " (target: at least 1.0)" if s == "nbdcopy" and wl == "random1g" else ""
            out.append(f"- flexnbd throughput / {name} throughput: {f_ratio(median(ratios))}{target}, "
                       f"median of {len(ratios)} per-round ratios"
                       f" ({', '.join(f'{x:.2f}' for x in ratios)})")
        cp = [num(v["copy_ms"]) for v in flex_rows.values() if not v["error"] and num(v["copy_ms"]) is not None]
        tl = [num(v["tail_ms"]) for v in flex_rows.values() if not v["error"] and num(v["tail_ms"]) is not None]
        if mir:
            out.append(f"- flexnbd's own count (`duration_ms` of the `mirror_wait` reply: from the start of "
                       f"the migration to the hand-off): median {median(mir) / 1000:.2f} s")
        if cp and tl:
            out.append(f"- of which (source log): copy passes median {median(cp) / 1000:.2f} s; from the last pass "
                       f"to the hand-off (destination FLUSH, freeze, DISC) median {median(tl) / 1000:.2f} s")
        if frz:
            out.append(f"- freeze (source log): median {median(frz):.1f} ms")
        out.append("")
    if any(w == "sparse16g" for w, _ in by):
        sp, de = ok_secs("sparse16g", "sparse16g"), ok_secs("sparse16g", "dense64m")
        ratios = [sp[k] / de[k] for k in sp if k in de]
        out.append("### sparse16g against dense64m: the same 64 MiB of data (median over rounds)")
        out.append("")
        out.append("| | sparse16g (16 GiB, 64 MiB of data) | dense64m (64 MiB) |")
        out.append("|---|---|---|")
        out.append(f"| time | {f_s(median(list(sp.values())))} | {f_s(median(list(de.values())))} |")
        out.append(f"| spread | {spread(list(sp.values())):.0f}% | {spread(list(de.values())):.0f}% |"
                   if sp and de else "| spread | n/a | n/a |")
        out.append(f"| rounds | {' / '.join(f'{sp[k]:.2f}' for k in sorted(sp))} | "
                   f"{' / '.join(f'{de[k]:.2f}' for k in sorted(de))} |")
        out.append("")
        out.append(f"- sparse16g / dense64m time: {f_ratio(median(ratios))} (target: at most 1.5), median of "
                   f"{len(ratios)} per-round ratios ({', '.join(f'{x:.2f}' for x in ratios)})")
        for subj in ("sparse16g", "dense64m"):
            rs = [v for v in by.get(("sparse16g", subj), {}).values() if not v["error"]]
            cp = [num(v["copy_ms"]) for v in rs if num(v["copy_ms"]) is not None]
            tl = [num(v["tail_ms"]) for v in rs if num(v["tail_ms"]) is not None]
            mir = [num(v["mirror_ms"]) for v in rs if num(v["mirror_ms"]) is not None]
            if cp and tl and mir:
                out.append(f"- {subj} (source log, medians): migration {median(mir):.0f} ms, of which copy "
                           f"{median(cp):.0f} ms and last pass to hand-off {median(tl):.0f} ms")
        out.append("")
    if errors:
        out.append("Failed runs (left out of the medians):")
        out.append("")
        for r in errors:
            out.append(f"- round {r['round']} {r['workload']} {r['subject']}: {r['error']}")
        out.append("")
    return out


def stall_table(rows, title="stall: 8 clients writing 4 KiB at queue depth 1 across the hand-off", target=50):
    if not rows:
        return []
    out = [f"### {title}", ""]
    out.append("| round | longest write | longest replayed (held · reconnect+replay) | longest not replayed "
               "| longest before · during · after | p50 | p99 | p99.9 | freeze (log) | writes | reconnects | problems |")
    out.append("|---" * 12 + "|")
    for r in rows:
        phases = " · ".join(f"{num(r[k]):.1f}" if num(r[k]) is not None else "n/a"
                            for k in ("before_max_ms", "during_max_ms", "after_max_ms"))
        split = " · ".join(f"{num(r[k]):.1f}" if num(r[k]) is not None else "n/a"
                           for k in ("replay_held_ms", "replay_recover_ms"))
        out.append(f"| {r['round']} | {f_ms(num(r['max_ms']))} | {f_ms(num(r['max_replayed_ms']))} ({split}) | "
                   f"{f_ms(num(r['max_plain_ms']))} | {phases} ms | {f_ms(num(r['p50_ms']))} | {f_ms(num(r['p99_ms']))} | "
                   f"{f_ms(num(r['p999_ms']))} | {f_ms(num(r['freeze_log_ms']))} | {r['writes'] or 'n/a'} | "
                   f"{r['reconnects'] or 'n/a'} | {r['error'] or 'none'} |")
    out.append("")
    good = [r for r in rows if num(r["max_ms"]) is not None]
    worst = max((num(r["max_ms"]) for r in good), default=None)
    freezes = [num(r["freeze_log_ms"]) for r in rows if num(r["freeze_log_ms"]) is not None]
    if worst is not None:
        verdict = "met" if worst <= target and not any(r["error"] for r in rows) else "missed"
        out.append(f"- longest write over {len(good)} migrations: **{worst:.1f} ms** (target: at most {target} ms; {verdict})")
        out.append(f"- median over rounds of each round's longest write: {median([num(r['max_ms']) for r in good]):.1f} ms; "
                   f"of p99: {median([num(r['p99_ms']) for r in good]):.2f} ms")
    dials = [num(r["max_dial_ms"]) for r in good if num(r["max_dial_ms"]) is not None]
    if dials:
        refused = sum(int(num(r["dial_failures"]) or 0) for r in good)
        out.append(f"- reconnection (dial and handshake): longest {max(dials):.1f} ms, median over rounds of each "
                   f"round's longest {median(dials):.1f} ms; {refused} dials refused or failed in all")
    if freezes:
        out.append(f"- freeze (source log, `hand-off complete ... freeze=`): p50 {nearest_rank(freezes, 50):.1f} ms, "
                   f"p99 {nearest_rank(freezes, 99):.1f} ms (nearest rank over {len(freezes)}: p99 is the largest)")
    out.append("")
    return out


def cmd_report(raw, stall, proxy_stall=None):
    with open(raw) as f:
        rows = list(csv.DictReader(f))
    with open(stall) as f:
        srows = list(csv.DictReader(f))
    prows = []
    if proxy_stall:
        with open(proxy_stall) as f:
            prows = list(csv.DictReader(f))
    out = copy_tables(rows) + stall_table(srows)
    out += stall_table(prows, "stall-proxy: the same clients through flexnbd proxy (upstream DEST SOURCE)", 100)
    print("\n".join(out).rstrip("\n"))


def main(argv):
    cmd, args = argv[1], argv[2:]
    if cmd == "same":
        return cmd_same(*args)
    if cmd == "split":
        return cmd_split(*args)
    if cmd == "stall-header":
        return cmd_stall_header()
    if cmd == "stall-row":
        return cmd_stall_row(*args)
    if cmd == "stall-say":
        return cmd_stall_say()
    if cmd == "report":
        return cmd_report(*args)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv) or 0)
