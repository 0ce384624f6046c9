/*
 * Crash-consistency model of ublk-mirror's write-intent protocol, as implemented in
 *   src/core/mod.rs    MirrorState (begin_write, bitmap_flush_started/done, end_write, next_copy,
 *                  copy_done, target_flush_started/done, clear_tick)
 *   src/daemon/device.rs  QueueCommit::ensure (per-queue group commit of the bitmap fdatasync)
 *   src/engine/mirror.rs  copy jobs, target flushes (consistent / checkpoint), lazy clearing ticks,
 *                  the mirror's own bitmap flush after clearing.
 *   src/core/lifecycle.rs  open_bitmap / trusted_state: the creation of a full sync's bitmap and the
 *                  resume from a bitmap, after a daemon kill too (process `life`, KILLS, CREATE).
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
 *   TFIX=1|0     with TFAIL=2: 1 (default) what src/core/mod.rs now does: a failed target flush
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
 *
 * Daemon kills and the bitmap's creation (src/core/lifecycle.rs open_bitmap / trusted_state):
 *   KILLS=0|1|2  daemon kills (SIGKILL, OOM, panic) in a run, each followed by a restart
 *                (default 0).  A kill loses the daemon's memory (MirrorState, the queues' and
 *                the mirror's bookkeeping, every local of its tasks); the page caches (source,
 *                target, bitmap) and the media survive.  I/O the dead daemon had issued may
 *                still complete after the kill (see LATE_SRC, LATE_TGT).  The restart resumes
 *                from the bitmap: fsync of its directory, fdatasync of the bitmap, then the
 *                state is built from the bits (every set bit to-copy and durable).
 *   LATE_SRC=0|1 a source write the dead daemon issued (on a queue ring) lands in the source's
 *                cache 0: before the restart opens the bitmap (default), 1: at any moment, even
 *                after it (a negative control).
 *   LATE_TGT=0|1 a copy's target write the dead daemon issued (on the mirror ring) lands in the
 *                target's cache 0: before the restart opens the bitmap (default), 1: at any
 *                moment, even after it (a negative control).
 *                The defaults are what the code does (docs/crash-safety.md rule 10): the bitmap
 *                is a registered file of every queue ring and of the mirror's ring, so its
 *                flock, which the restart takes before it trusts the bitmap, is held until every
 *                request of the dead daemon has completed.  See README.md.
 *   CREATE=0|1|2 0: the run starts with the bitmap in place (default).  1: no bitmap yet, a
 *                full sync of a pair that was never copied (every region differs).  2: a full
 *                sync asked over an existing valid bitmap (region 0 dirty in it, region 1
 *                clean and equal).  The daemon first creates the new bitmap: temp file written
 *                with every bit set, fsync, rename over the name, fsync of the directory; then
 *                it resumes from it as after a kill.  A kill may interrupt it at any step.
 *   NEG_CREATE   negative control: the old order of creation (temp file written all clear,
 *                fsync, rename, directory fsync, and only then every bit set in the cache and
 *                flushed).
 *   NEG_RESUME   negative control: the restart builds its state from the bits in the cache
 *                without flushing the bitmap first (the old MirrorState::new on resume).
 *   NEG_RESUMEDIR negative control: open_bitmap does not fsync the bitmap's directory before
 *                it trusts the bitmap at its name, neither after a creation's rename nor on a
 *                resume (matters with a previous bitmap, CREATE=2).
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
#ifndef KILLS
#define KILLS 0
#endif
#ifndef LATE_SRC
#define LATE_SRC 0
#endif
#ifndef LATE_TGT
#define LATE_TGT 0
#endif
#ifndef CREATE
#define CREATE 0
#endif
#if KILLS > 0 || CREATE > 0
#define LIFE 1                  /* the daemon's life is modelled: start, kill, restart */
#else
#define LIFE 0
#endif
#if KILLS > 2
#error "KILLS must be 0, 1 or 2"
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
bit  vol[NR];  byte ndirty;                      /* the regions to copy, and their count */
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

