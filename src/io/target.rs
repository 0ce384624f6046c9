//! The mirror's view of a target: operations submitted on the mirror's io_uring and completed
//! later, identified by a token. A file or block device needs one SQE per operation; a network
//! target (NBD) implements the same trait with its own request/reply state machine on the same
//! ring, and the mirror logic does not change.

use crate::io::backing::{Backing, Kind};
use crate::io::uring::{push, Owner, Ring};
use io_uring::{opcode, types};
use slab::Slab;
use std::io;

/// One operation on the target. Buffers are owned by the mirror and stay valid and untouched
/// until the operation's completion is delivered.
#[derive(Clone, Copy, Debug)]
pub enum TargetOp {
    Write { off: u64, buf: *const u8, len: u32 },
    /// Make `[off, off+len)` read as zeroes, deallocating if possible (a source hole).
    Zero { off: u64, len: u64 },
    /// Make every completed write durable.
    Flush,
    Read { off: u64, buf: *mut u8, len: u32 },
}

/// A completion: the token given at submission and the result (bytes for reads and writes).
pub type TargetDone = (u64, io::Result<u32>);

pub trait Target {
    fn size(&self) -> u64;
    fn describe(&self) -> String;
    /// Alignment that offsets and lengths of reads and writes must respect.
    fn block_size(&self) -> u32;
    /// Submit `op`. Its completion is later returned by [`Target::complete`] with `token`.
    ///
    /// # Safety
    ///
    /// The buffer of a write or read in `op` must stay valid and unmoved, and a read's buffer
    /// unused otherwise, until the operation's completion has been returned by
    /// [`Target::complete`]; if the ring is closed before that, the buffer is leaked.
    unsafe fn submit(&mut self, ring: &mut Ring, op: TargetOp, token: u64) -> io::Result<()>;
    /// Handle one CQE addressed to the target ([`Owner::Target`]); push finished operations.
    fn complete(&mut self, ring: &mut Ring, sub: u64, res: i32, done: &mut Vec<TargetDone>);
    /// True if someone else observes the target's flushes as consistent images (a replication
    /// server snapshotting on flush): then the mirror flushes only at consistent points and
    /// makes no checkpoint flushes in between.
    fn flush_publishes(&self) -> bool {
        false
    }
    /// What the bitmap records as the target's identity: a name and a fingerprint, so that a
    /// bitmap is never reused with another target.
    fn identity(&self) -> (String, u64);
    /// Whether writes bypass the page cache (reported to the user).
    fn direct(&self) -> bool {
        false
    }
    /// A descriptor the mirror may register as a fixed file on its ring (then it calls
    /// [`Target::use_fixed`] with the slot).
    fn fixed_fd(&self) -> Option<std::os::unix::io::RawFd> {
        None
    }
    fn use_fixed(&mut self, _slot: u32) {}
    /// The target's file or block device, if it is one (the front end may then write it too).
    fn backing(&self) -> Option<&Backing> {
        None
    }
    /// Called by the mirror before it retries after target errors, with nothing of the
    /// target's in flight: a network target reconnects here. An error means "still down";
    /// the mirror backs off and calls again later. Must not block for more than about a second.
    fn reset(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// A mirror loop starts on a new ring (the supervisor restarts a failed loop with the same
    /// target): nothing the target posted on an earlier ring completes on this one. Returns
    /// true if the target dropped state for that and must be [`Self::reset`] before use.
    fn ring_changed(&mut self) -> bool {
        false
    }
}

/// A regular file or block device, through io_uring.
pub struct FileTarget {
    backing: Backing,
    fixed: Option<u32>,
    /// For zeroing where fallocate is refused: the pending zero writes (of [`zero_chunk`]), by
    /// slot (in their operations' user_data).
    zero_jobs: Slab<ZeroJob>,
    /// Fallocate punch-hole is refused here; zero by writing.
    no_punch: bool,
}

struct ZeroJob {
    token: u64,
    pos: u64,
    end: u64,
}

const ZERO_CHUNK: usize = 1 << 20;

/// The zeroes of zeroing writes: one buffer for the process, never freed (so that no write in
/// flight can outlive it) and never written (its pages are the kernel's zero page: no memory).
fn zero_chunk() -> *const u8 {
    static ZERO: std::sync::OnceLock<crate::io::backing::AlignedBuf> = std::sync::OnceLock::new();
    ZERO.get_or_init(|| crate::io::backing::AlignedBuf::new(ZERO_CHUNK)).as_ptr()
}

impl FileTarget {
    pub fn new(backing: Backing) -> Self {
        FileTarget {
            backing,
            fixed: None,
            zero_jobs: Slab::new(),
            no_punch: false,
        }
    }
    pub fn backing(&self) -> &Backing {
        &self.backing
    }

