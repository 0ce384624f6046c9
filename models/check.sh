#!/bin/sh
# Model check of ublk-mirror's crash-consistency protocol (models/mirror.pml) with spin.
#
# Runs the implemented protocol in several configurations (each must report 0 errors, full
# state space) and the negative controls (each must make spin find a violation of the named
# crash property).  Exits non-zero if ANY expectation fails: a check that cannot fail proves
# nothing, so a negative control that passes is a failure of this script.
#
# Needs spin (6.5.x) and a C compiler on PATH; installs nothing.  Runs one verifier at a time:
# total about 2.5 minutes and at most 1.5 GB of memory on a 2-core machine (see
# models/README.md for the measured numbers).
#
# Usage: models/check.sh [-k] [-v]     -k keep the work directory   -v print spin's full output
set -u

here=$(cd "$(dirname "$0")" && pwd)
model="$here/mirror.pml"
keep=0; verbose=0
for a in "$@"; do
  case "$a" in
    -k) keep=1 ;;
    -v) verbose=1 ;;
    *) echo "usage: $0 [-k] [-v]" >&2; exit 2 ;;
  esac
done

for tool in spin "${CC:-gcc}"; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "check.sh: '$tool' is not on PATH. Install it first (Debian/Ubuntu: apt-get install -y spin gcc;" >&2
    echo "          the project's dependency script does this). Nothing was checked." >&2
    exit 2
  fi
done
CC=${CC:-gcc}

work=$(mktemp -d "${TMPDIR:-/tmp}/mirror-spin.XXXXXX") || exit 2
if [ "$keep" = 0 ]; then trap 'rm -rf "$work"' EXIT; fi

# Memory bound for each pan run (MB) and hash table size (2^W slots).
MEM_MB=${MEM_MB:-4096}
HASHW=${HASHW:-24}

failures=0
total_start=$(date +%s)

# run NAME EXPECT DEFINES DESCRIPTION
#   EXPECT: pass | a | b | b2   (a violation of property (a), (b) or (b') must be found;
#           (a) crash invariant on the media, (b) a consistent point holds every acknowledged
#           write, (b') a consistent point holds nothing that reached the source after it)
run() {
  name=$1; expect=$2; defs=$3; desc=$4
  d="$work/$name"; mkdir -p "$d"; cp "$model" "$d/m.pml"
  t0=$(date +%s.%N)
  if ! (cd "$d" && spin $defs -a m.pml >spin.out 2>&1); then
    echo "FAIL  $name: spin could not generate the verifier:"; sed 's/^/      /' "$d/spin.out"
    failures=$((failures + 1)); return
  fi
  # -DMEMLIM bounds memory; exhaustive search (no BITSTATE, no COLLAPSE), partial order reduction on.
  # A negative control stops at its first counterexample after a small search: there the
  # compiler's time dominates, so it is compiled without optimisation.
  opt=-O2; [ "$expect" = pass ] || opt=-O0
  if ! (cd "$d" && $CC $opt -w -DMEMLIM=$MEM_MB -o pan pan.c >cc.out 2>&1); then
    echo "FAIL  $name: the verifier did not compile:"; sed 's/^/      /' "$d/cc.out"
    failures=$((failures + 1)); return
  fi
  (cd "$d" && ./pan -m1000000 -w$HASHW >pan.out 2>&1)
  t1=$(date +%s.%N)
  secs=$(echo "$t0 $t1" | awk '{ printf "%.1f", $2 - $1 }')
  [ "$verbose" = 1 ] && cat "$d/pan.out"
  errors=$(sed -n 's/.*errors: \([0-9][0-9]*\).*/\1/p' "$d/pan.out" | tail -1)
  states=$(sed -n 's/^ *\([0-9.e+]*\) states, stored.*/\1/p' "$d/pan.out" | tail -1)
  depth=$(sed -n 's/.*depth reached \([0-9]*\),.*/\1/p' "$d/pan.out" | tail -1)
  mem=$(sed -n 's/^ *\([0-9.]*\).*total actual memory usage.*/\1/p' "$d/pan.out" | tail -1 | awk '{ printf "%d", $1 + 0.5 }')
  complete=yes
  if grep -qE "out of memory|max search depth too small|Search not completed" "$d/pan.out"; then complete=no; fi
  [ -n "$errors" ] || errors="?"
  [ -n "$states" ] || states="?"
  line=$(printf '%-16s states %-9s depth %-5s errors %-2s %5ss %5s MB' "$name" "$states" "$depth" "$errors" "$secs" "${mem:-?}")

  if [ "$expect" = pass ]; then
    if [ "$errors" = 0 ] && [ "$complete" = yes ]; then
      echo "ok    $line  ($desc)"
    else
      echo "FAIL  $line  ($desc): expected 0 errors over the full state space"
      [ "$complete" = yes ] || [ "$errors" != 0 ] || echo "      the search did not complete (memory or depth bound)"
      if [ -f "$d/m.pml.trail" ]; then
        (cd "$d" && spin $defs -t m.pml 2>&1 | grep -E "assertion violated|text of failed" | sed 's/^/      /')
        echo "      replay: cd $d && spin $defs -t -p m.pml   (run with -k to keep it)"
      fi
      failures=$((failures + 1))
    fi
    return
  fi

  # A violation must be found, and it must be the expected crash property.
  if [ "$errors" = "?" ] || [ "$errors" -lt 1 ] || [ ! -f "$d/m.pml.trail" ]; then
    echo "FAIL  $line  ($desc): expected spin to find a violation of ($expect), found none"
    failures=$((failures + 1)); return
  fi
  (cd "$d" && spin $defs -t -p m.pml >trail.out 2>&1)
  what=$(grep "text of failed assertion" "$d/trail.out" | head -1)
  steps=$(sed -n 's/.*trail ends after \([0-9]*\) steps.*/\1/p' "$d/trail.out" | head -1)
  case "$expect" in
    a) pat='(tgt_med\[0\]>=src_med\[0\])' ;;
    b) pat='tgt_med\[0\]>=asnap\[0\]' ;;
    b2) pat='tgt_med\[0\]<=ssnap\[0\]' ;;
  esac
  if echo "$what" | grep -q "$pat"; then
    echo "ok    $line  ($desc): violates ($(echo $expect | sed "s/b2/b'/")) as expected, counterexample $steps steps"
  else
    echo "FAIL  $line  ($desc): expected a violation of ($expect), got: ${what:-no assertion text}"
    failures=$((failures + 1))
  fi
}

