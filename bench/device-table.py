"""Reads `RESULT <device> <job> <round> <iops> <KiB/s>` lines; prints medians and the ratio of
ublk-mirror to the plain ublk loop (the goal: >= 0.90 on randwrite, >= 0.95 on randread)."""
import collections
import statistics
import sys

vals = collections.defaultdict(list)
for line in sys.stdin:
    _, dev, job, _rnd, iops, kib = line.split()
    vals[(dev, job)].append((int(iops), int(kib)))
devs = ["mirror", "ublk", "loop", "raid1"]
print("%-10s %s   mirror/ublk" % ("job", " ".join("%16s" % d for d in devs)))
for job in ["randread", "randwrite", "seqwrite"]:
    key, unit = (1, "KiB/s") if job == "seqwrite" else (0, "IOPS")
    med = {d: statistics.median(x[key] for x in vals[(d, job)]) for d in devs if vals[(d, job)]}
    cells = " ".join("%10.0f %5s" % (med.get(d, 0), unit) for d in devs)
    ratio = med["mirror"] / med["ublk"] if med.get("ublk") else float("nan")
    print("%-10s %s   %.2f" % (job, cells, ratio))
