/*
 * Crash-consistency model of ublk-mirror's write-intent protocol, as implemented in
 *   src/core.rs    MirrorState (begin_write, bitmap_flush_started/done, end_write, next_copy,
 *                  copy_done, target_flush_started/done, clear_tick)
 *   src/device.rs  QueueCommit::ensure (per-queue group commit of the bitmap fdatasync)
 *   src/mirror.rs  copy jobs, target flushes (consistent / checkpoint), lazy clearing ticks,
 *                  the mirror's own bitmap flush after clearing.
 * Checked with spin 6.5.2; see models/README.md and models/check.sh.
 *
 * Every block that the code runs under the engine's mutex is one atomic step here.
 * Everything that is not on a medium is lost in a crash; recovery resyncs exactly the regions
 * whose bit is set on the bitmap's medium.  A crash can happen in any state, so the crash
 * property (a) is a state invariant over the three media, asserted after every step that
 * changes a medium.
 *
 * Switches (all -D on the spin command line):
 *   NR=2|3       regions                                  (default 2)
 *   MAXW=n       total application writes                 (default 2)
 *   TAGS0=1|2    writer tags (tasks) on queue 0; queue 1 always has one tag (default 1)
 *   COPIERS=1|2  copy jobs in flight                      (default 1)
 *   LAZY=0|1     lazy clearing (live mirror) / clear at the target flush (offline sync)
 *   INIT_DIRTY=1 region 0 starts dirty, as after a crash (bit set, source ahead of target)
 *   TFAIL=0|1|2  target flush failure: 0 never; 1 a flush may fail, cached target data stays
 *                dirty and is written later (what the code assumes); 2 Linux writeback-error
 *                semantics: a failed writeback drops the dirty page (marked clean, medium
 *                unchanged) and the error is reported once, by the next fdatasync (errseq_t).
 *   TFIX=1|0     with TFAIL=2: 1 (default) what src/core.rs now does: a failed target flush
 *                also redirties every region whose copy started since the last successful
 *                target flush started, and fails the copies in flight; 0 the code before that
 *                fix (a negative control).
 *   NEG=0        the implemented protocol.  Negative controls (spin must find a violation):
 *     NEG=1  seed ordering (2012): data written first, bit set in the cache after the write,
 *            bitmap made durable only at the application's FLUSH; no write intent.
 *     NEG=2  begin_write does not disturb(): a write that begins keeps the region in the
 *            copied set / flush set / eligible sets.
 *     NEG=3  a bitmap flush claims the set sequence read when it COMPLETES, not when it started.
 *     NEG=4  a target flush is called consistent when nothing is dirty, even if copies are in
 *            flight (ignores copying_count).
 *     NEG=5  copies may start while a consistent target flush is in flight.
 *   NO_B         do not check property (b) (to look for a counterexample to (a) alone).
 *   NO_INTERNAL  drop the code's own debug_asserts (set for the negative controls, so that the
 *                violation found is one of the crash properties, not an internal check).
 */

#ifndef NR
#define NR 2
#endif
#ifndef MAXW
#define MAXW 2
#endif
#ifndef TAGS0
#define TAGS0 1
#endif
#ifndef COPIERS
#define COPIERS 1
#endif
#ifndef LAZY
#define LAZY 1
#endif
#ifndef INIT_DIRTY
#define INIT_DIRTY 1
#endif
#ifndef TFAIL
#define TFAIL 1
#endif
#ifndef TFIX
#define TFIX 1
#endif
#ifndef NEG
#define NEG 0
#endif

#define NQ 2                    /* queues */
#define NW (TAGS0 + 1)          /* writer tags in all */

/* ---------------- media and caches (versions: 0 = initial content) ---------------- */
byte src_cache[NR];  byte src_med[NR];          /* source: page cache / medium */
byte tgt_cache[NR];  byte tgt_med[NR];          /* target: page cache / medium */
bit  tgt_dirty[NR];                              /* target page dirty, not yet written back */
bit  tgt_err;                                    /* TFAIL=2: writeback error not yet reported */
bit  bm_cache[NR];   bit  bm_med[NR];            /* persistent bit: bitmap page cache / medium */