echo "spin model check of $model"
echo "bounds: 2 regions, 1-2 application writes (region 0 starts dirty, as after a crash,"
echo "        unless the run creates the bitmap), 2 queues (queue 0 with 1 or 2 tags), 1 or 2"
echo "        copy jobs, 0-2 daemon kills; OS writeback of every cache at any moment; power"
echo "        loss in any state"
echo

echo "-- the implemented protocol (each must report 0 errors)"
run real-lazy      pass "-DTAGS0=2"            "live mirror, lazy clearing, 3 writer tags on 2 queues, target flush may fail"
run real-offline   pass "-DTAGS0=2 -DLAZY=0"   "offline sync: bits cleared at the target flush"
run real-copies2   pass "-DCOPIERS=2"          "two copy jobs in flight, lazy clearing"
echo
echo "-- negative controls (each must make spin find a violation)"
run neg1-seed      a "-DNEG=1 -DNO_INTERNAL"   "seed ordering: data first, bit after, bitmap durable only at FLUSH"
run neg2-nodisturb a "-DNEG=2 -DNO_INTERNAL"   "begin_write does not disturb (lazy)"
run neg2-offline   a "-DNEG=2 -DNO_INTERNAL -DLAZY=0" "begin_write does not disturb (offline)"
run neg3-flushseq  a "-DNEG=3 -DNO_INTERNAL"   "bitmap flush claims the sequence read at its completion"
run neg4-consist   b "-DNEG=4 -DNO_INTERNAL"   "consistent flush declared with a copy in flight"
run neg5-copyduring b2 "-DNEG=5 -DNO_INTERNAL"  "copies start during a consistent flush"
echo
echo "-- target writeback errors with Linux semantics (dropped page, error reported once)"
echo "   Found by this model in the first version of src/core/mod.rs, fixed there since (TFIX)."
run errseq         pass "-DTFAIL=2"            "implemented protocol, lossy target flush failure"
run neg6-errseq-b  b "-DTFAIL=2 -DTFIX=0"      "before the fix: only the failed flush's set is redirtied"
run neg6-errseq-a  a "-DTFAIL=2 -DTFIX=0 -DNO_B" "same, looking for a counterexample to (a) alone"
echo
echo "-- daemon kills (page caches survive; the dead daemon's I/O may complete after the kill,"
echo "   before the restart: the kill barrier) and the bitmap's creation (src/core/lifecycle.rs)"
run kill           pass "-DKILLS=1 -DINIT_DIRTY=0" "a kill at any moment, restart resumes from the bitmap"
run kill2          pass "-DKILLS=2 -DMAXW=1"     "two kills, region 0 dirty at the start"
run kill-errseq    pass "-DKILLS=1 -DINIT_DIRTY=0 -DTFAIL=2" "a kill, lossy target flush failures"
run create-new     pass "-DCREATE=1 -DKILLS=1 -DMAXW=1" "full sync, no bitmap yet, never-copied pair; kill anywhere"
run create-over    pass "-DCREATE=2 -DKILLS=1 -DMAXW=1" "full sync over an existing bitmap; kill anywhere"
run neg7-create    a "-DCREATE=1 -DKILLS=1 -DMAXW=1 -DNEG_CREATE -DNO_INTERNAL" "old creation order: clear bitmap published, bits set after"
run neg8-resume    a "-DKILLS=1 -DINIT_DIRTY=0 -DNEG_RESUME -DNO_INTERNAL" "old resume: bits trusted from the cache without a flush"
run neg9-resumedir a "-DCREATE=2 -DKILLS=1 -DMAXW=1 -DNEG_RESUMEDIR -DNO_INTERNAL" "open_bitmap without the directory fsync"
run neg10-latesrc  a "-DKILLS=1 -DINIT_DIRTY=0 -DLATE_SRC=1 -DNO_B -DNO_INTERNAL" "no kill barrier: a dead daemon's source write lands after the restart"
run neg11-latetgt  a "-DKILLS=1 -DINIT_DIRTY=0 -DLATE_TGT=1 -DNO_B -DNO_INTERNAL" "no kill barrier: a dead daemon's copy lands in the target after the restart"

total_end=$(date +%s)
echo
if [ "$failures" -eq 0 ]; then
  echo "all expectations met ($((total_end - total_start)) s)"
  exit 0
fi
echo "$failures expectation(s) FAILED ($((total_end - total_start)) s)"
exit 1