/* ---------------- the daemon's life: kills, restarts, creation of the bitmap ---------------- */
#if LIFE
#define NT (NW + COPIERS + 2)                     /* tasks: writer tags, copy jobs, target flusher,
                                                    mirror loop's clearer */
#define T_COPIER(c) (NW + c)
#define T_TFLUSH (NW + COPIERS)
#define T_CLEAR (NW + COPIERS + 1)
bit  up;                                         /* a daemon runs */
bit  tbusy[NT];                                  /* a task is busy (not idle at end_idle) */
bit  tkill[NT];                                  /* a busy task of a killed daemon, not yet torn down */
byte ntk;                                        /* how many (the number of tkill[] set) */
byte nkills;                                     /* kills so far (bounded by KILLS) */
byte zsrc[NR];                                   /* source writes of a dead daemon still in flight */
#if KILLS > 0
byte zt[KILLS * NR];                             /* a dead daemon's copy target write in flight:
                                                    version + 1, slot (kill - 1) * NR + region */
#endif
#endif
#if CREATE
bit  dir_cache;                                  /* the bitmap's name points to the new file: */
bit  dir_med;                                    /*   in the page cache / on the medium */
#endif
#if CREATE == 2
bit  old_med[NR];                                /* the previous bitmap's bits on its medium */
#endif

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

/* (a) crash property: on the media, a clear bit implies target medium >= source medium.
   With CREATE the bit is the one recovery finds under the bitmap's name on the medium: the new
   file once the rename is durable (dir_med); before that the previous bitmap (CREATE=2) or
   none (CREATE=1: a full sync again, every region copied). */
#if CREATE == 1
#define BM_NAMED(r) (dir_med -> bm_med[r] : 1)
#elif CREATE == 2
#define BM_NAMED(r) (dir_med -> bm_med[r] : old_med[r])
#else
#define BM_NAMED(r) bm_med[r]
#endif
#if LIFE
#define UP up &&
#else
#define UP
#endif
#define CRASH_OK(r) (BM_NAMED(r) || tgt_med[r] >= src_med[r])
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

inline mark_to_copy(r) {
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
/* I/O a dead daemon issued, completing after the kill: a source write lands in the source's
   cache (its version is assigned then), a copy's target write in the target's cache. */
#if LIFE
#define OS_ZSRC(r) :: atomic { zsrc[r] > 0 -> zsrc[r]--; src_cache[r]++ }
#else
#define OS_ZSRC(r)
#endif
#if KILLS > 0
#define ZT_LAND(s, r) :: atomic { zt[s] > 0 -> tgt_cache[r] = zt[s] - 1; tgt_dirty[r] = 1; zt[s] = 0 }
#if KILLS == 2
#define OS_ZTGT(r) ZT_LAND(r, r) ZT_LAND(NR + r, r)
#else
#define OS_ZTGT(r) ZT_LAND(r, r)
#endif
#else
#define OS_ZTGT(r)
#endif
#define OS_OPTS(r) \
  :: atomic { src_med[r] != src_cache[r] -> src_med[r] = src_cache[r]; check_a() } \
  :: atomic { bm_med[r] != bm_cache[r] -> bm_med[r] = bm_cache[r]; check_a() } \
  :: atomic { tgt_dirty[r] -> tgt_med[r] = tgt_cache[r]; tgt_dirty[r] = 0; check_a() } \
  OS_TGT_FAIL(r) \
  OS_ZSRC(r) \
  OS_ZTGT(r)

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
#if CREATE
  :: atomic { dir_med != dir_cache -> dir_med = dir_cache; check_a() }   /* the rename reaches the medium */
#endif
  od
}