/* ---------------- MirrorState ---------------- */
bit  durable[NR];                                /* bit known durable on the medium */
byte pend[NR];                                   /* set seq of a pending (set, not durable) bit; 0 none */
byte set_seq; byte durable_seq;
bit  vol[NR];  byte ndirty;                      /* volatile bits (to copy) and their count */
bit  copying[NR]; byte ncopying;
bit  copied[NR];
byte inflight[NR];                               /* writes in flight per region */
bit  eyoung[NR]; bit eold[NR];                   /* lazy clearing eligibility */
bit  changed = 1;
bit  tfl; bit tfl_cons; bit fset[NR];            /* target flush in flight, its kind, its set */
#if TFIX
bit  taint[NR];                                  /* TFIX: copy in flight during a failed flush */
bit  twr[NR];                                    /* TFIX: copy started since the last successful
                                                    target flush started (target may be dirty) */
bit  ftw[NR];                                    /* TFIX: twr[] when the current flush started */
#endif

/* ---------------- mirror loop / queues ---------------- */
bit  clears_pending;                             /* mirror.rs bitmap_clears_pending */
bit  qc_inflight[NQ];                            /* QueueCommit.in_flight */
bit  qwait[NW];                                  /* tag registered a waker on its queue's flush */
bit  bm_tw[NQ * NR];                             /* bits a queue's bitmap fdatasync must still write */
bit  bm_twm[NR];                                 /* same, for the mirror's bitmap flush */
bit  tgt_tw[NR];                                 /* pages the target fdatasync must still write */

/* ---------------- ghost state for property (b) ---------------- */
byte acked[NR];                                  /* newest version of a completed write */
byte asnap[NR];                                  /* acked[] when the current target flush started */
byte ssnap[NR];                                  /* src_cache[] when it started */
byte nw;                                         /* writes begun */

/* ---------------- helpers ---------------- */
#if NR == 2
#define ALL(e) (e(0) && e(1))
#define ANY(e) (e(0) || e(1))
#elif NR == 3
#define ALL(e) (e(0) && e(1) && e(2))
#define ANY(e) (e(0) || e(1) || e(2))
#else
#error "NR must be 2 or 3"
#endif

/* (a) crash property: on the media, a clear bit implies target medium >= source medium */
#define CRASH_OK(r) (bm_med[r] || tgt_med[r] >= src_med[r])
#define check_a() assert(ALL(CRASH_OK))

/* (b) at a consistent point the target's medium holds every write acknowledged before the
   flush started, and (b') nothing that reached the source after the flush started */
#define TGT_HAS_ACKED(r) (tgt_med[r] >= asnap[r])
#define TGT_NOT_NEWER(r) (tgt_med[r] <= ssnap[r])

#ifdef NO_INTERNAL
#define internal(e) skip
#else
#define internal(e) assert(e)
#endif

inline disturb(r) {
  copied[r] = 0; eyoung[r] = 0; eold[r] = 0; fset[r] = 0
}

inline mark_volatile(r) {
  if :: !vol[r] -> vol[r] = 1; ndirty++ :: else -> skip fi
}

inline clear_bit(r) {
  bm_cache[r] = 0; durable[r] = 0; pend[r] = 0
}

/* MirrorState::bitmap_flush_done(seq, ok=true) */
inline bitmap_flush_done(seq, i) {
  if :: seq > durable_seq -> durable_seq = seq :: else -> skip fi;
  i = 0;
  do
  :: i < NR ->
     if
     :: pend[i] != 0 && pend[i] <= seq ->
        if :: bm_cache[i] -> durable[i] = 1 :: else -> skip fi;
        pend[i] = 0
     :: else -> skip
     fi;
     i++
  :: else -> break
  od;
  i = 0
}

#if NR == 2
#define FOR_R(m) m(0) m(1)
#else
#define FOR_R(m) m(0) m(1) m(2)
#endif

#if TFAIL == 2
#define OS_TGT_FAIL(r) :: atomic { tgt_dirty[r] -> tgt_dirty[r] = 0; tgt_err = 1 }
#else
#define OS_TGT_FAIL(r)
#endif
#define OS_OPTS(r) \
  :: atomic { src_med[r] != src_cache[r] -> src_med[r] = src_cache[r]; check_a() } \
  :: atomic { bm_med[r] != bm_cache[r] -> bm_med[r] = bm_cache[r]; check_a() } \
  :: atomic { tgt_dirty[r] -> tgt_med[r] = tgt_cache[r]; tgt_dirty[r] = 0; check_a() } \
  OS_TGT_FAIL(r)

