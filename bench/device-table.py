"""Reads `RESULT <device> <job> <round> <iops> <KiB/s>` lines; prints medians and ratios of
ublk-mirror (background and write-blocking) to the plain ublk loop measured in the same boot
(the goal: >= 0.90 on randwrite, >= 0.95 on randread), and to rublk's async loop (the same
libublk async style as ublk-mirror: what the mirror itself costs)."""
import collections
import statistics
import sys

vals = collections.defaultdict(list)
for line in sys.stdin:
    _, dev, job, _rnd, iops, kib = line.split()
    vals[(dev, job)].append((int(iops), int(kib)))
devs = [d for d in ["mirror", "mirror-compete", "mirror-wb", "ublk", "ublk-async", "loop", "raid1"] if any(k[0] == d for k in vals)]
ratios = [("mirror", "ublk"), ("mirror-compete", "ublk"), ("mirror-wb", "ublk"), ("mirror", "ublk-async"), ("mirror-wb", "ublk-async")]
ratios = [r for r in ratios if r[0] in devs and r[1] in devs]
print("%-10s %s   %s" % ("job", " ".join("%16s" % d for d in devs), "  ".join("%s/%s" % r for r in ratios)))
for job in ["randread", "randwrite", "seqwrite"]:
    key, unit = (1, "KiB/s") if job == "seqwrite" else (0, "IOPS")
    med = {d: statistics.median(x[key] for x in vals[(d, job)]) for d in devs if vals[(d, job)]}
    cells = " ".join("%10.0f %5s" % (med.get(d, 0), unit) for d in devs)
    rs = "  ".join("%*.2f" % (len("%s/%s" % r), med[r[0]] / med[r[1]] if med.get(r[1]) else float("nan")) for r in ratios)
    print("%-10s %s   %s" % (job, cells, rs))