    fn fd_entry<F: FnOnce(types::Fixed) -> io_uring::squeue::Entry, G: FnOnce(types::Fd) -> io_uring::squeue::Entry>(
        &self,
        fixed: F,
        raw: G,
    ) -> io_uring::squeue::Entry {
        match self.fixed {
            Some(s) => fixed(types::Fixed(s)),
            None => raw(types::Fd(self.backing.fd())),
        }
    }

    fn submit_zero_write(&mut self, ring: &mut Ring, idx: usize) -> io::Result<()> {
        let Some(job) = self.zero_jobs.get(idx) else { return Ok(()) };
        let len = (job.end - job.pos).min(ZERO_CHUNK as u64) as u32;
        let off = job.pos;
        let ptr = zero_chunk();
        let e = self.fd_entry(
            |f| opcode::Write::new(f, ptr, len).offset(off).build(),
            |f| opcode::Write::new(f, ptr, len).offset(off).build(),
        );
        // SAFETY: the zero chunk lives as long as the process and is only read.
        unsafe { push(ring, e, Owner::Target, (1 << 40) | idx as u64) }
    }
}

const SUB_PUNCH: u64 = 2 << 40;

impl Target for FileTarget {
    fn size(&self) -> u64 {
        self.backing.size
    }
    fn describe(&self) -> String {
        self.backing.path.display().to_string()
    }
    fn block_size(&self) -> u32 {
        self.backing.logical_block
    }
    fn identity(&self) -> (String, u64) {
        self.backing.identity.clone()
    }
    fn direct(&self) -> bool {
        self.backing.direct
    }
    fn fixed_fd(&self) -> Option<std::os::unix::io::RawFd> {
        Some(self.backing.fd())
    }
    fn backing(&self) -> Option<&Backing> {
        Some(&self.backing)
    }
    /// Use fixed-file slot `slot` (registered on the ring by the caller) instead of the raw fd.
    fn use_fixed(&mut self, slot: u32) {
        self.fixed = Some(slot);
    }

    unsafe fn submit(&mut self, ring: &mut Ring, op: TargetOp, token: u64) -> io::Result<()> {
        // Tokens are small (job slots); the top bits of `sub` say what kind of entry this is.
        debug_assert!(token < (1 << 40));
        let e = match op {
            TargetOp::Write { off, buf, len } => self.fd_entry(
                |f| opcode::Write::new(f, buf, len).offset(off).build(),
                |f| opcode::Write::new(f, buf, len).offset(off).build(),
            ),
            TargetOp::Read { off, buf, len } => self.fd_entry(
                |f| opcode::Read::new(f, buf, len).offset(off).build(),
                |f| opcode::Read::new(f, buf, len).offset(off).build(),
            ),
            TargetOp::Flush => self.fd_entry(
                |f| opcode::Fsync::new(f).flags(types::FsyncFlags::DATASYNC).build(),
                |f| opcode::Fsync::new(f).flags(types::FsyncFlags::DATASYNC).build(),
            ),
            TargetOp::Zero { off, len } => {
                if self.no_punch {
                    return self.start_zero_writes(ring, token, off, len);
                }
                // On a file: deallocate (the target stays sparse). On a block device the
                // kernel turns punch-hole into a zero-out that may unmap.
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                let e = self.fd_entry(
                    |f| opcode::Fallocate::new(f, len).offset(off).mode(mode).build(),
                    |f| opcode::Fallocate::new(f, len).offset(off).mode(mode).build(),
                );
                let idx = self.zero_jobs.insert(ZeroJob { token, pos: off, end: off + len });
                // SAFETY: a fallocate refers to no memory.
                return unsafe { push(ring, e, Owner::Target, SUB_PUNCH | idx as u64) };
            }
        };
        // SAFETY: a write's or read's buffer is the caller's, valid until the completion
        // (this function's contract); a flush refers to no memory.
        unsafe { push(ring, e, Owner::Target, token) }
    }