/* one page of a queue's bitmap fdatasync */
#define QBM_WB(r) :: atomic { bm_tw[q * NR + r] -> bm_tw[q * NR + r] = 0; bm_med[r] = bm_cache[r]; check_a() }
/* one page of the mirror's bitmap fdatasync */
#define MBM_WB(r) :: atomic { bm_twm[r] -> bm_twm[r] = 0; bm_med[r] = bm_cache[r]; check_a() }
/* one page of the target's fdatasync */
#define TGT_WB(r) :: atomic { tgt_tw[r] -> tgt_tw[r] = 0; \
     if :: tgt_dirty[r] -> tgt_med[r] = tgt_cache[r]; tgt_dirty[r] = 0; check_a() :: else -> skip fi }
#if TFAIL == 2
#define TGT_WB_FAIL(r) :: atomic { tgt_tw[r] && tgt_dirty[r] -> tgt_tw[r] = 0; tgt_dirty[r] = 0; tgt_err = 1 }
#else
#define TGT_WB_FAIL(r)
#endif

#define VOLCOPY(r) (vol[r] && !copying[r])
#define ELIG(r) (eyoung[r] || eold[r])
#define COPIED(r) (copied[r])
#define NOTW(r) (tgt_tw[r] == 0)
#define QTW_DONE(r) (bm_tw[q * NR + r] == 0)
#define MTW_DONE(r) (bm_twm[r] == 0)

/* ====================================================================================== */
/* OS: writes any cached block back to its medium at any moment (page cache, disk cache).  */
/* ====================================================================================== */
active proctype os() {
  do
  FOR_R(OS_OPTS)
  od
}

/* ====================================================================================== */
/* Writer tag w of queue q (device.rs handle): begin_write, QueueCommit::ensure, issue the  */
/* write to the source, end_write.  Also the application's FLUSH (source fdatasync).       */
/* ====================================================================================== */
proctype writer(byte q; byte w) {
  byte r; byte need; byte myver; byte fs; byte i; bit ok;
end_idle:
  do
  :: atomic { nw < MAXW -> nw++; select(r : 0 .. NR - 1);
#if NEG == 1
       /* seed: the write goes to the source first; nothing is waited for */
       inflight[r]++; ok = 1; need = 0
#else
       /* MirrorState::begin_write */
       inflight[r]++;
#if NEG != 2
       disturb(r);
#endif
       if
       :: durable[r] -> need = 0
       :: !durable[r] && pend[r] != 0 -> need = pend[r]
       :: !durable[r] && pend[r] == 0 -> bm_cache[r] = 1; set_seq++; pend[r] = set_seq; need = set_seq
       fi;
       if :: need <= durable_seq -> need = 0 :: else -> skip fi;
       ok = 1
#endif
     };
     /* QueueCommit::ensure(seq) */
     if
     :: need == 0 -> skip
     :: need != 0 ->
        do
        :: need <= durable_seq -> break
        :: atomic { need > durable_seq && qc_inflight[q] -> qwait[w] = 1 };
           qwait[w] == 0                                  /* flush_done().await */
        :: atomic { need > durable_seq && !qc_inflight[q] ->
             qc_inflight[q] = 1;
#if NEG == 3
             fs = 0;
#else
             fs = set_seq;                                /* bitmap_flush_started */
#endif
             i = 0; do :: i < NR -> bm_tw[q * NR + i] = 1; i++ :: else -> break od; i = 0 };
           /* the fdatasync: every page is written at some moment before it completes,
              with its content at that moment; or it fails at any point */
           do
           FOR_R(QBM_WB)
           :: atomic { ALL(QTW_DONE) -> ok = 1 }; break
           :: ok = 0; break
           od;
           atomic {
             i = 0; do :: i < NR -> bm_tw[q * NR + i] = 0; i++ :: else -> break od; i = 0;
             if
             :: ok ->
#if NEG == 3
                fs = set_seq;                             /* BUG: covers bits set during the flush */
#endif
                bitmap_flush_done(fs, i)
             :: else -> skip
             fi;
             fs = 0;
             qc_inflight[q] = 0;                          /* in_flight = false; generation += 1 */
             /* wake every tag of this queue */
#if TAGS0 == 2
             if :: q == 0 -> qwait[0] = 0; qwait[1] = 0 :: else -> qwait[2] = 0 fi
#else
             if :: q == 0 -> qwait[0] = 0 :: else -> qwait[1] = 0 fi
#endif
           };
           if :: !ok -> break :: else -> skip fi         /* -EIO: the write fails, not issued */
        od
     fi;
     /* issue the write to the source; it lands in the source's cache */
     if
     :: ok -> atomic { src_cache[r]++; myver = src_cache[r] }
     :: else -> skip
     fi;
     /* MirrorState::end_write */
     atomic {
#if NEG == 1
       bm_cache[r] = 1;             /* seed: bit set after the write */
#endif
       inflight[r]--;
       disturb(r);
       mark_volatile(r);
       changed = 1;
       if :: ok && myver > acked[r] -> acked[r] = myver :: else -> skip fi;
       r = 0; need = 0; myver = 0; ok = 0
     }
  :: atomic {                        /* application FLUSH: fdatasync of the source */
       i = 0; do :: i < NR -> src_med[i] = src_cache[i];
#if NEG == 1
                              bm_med[i] = bm_cache[i];  /* seed: and of the bitmap */
#endif
                              i++ :: else -> break od; i = 0;
       check_a() }
  od
}