/* ====================================================================================== */
/* Writer tag w of queue q (device.rs handle): begin_write, QueueCommit::ensure, issue the  */
/* write to the source, end_write.  Also the application's FLUSH (source fdatasync).       */
/* ====================================================================================== */
proctype writer(byte q; byte w) {
  byte r; byte need; byte myver; byte fs; byte i; bit ok;
#if LIFE
  bit iss;                                             /* the write may be issued (intent durable) */
  {
end_idle:
  do
  :: atomic { up && nw < MAXW -> nw++; select(r : 0 .. NR - 1); tbusy[w] = 1;
#else
end_idle:
  do
  :: atomic { nw < MAXW -> nw++; select(r : 0 .. NR - 1);
#endif
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
#if LIFE
     :: need == 0 -> iss = 1
#else
     :: need == 0 -> skip
#endif
     :: need != 0 ->
        do
#if LIFE
        :: atomic { need <= durable_seq -> iss = 1 }; break
#else
        :: need <= durable_seq -> break
#endif
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
#if LIFE
     :: ok -> atomic { src_cache[r]++; myver = src_cache[r]; iss = 0 }
#else
     :: ok -> atomic { src_cache[r]++; myver = src_cache[r] }
#endif
     :: else -> skip
     fi;
     /* MirrorState::end_write */
     atomic {
#if NEG == 1
       bm_cache[r] = 1;             /* seed: bit set after the write */
#endif
       inflight[r]--;
       disturb(r);
       mark_to_copy(r);
       changed = 1;
       if :: ok && myver > acked[r] -> acked[r] = myver :: else -> skip fi;
#if LIFE
       tbusy[w] = 0;
#endif
       r = 0; need = 0; myver = 0; ok = 0
     }
#if LIFE
  :: atomic { up ->                  /* application FLUSH: fdatasync of the source */
#else
  :: atomic {                        /* application FLUSH: fdatasync of the source */
#endif
       i = 0; do :: i < NR -> src_med[i] = src_cache[i];
#if NEG == 1
                              bm_med[i] = bm_cache[i];  /* seed: and of the bitmap */
#endif
                              i++ :: else -> break od; i = 0;
       check_a() }
  od
#if LIFE
  } unless { atomic { tkill[w] ->                      /* the daemon was killed: this busy
                                                          tag is torn down and becomes an idle
                                                          tag of the next daemon */
       /* a write already issued to the source may still land (in the source's cache) after the
          kill; or it was not issued yet.  Either way ublk re-issues the request to the next
          daemon (USER_RECOVERY_REISSUE), which is one more write here (within MAXW). */
       if :: iss -> if :: zsrc[r]++ :: skip fi :: else -> skip fi;
       r = 0; need = 0; myver = 0; fs = 0; i = 0; ok = 0; iss = 0;
       tkill[w] = 0; tbusy[w] = 0; ntk-- }; goto end_idle }
#endif
}

/* ====================================================================================== */
/* A copy job (mirror.rs start_copies / advance / finish): next_copy, read the source,     */
/* write the target, copy_done.                                                           */
/* ====================================================================================== */
proctype copier(byte c) {
  byte r; byte buf; bit ok;
#if LIFE
  bit rd;                                                     /* read done, target write not yet */
  {
#endif
end_idle:
  do
#if NEG == 5
  :: atomic { UP ANY(VOLCOPY) ->                               /* BUG: copies during a consistent flush */
#else
  :: atomic { UP !(tfl && tfl_cons) && ANY(VOLCOPY) ->       /* MirrorState::next_copy */
#endif
#if LIFE
       tbusy[T_COPIER(c)] = 1;
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
#if LIFE
     atomic { buf = src_cache[r]; rd = 1 };                   /* source read */
     if                                                       /* target write */
     :: atomic { tgt_cache[r] = buf; tgt_dirty[r] = 1; ok = 1; rd = 0 }
     :: atomic { tgt_cache[r] = buf; tgt_dirty[r] = 1; ok = 0; rd = 0 } /* failed after writing */
     :: atomic { ok = 0; rd = 0 }                             /* failed before writing */
     fi;
#else
     buf = src_cache[r];                                      /* source read */
     if                                                       /* target write */
     :: atomic { tgt_cache[r] = buf; tgt_dirty[r] = 1; ok = 1 }
     :: atomic { tgt_cache[r] = buf; tgt_dirty[r] = 1; ok = 0 } /* failed after writing */
     :: ok = 0                                                /* failed before writing */
     fi;
#endif
     atomic {                                                 /* MirrorState::copy_done */
       copying[r] = 0; ncopying--;
#if TFIX
       if :: taint[r] -> ok = 0; taint[r] = 0 :: else -> skip fi;
#endif
       if
       :: !ok -> mark_to_copy(r)
       :: ok && !vol[r] && inflight[r] == 0 -> copied[r] = 1
       :: else -> skip
       fi;
       changed = 1;
#if LIFE
       tbusy[T_COPIER(c)] = 0;
#endif
       r = 0; buf = 0; ok = 0 }
  od
#if LIFE
  } unless { atomic { tkill[T_COPIER(c)] ->                   /* the daemon was killed */
       /* the copy's target write may have been issued (on the mirror ring) and land later */
#if KILLS > 0
       if :: rd -> if :: zt[(nkills - 1) * NR + r] = buf + 1 :: skip fi :: else -> skip fi;
#endif
       r = 0; buf = 0; ok = 0; rd = 0;
       tkill[T_COPIER(c)] = 0; tbusy[T_COPIER(c)] = 0; ntk-- }; goto end_idle }
#endif
}

/* ====================================================================================== */
/* Target flushes (mirror.rs maybe_flush / on_target_flush; MirrorState::target_flush_*)  */
/* ====================================================================================== */
active proctype tflusher() {
  byte i; bit ok; bit cleared;
#if LIFE
  {
#endif
end_idle:
  do
  :: atomic { UP !tfl && ((ndirty == 0 && ncopying == 0 && changed) || ANY(COPIED)) ->
       /* consistent_point_due || checkpoint_possible (time / bytes: any moment) */
       tfl = 1;
#if LIFE
       tbusy[T_TFLUSH] = 1;
#endif
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
          :: !ok && fset[i] -> mark_to_copy(i)
          :: else -> skip
          fi;
#if TFIX
          /* a failed target fdatasync may have dropped any page written since the last
             successful flush started: recopy every region copied since then */
          if
          :: !ok && (ftw[i] || twr[i]) -> disturb(i); mark_to_copy(i); twr[i] = 0
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
#if LIFE
       tbusy[T_TFLUSH] = 0;
#endif
       i = 0; do :: i < NR -> asnap[i] = 0; ssnap[i] = 0; i++ :: else -> break od; i = 0
     }
  od
#if LIFE
  } unless { atomic { tkill[T_TFLUSH] ->          /* killed: the writes of its fdatasync are
                                                     the OS's writeback from now on */
       i = 0; ok = 0; cleared = 0; tkill[T_TFLUSH] = 0; tbusy[T_TFLUSH] = 0; ntk-- }; goto end_idle }
#endif
}

/* ====================================================================================== */
/* Lazy clearing ticks and the mirror's own bitmap flush (mirror.rs run / flush_bitmap).   */
/* ====================================================================================== */
active proctype clearer() {
  byte i; byte fs; bit ok; bit n;
#if LIFE
  {
#endif
end_idle:
  do
#if LAZY
  :: atomic { UP ANY(ELIG) ->                        /* MirrorState::clear_tick */
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
  :: atomic { UP clears_pending -> clears_pending = 0;  /* flush_bitmap */
#if LIFE
       tbusy[T_CLEAR] = 1;
#endif
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
#if LIFE
       tbusy[T_CLEAR] = 0;
#endif
       fs = 0; ok = 0 }
  od
#if LIFE
  } unless { atomic { tkill[T_CLEAR] ->
       i = 0; fs = 0; ok = 0; n = 0; tkill[T_CLEAR] = 0; tbusy[T_CLEAR] = 0; ntk-- }; goto end_idle }
#endif
}

#if LIFE
/* ====================================================================================== */
/* The daemon's life (src/core/lifecycle.rs open_bitmap, trusted_state; admin.rs recover):      */
/* creation of the bitmap for a full sync, daemon kills, restarts that resume from it.     */
/* ====================================================================================== */

/* A kill: everything in the daemon's memory is gone. (Its tasks drop their own locals when
   they see it, in their `unless` escapes.) */
inline kill_reset(i) {
  i = 0;
  do
  :: i < NR ->
     durable[i] = 0; pend[i] = 0; vol[i] = 0; copying[i] = 0; copied[i] = 0; inflight[i] = 0;
     eyoung[i] = 0; eold[i] = 0; fset[i] = 0; bm_twm[i] = 0; tgt_tw[i] = 0;
     asnap[i] = 0; ssnap[i] = 0;
#if TFIX
     taint[i] = 0; twr[i] = 0; ftw[i] = 0;
#endif
     i++
  :: else -> break
  od;
  i = 0; do :: i < NQ * NR -> bm_tw[i] = 0; i++ :: else -> break od;
  i = 0; do :: i < NW -> qwait[i] = 0; i++ :: else -> break od;
  i = 0; do :: i < NQ -> qc_inflight[i] = 0; i++ :: else -> break od;
  i = 0;
  set_seq = 0; durable_seq = 0; ndirty = 0; ncopying = 0; changed = 0;
  tfl = 0; tfl_cons = 0; clears_pending = 0
}

/* The restart may open the bitmap once every task of the dead daemon is gone and, unless
   LATE_SRC / LATE_TGT, once the I/O it had issued has completed. */
#define ZS_DONE(r) (zsrc[r] == 0)
#if LATE_SRC
#define ZSRC_DONE 1
#else
#define ZSRC_DONE ALL(ZS_DONE)
#endif
#if KILLS == 2
#define ZT_DONE(r) (zt[r] == 0 && zt[NR + r] == 0)
#else
#define ZT_DONE(r) (zt[r] == 0)
#endif
#if KILLS > 0 && !LATE_TGT
#define ZTGT_DONE ALL(ZT_DONE)
#else
#define ZTGT_DONE 1
#endif
#define RESTART_OK (ntk == 0 && ZSRC_DONE && ZTGT_DONE)

#if KILLS > 0
/* a kill between two steps of the creation (at most KILLS in all) */
#define KILL_POINT if :: atomic { nkills < KILLS -> nkills++ }; goto down :: skip fi
#else
#define KILL_POINT skip
#endif

active proctype life() {
  byte i;
#if CREATE
  atomic {
    /* the pair before the full sync: 1, never copied (every region differs); 2, as recorded
       by the existing bitmap (region 0 differs and its bit is set there, region 1 is equal) */
    i = 0;
    do
    :: i < NR ->
#if CREATE == 1
       src_cache[i] = 1; src_med[i] = 1; acked[i] = 1;
#else
       if :: i == 0 -> src_cache[i] = 1; src_med[i] = 1; acked[i] = 1; old_med[i] = 1 :: else -> skip fi;
#endif
       i++
    :: else -> break
    od; i = 0 };
create:
  /* open_bitmap(Full): write_temp(Dirty), sync_temp, rename_temp; the directory sync, open and
     trusted_state follow at `restart`.  bm_cache/bm_med are the new file's contents, written
     under a temporary name until dir_cache. */
  atomic {                                             /* write_temp */
    i = 0;
    do
#ifdef NEG_CREATE
    :: i < NR -> bm_cache[i] = 0; bm_med[i] = 0; i++  /* old order: created all clear */
#else
    :: i < NR -> bm_cache[i] = 1; bm_med[i] = 0; i++  /* every bit set */
#endif
    :: else -> break
    od; i = 0 };
  KILL_POINT;
  atomic {                                             /* sync_temp */
    i = 0; do :: i < NR -> bm_med[i] = bm_cache[i]; i++ :: else -> break od; i = 0; check_a() };
  KILL_POINT;
  dir_cache = 1;                                       /* rename_temp */
  KILL_POINT;
#ifdef NEG_CREATE
  /* old order: the clear bitmap is published (directory fsync), and only then are the bits
     set (mark_all, in the mmap'd page cache) and flushed, at `restart` */
  atomic { dir_med = 1; check_a() };                   /* sync_dir */
  KILL_POINT;
  atomic { i = 0; do :: i < NR -> bm_cache[i] = 1; i++ :: else -> break od; i = 0 };
  KILL_POINT;
#endif
  goto restart;
#endif
end_up:
  do
  :: atomic { up && nkills < KILLS ->                  /* SIGKILL */
       up = 0; nkills++;
       i = 0; do :: i < NT -> tkill[i] = tbusy[i]; ntk = ntk + tbusy[i]; i++ :: else -> break od; i = 0;
       kill_reset(i) };
     goto down
  od;
down:
#if CREATE
  if
  :: atomic { RESTART_OK && !dir_cache -> skip }; goto create   /* no new bitmap at the name: the
                                                                   full sync starts again */
#if CREATE == 2
  :: atomic { RESTART_OK && !dir_cache ->              /* or the previous bitmap is resumed */
       i = 0; do :: i < NR -> bm_cache[i] = old_med[i]; bm_med[i] = old_med[i]; i++ :: else -> break od; i = 0;
       dir_cache = 1; dir_med = 1 }; goto restart
  :: atomic { RESTART_OK && dir_cache && dir_med ->    /* or, the new bitmap in place, a full sync
                                                          is asked again: it becomes the previous
                                                          bitmap, with its bits on the medium (any
                                                          bit only in its cache is lost or not: the
                                                          fewer, the harder for (a)) */
       i = 0; do :: i < NR -> old_med[i] = bm_med[i]; i++ :: else -> break od; i = 0;
       dir_cache = 0; dir_med = 0 }; goto create
#endif
  :: atomic { RESTART_OK && dir_cache -> skip }; goto restart
  fi;
#endif
restart:
  atomic { RESTART_OK ->                               /* open_bitmap after the kill or creation */
#if CREATE && !defined(NEG_RESUMEDIR)
    dir_med = dir_cache;                               /* sync_dir: the name is durable */
#endif
#ifndef NEG_RESUME
    i = 0; do :: i < NR -> bm_med[i] = bm_cache[i]; i++ :: else -> break od; i = 0;   /* sync */
#endif
    check_a();
#if TFAIL == 2
    /* the target is opened again: a writeback error from before this open is reported to the
       new descriptor only if no fdatasync of the dead daemon's saw it (errseq_sample) */
    if :: tgt_err = 0 :: skip fi;
#endif
    /* MirrorState::new: every set bit is to-copy and durable */
    i = 0;
    do
    :: i < NR -> if :: bm_cache[i] -> durable[i] = 1; vol[i] = 1; ndirty++ :: else -> skip fi; i++
    :: else -> break
    od; i = 0;
    changed = 1; up = 1 };
  goto end_up
}
#endif

init {
  byte k;
  atomic {
#if INIT_DIRTY && !CREATE
    /* Region 0 as after a crash: its bit is set on the medium (and so in the cache, durable,
       to-copy: MirrorState::new), the source holds a write the target never got. */
    bm_med[0] = 1; bm_cache[0] = 1; durable[0] = 1; vol[0] = 1; ndirty = 1;
    src_med[0] = 1; src_cache[0] = 1; acked[0] = 1;
#endif
#if LIFE && !CREATE
    up = 1;                                            /* the daemon runs */
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
    do :: k < COPIERS -> run copier(k); k++ :: else -> break od;
    k = 0
  }
}