    fn complete(&mut self, ring: &mut Ring, sub: u64, res: i32, done: &mut Vec<TargetDone>) {
        let kind = sub >> 40;
        let idx = (sub & ((1 << 40) - 1)) as usize;
        match kind {
            0 => done.push((sub, result(res))),
            // A punch-hole: refused (no fallocate support here) -> fall back to writing zeroes.
            2 => {
                if res == -libc::EOPNOTSUPP || res == -libc::EINVAL {
                    if !self.no_punch {
                        log::info!("target {}: punching holes is not supported; writing zeroes instead", self.describe());
                    }
                    self.no_punch = true;
                    if let Err(e) = self.submit_zero_write(ring, idx) {
                        self.finish_zero(idx, Err(e), done);
                    }
                } else {
                    self.finish_zero(idx, result(res).map(|_| 0), done);
                }
            }
            1 => {
                let r = result(res);
                let advance = match (&r, self.zero_jobs.get_mut(idx)) {
                    (Ok(n), Some(job)) if *n > 0 => {
                        job.pos += *n as u64;
                        job.pos < job.end
                    }
                    _ => false,
                };
                if advance {
                    if let Err(e) = self.submit_zero_write(ring, idx) {
                        self.finish_zero(idx, Err(e), done);
                    }
                } else {
                    let r = match r {
                        Ok(0) => Err(io::Error::new(io::ErrorKind::WriteZero, "target write returned 0")),
                        r => r.map(|_| 0),
                    };
                    self.finish_zero(idx, r, done);
                }
            }
            _ => debug_assert!(false, "unknown target completion kind {kind}"),
        }
    }
    /// The zeroing jobs of an earlier ring's loop will not complete here (the zero buffer
    /// they write is static).
    fn ring_changed(&mut self) -> bool {
        self.zero_jobs.clear();
        false
    }
}

impl FileTarget {
    fn start_zero_writes(&mut self, ring: &mut Ring, token: u64, off: u64, len: u64) -> io::Result<()> {
        let idx = self.zero_jobs.insert(ZeroJob { token, pos: off, end: off + len });
        self.submit_zero_write(ring, idx)
    }
    fn finish_zero(&mut self, idx: usize, r: io::Result<u32>, done: &mut Vec<TargetDone>) {
        if let Some(job) = self.zero_jobs.try_remove(idx) {
            done.push((job.token, r));
        }
    }
}

fn result(res: i32) -> io::Result<u32> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(res as u32)
    }
}

/// A target the mirror thread owns.
pub type BoxTarget = Box<dyn Target + Send>;

/// Opens a target path: a file or block device.
pub fn open_file_target(path: &std::path::Path, direct: crate::io::backing::DirectMode) -> crate::Result<FileTarget> {
    let b = Backing::open(path, "target", true, direct)?;
    if b.kind == Kind::BlockDevice {
        log::debug!("target {} is a block device ({} bytes)", path.display(), b.size);
    }
    Ok(FileTarget::new(b))
}