/* ====================================================================================== */
/* A copy job (mirror.rs start_copies / advance / finish): next_copy, read the source,     */
/* write the target, copy_done.                                                           */
/* ====================================================================================== */
proctype copier() {
  byte r; byte buf; bit ok;
end_idle:
  do
#if NEG == 5
  :: atomic { ANY(VOLCOPY) ->                                  /* BUG: copies during a consistent flush */
#else
  :: atomic { !(tfl && tfl_cons) && ANY(VOLCOPY) ->          /* MirrorState::next_copy */
#endif
       if
       :: VOLCOPY(0) -> r = 0
       :: VOLCOPY(1) -> r = 1
#if NR == 3
       :: VOLCOPY(2) -> r = 2
#endif
       fi;
       vol[r] = 0; ndirty--; copying[r] = 1; ncopying++; disturb(r);
#if TFIX
       twr[r] = 1;
#endif
       skip };
     buf = src_cache[r];                                      /* source read */
     if                                                       /* target write */
     :: atomic { tgt_cache[r] = buf; tgt_dirty[r] = 1; ok = 1 }
     :: atomic { tgt_cache[r] = buf; tgt_dirty[r] = 1; ok = 0 } /* failed after writing */
     :: ok = 0                                                /* failed before writing */
     fi;
     atomic {                                                 /* MirrorState::copy_done */
       copying[r] = 0; ncopying--;
#if TFIX
       if :: taint[r] -> ok = 0; taint[r] = 0 :: else -> skip fi;
#endif
       if
       :: !ok -> mark_volatile(r)
       :: ok && !vol[r] && inflight[r] == 0 -> copied[r] = 1
       :: else -> skip
       fi;
       changed = 1;
       r = 0; buf = 0; ok = 0 }
  od
}

/* ====================================================================================== */
/* Target flushes (mirror.rs maybe_flush / on_target_flush; MirrorState::target_flush_*)  */
/* ====================================================================================== */
active proctype tflusher() {
  byte i; bit ok; bit cleared;
end_idle:
  do
  :: atomic { !tfl && ((ndirty == 0 && ncopying == 0 && changed) || ANY(COPIED)) ->
       /* consistent_point_due || checkpoint_possible (time / bytes: any moment) */
       tfl = 1;
#if NEG == 4
       tfl_cons = (ndirty == 0);
#else
       tfl_cons = (ndirty == 0 && ncopying == 0);
#endif
       if :: tfl_cons -> changed = 0 :: else -> skip fi;
       i = 0;
       do
       :: i < NR -> fset[i] = copied[i]; copied[i] = 0; asnap[i] = acked[i]; ssnap[i] = src_cache[i]; tgt_tw[i] = 1;
#if TFIX
                    ftw[i] = twr[i]; twr[i] = copying[i];
#endif
                    i++
       :: else -> break
       od; i = 0 };
     /* the target's fdatasync */
     do
     FOR_R(TGT_WB)
     FOR_R(TGT_WB_FAIL)
     :: atomic { ALL(NOTW) -> ok = 1;
#if TFAIL == 2
          if :: tgt_err -> ok = 0; tgt_err = 0 :: else -> skip fi;      /* errseq: reported once */
#endif
          skip }; break
#if TFAIL >= 1
     :: ok = 0; break                                                   /* flush fails */
#endif
     od;
     atomic {                                       /* MirrorState::target_flush_done(ok) */
       cleared = 0;
       i = 0;
       do
       :: i < NR ->
          tgt_tw[i] = 0;
          if
          :: ok && fset[i] ->
             internal(!vol[i] && inflight[i] == 0);
             if
             :: bm_cache[i] ->
#if LAZY
                eyoung[i] = 1
#else
                clear_bit(i); cleared = 1
#endif
             :: else -> skip
             fi
          :: !ok && fset[i] -> mark_volatile(i)
          :: else -> skip
          fi;
#if TFIX
          /* a failed target fdatasync may have dropped any page written since the last
             successful flush started: recopy every region copied since then */
          if
          :: !ok && (ftw[i] || twr[i]) -> disturb(i); mark_volatile(i); twr[i] = 0
          :: else -> skip
          fi;
          if :: !ok && copying[i] -> taint[i] = 1; twr[i] = 1 :: else -> skip fi;
          ftw[i] = 0;
#endif
          fset[i] = 0;
          i++
       :: else -> break
       od; i = 0;
       if :: !ok -> changed = 1 :: else -> skip fi;
       /* (b) and (b'): see TGT_HAS_ACKED / TGT_NOT_NEWER */
#ifndef NO_B
       if :: ok && tfl_cons -> assert(ALL(TGT_HAS_ACKED)); assert(ALL(TGT_NOT_NEWER)) :: else -> skip fi;
#endif
       if :: cleared -> clears_pending = 1 :: else -> skip fi;   /* on_target_flush */
       tfl = 0; tfl_cons = 0; ok = 0; cleared = 0;
       i = 0; do :: i < NR -> asnap[i] = 0; ssnap[i] = 0; i++ :: else -> break od; i = 0
     }
  od
}

/* ====================================================================================== */
/* Lazy clearing ticks and the mirror's own bitmap flush (mirror.rs run / flush_bitmap).   */
/* ====================================================================================== */
active proctype clearer() {
  byte i; byte fs; bit ok; bit n;
end_idle:
  do
#if LAZY
  :: atomic { ANY(ELIG) ->                           /* MirrorState::clear_tick */
       n = 0;
       i = 0;
       do
       :: i < NR ->
          if
          :: eold[i] ->
             internal(!vol[i] && inflight[i] == 0);
             if :: bm_cache[i] -> clear_bit(i); n = 1 :: else -> skip fi
          :: else -> skip
          fi;
          eold[i] = eyoung[i]; eyoung[i] = 0;
          i++
       :: else -> break
       od; i = 0;
       if :: n -> clears_pending = 1 :: else -> skip fi; n = 0 }
#endif
  :: atomic { clears_pending -> clears_pending = 0;  /* flush_bitmap */
#if NEG == 3
       fs = 0;
#else
       fs = set_seq;
#endif
       i = 0; do :: i < NR -> bm_twm[i] = 1; i++ :: else -> break od; i = 0 };
     do
     FOR_R(MBM_WB)
     :: atomic { ALL(MTW_DONE) -> ok = 1 }; break
     :: ok = 0; break
     od;
     atomic {
       i = 0; do :: i < NR -> bm_twm[i] = 0; i++ :: else -> break od; i = 0;
       if
       :: ok ->
#if NEG == 3
          fs = set_seq;
#endif
          bitmap_flush_done(fs, i)
       :: else -> clears_pending = 1
       fi;
       fs = 0; ok = 0 }
  od
}

init {
  byte k;
  atomic {
#if INIT_DIRTY
    /* Region 0 as after a crash: its bit is set on the medium (and so in the cache, durable,
       volatile: MirrorState::new), the source holds a write the target never got. */
    bm_med[0] = 1; bm_cache[0] = 1; durable[0] = 1; vol[0] = 1; ndirty = 1;
    src_med[0] = 1; src_cache[0] = 1; acked[0] = 1;
#endif
    check_a();
    run writer(0, 0);
#if TAGS0 == 2
    run writer(0, 1);
    run writer(1, 2);
#else
    run writer(1, 1);
#endif
    k = 0;
    do :: k < COPIERS -> run copier(); k++ :: else -> break od;
    k = 0
  }
}
