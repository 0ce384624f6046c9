"""Reads `RESULT <device> <job> <round> <iops> <KiB/s>` lines; prints medians and ratios of
ublk-mirror (background and write-blocking) to the plain ublk loop measured in the same boot
(the goal: >= 0.90 on randwrite, >= 0.95 on randread), and to rublk's async loop (the same
libublk async style as ublk-mirror: what the mirror itself costs).

Then, for every device against the plain loop (`ublk`), the ratio of each round (the two
measured in the same round, minutes apart at most) with its median, range and interquartile
range: how far one round is from the next. The I/O profile (`BENCH_PROFILE=io bench/device.sh`)
names its mirrors `mirror-<mode>` and adds `RESULT-SUSTAIN` lines (see bench/guest-device-io.sh),
which get a table of their own.

    python3 bench/device-table.py < log            # one run, from standard input
    python3 bench/device-table.py RUN1 RUN2 ...    # each run's tables, then the runs compared:
                                                   # median ratios side by side, and how far apart
"""
import collections
import statistics
import sys

JOBS = ["randread", "randwrite", "seqwrite"]
# (label, field index in RESULT-SUSTAIN after the name and round, format)
SUSTAIN_FIELDS = [("IOPS", 0, "%.0f"), ("max lag s", 2, "%.1f"), ("max dirty MiB", 3, "%.1f"), ("CP/min", 4, "%.1f"),
                  ("tgt/app fio end", 5, "%.3f"), ("tgt/app synced", 6, "%.3f"), ("flushes", 7, "%.0f"), ("catch-up s", 8, "%.1f")]


def read_run(lines):
    vals = collections.defaultdict(dict)      # (dev, job) -> {round: (iops, kib)}
    sustain = collections.defaultdict(dict)   # dev -> {round: [fields after the round]}
    for line in lines:
        f = line.split()
        if not f:
            continue
        if f[0] == "RESULT":
            _, dev, job, rnd, iops, kib = f
            vals[(dev, job)][int(rnd)] = (int(iops), int(kib))
        elif f[0] == "RESULT-SUSTAIN":
            sustain[f[1]][int(f[2])] = [None if x == "-" else float(x) for x in f[3:]]
    return vals, sustain


def key_of(job):
    return (1, "KiB/s") if job == "seqwrite" else (0, "IOPS")


def devices(vals):
    known = ["mirror", "mirror-compete", "mirror-wb", "mirror-async", "ublk", "ublk-async", "loop", "raid1"]
    seen = []
    for dev, _ in vals:
        if dev not in seen:
            seen.append(dev)
    return [d for d in known if d in seen] + sorted(d for d in seen if d not in known)


def round_ratios(vals, dev, base, job):
    """Ratio dev/base of each round in which both were measured."""
    k, _ = key_of(job)
    a, b = vals.get((dev, job), {}), vals.get((base, job), {})
    return [a[r][k] / b[r][k] for r in sorted(a) if r in b and b[r][k]]


def spread(xs):
    """median, min, max, IQR (quartiles by the inclusive method; 0 for a single value)."""
    if len(xs) >= 2:
        q = statistics.quantiles(xs, n=4, method="inclusive")
        iqr = q[2] - q[0]
    else:
        iqr = 0.0
    return statistics.median(xs), min(xs), max(xs), iqr


def main_table(vals):
    """The original table: medians, and ratios of the medians."""
    devs = devices(vals)
    ratios = [("mirror", "ublk"), ("mirror-compete", "ublk"), ("mirror-wb", "ublk"), ("mirror", "ublk-async"), ("mirror-wb", "ublk-async")]
    ratios += [(d, "ublk") for d in devs if d.startswith("mirror-") and (d, "ublk") not in ratios]
    ratios = [r for r in ratios if r[0] in devs and r[1] in devs]
    print("%-10s %s   %s" % ("job", " ".join("%16s" % d for d in devs), "  ".join("%s/%s" % r for r in ratios)))
    for job in JOBS:
        key, unit = key_of(job)
        med = {d: statistics.median(x[key] for x in vals[(d, job)].values()) for d in devs if vals.get((d, job))}
        cells = " ".join("%10.0f %5s" % (med.get(d, 0), unit) for d in devs)
        rs = "  ".join("%*.2f" % (len("%s/%s" % r), med[r[0]] / med[r[1]] if med.get(r[1]) else float("nan")) for r in ratios)
        print("%-10s %s   %s" % (job, cells, rs))


