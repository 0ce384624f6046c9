//! Small helpers over io_uring shared by the mirror loop, the engine's queues and the tools.

use io_uring::{squeue, IoUring};
use std::io;

pub type Ring = IoUring<squeue::Entry, io_uring::cqueue::Entry>;

/// Who a completion belongs to: the top 4 bits of `user_data`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Owner {
    Source = 1,
    Target = 2,
    Bitmap = 3,
    Wake = 4,
    Front = 5,
    /// A timer of the front end's queue (deferred writes ask again when it fires).
    Nap = 6,
    /// A shipped write a front end's queue issued to the target itself (async mode).
    Ship = 7,
}

const SHIFT: u32 = 60;
const SUB_MASK: u64 = (1 << SHIFT) - 1;

pub fn encode(owner: Owner, sub: u64) -> u64 {
    debug_assert!(sub <= SUB_MASK);
    ((owner as u64) << SHIFT) | sub
}

impl Owner {
    pub fn from_code(code: u64) -> Option<Owner> {
        Some(match code {
            1 => Owner::Source,
            2 => Owner::Target,
            3 => Owner::Bitmap,
            4 => Owner::Wake,
            5 => Owner::Front,
            6 => Owner::Nap,
            7 => Owner::Ship,
            _ => return None,
        })
    }
}

pub fn decode(user_data: u64) -> (Option<Owner>, u64) {
    (Owner::from_code(user_data >> SHIFT), user_data & SUB_MASK)
}

/// Queues `entry`, submitting first if the submission queue is full.
///
/// # Safety
///
/// Every buffer and descriptor `entry` refers to must stay valid and unmoved, and a buffer the
/// kernel writes into must not be used otherwise, until the entry's completion has been reaped
/// from `ring`. Closing the ring does not end that duty (it does not wait for the operations
/// in flight): a buffer whose operation may still be running when the ring goes is leaked.
pub unsafe fn push(ring: &mut Ring, entry: squeue::Entry, owner: Owner, sub: u64) -> io::Result<()> {
    let entry = entry.user_data(encode(owner, sub));
    loop {
        // SAFETY: the caller keeps what the entry refers to valid until its completion (this
        // function's contract).
        let pushed = unsafe { ring.submission().push(&entry) };
        if pushed.is_ok() {
            return Ok(());
        }
        ring.submit()?;
    }
}

/// Submits and waits for at least `want` completions, retrying on EINTR.
pub fn submit_and_wait(ring: &mut Ring, want: usize) -> io::Result<()> {
    loop {
        match ring.submit_and_wait(want) {
            Ok(_) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                // Completion queue overflow pressure: the caller reaps and retries.
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
}

/// Takes all available completions as (user_data, result) pairs.
pub fn reap(ring: &mut Ring, out: &mut Vec<(u64, i32)>) {
    for cqe in ring.completion() {
        out.push((cqe.user_data(), cqe.result()));
    }
}

pub fn new_ring(entries: u32) -> io::Result<Ring> {
    IoUring::builder().build(entries)
}