def ratio_table(vals):
    """Per-round ratios to the plain loop, with their median and spread."""
    devs = [d for d in devices(vals) if d != "ublk"]
    if not any(k[0] == "ublk" for k in vals):
        return {}
    print()
    print("per-round ratio to ublk (same round)             median   min-max       IQR    rounds")
    out = {}
    for dev in devs:
        for job in JOBS:
            rs = round_ratios(vals, dev, "ublk", job)
            if not rs:
                continue
            m, lo, hi, iqr = spread(rs)
            out[(dev, job)] = (m, lo, hi, iqr)
            print("%-22s %-10s %14.3f   %.3f-%.3f  %.3f    %s" % (dev, job, m, lo, hi, iqr, " ".join("%.3f" % x for x in rs)))
    return out


def sustain_table(sustain):
    """The sustained-load test: medians over its rounds, throughput as a ratio to ublk."""
    if not sustain:
        return {}
    print()
    print("sustained 4k randwrite QD32 with an fsync every 100 ms (medians over %d round(s))" % max(len(v) for v in sustain.values()))
    print("%-24s %9s %9s" % ("device", "IOPS", "/ublk") + "".join(" %15s" % lab for lab, _, _ in SUSTAIN_FIELDS[1:]))
    out = {}
    base = sustain.get("ublk", {})
    order = (["ublk"] if "ublk" in sustain else []) + sorted(d for d in sustain if d != "ublk")
    for dev in order:
        rounds = sustain[dev]
        rs = [rounds[r][0] / base[r][0] for r in sorted(rounds) if r in base and base[r][0]]
        ratio = statistics.median(rs) if rs else float("nan")
        cells = []
        for _, idx, fmt in SUSTAIN_FIELDS[1:]:
            xs = [v[idx] for v in rounds.values() if v[idx] is not None]
            cells.append(" %15s" % (fmt % statistics.median(xs) if xs else "-"))
        iops = statistics.median(v[0] for v in rounds.values())
        out[dev] = (ratio, rs)
        print("%-24s %9.0f %9.3f" % (dev, iops, ratio) + "".join(cells))
    return out


def report(vals, sustain):
    main_table(vals)
    r = ratio_table(vals)
    s = sustain_table(sustain)
    return r, s


def compare(names, results):
    """Median per-round ratios of every run side by side; the largest relative difference."""
    print()
    print("=== the runs compared: median of the per-round ratios to ublk in each run")
    print("%-22s %-10s %s   %s" % ("device", "job", " ".join("%9s" % ("run%d" % (i + 1)) for i in range(len(names))), "max-min / mean"))
    worst = 0.0
    keys = sorted(set(k for r, _ in results for k in r))
    for k in keys:
        ms = [r[k][0] for r, _ in results if k in r]
        if len(ms) < 2:
            continue
        d = (max(ms) - min(ms)) / statistics.mean(ms)
        worst = max(worst, d)
        print("%-22s %-10s %s   %5.1f %%" % (k[0], k[1], " ".join("%9.3f" % m for m in ms), 100 * d))
    devs = sorted(set(d for _, s in results for d in s if d != "ublk"))
    for dev in devs:
        ms = [s[dev][0] for _, s in results if dev in s]
        if len(ms) < 2:
            continue
        d = (max(ms) - min(ms)) / statistics.mean(ms)
        worst = max(worst, d)
        print("%-22s %-10s %s   %5.1f %%" % (dev, "sustained", " ".join("%9.3f" % m for m in ms), 100 * d))
    print("largest difference between runs: %.1f %% (%s 5 %%)" % (100 * worst, "within" if worst <= 0.05 else "NOT within"))


if len(sys.argv) > 1:
    results = []
    for name in sys.argv[1:]:
        with open(name, errors="replace") as f:
            vals, sustain = read_run(l for l in f if l.startswith("RESULT"))
        print("=== %s" % name)
        results.append(report(vals, sustain))
        print()
    if len(results) > 1:
        compare(sys.argv[1:], results)
else:
    report(*read_run(sys.stdin))
