//! Buffers for async mode's shipped writes, kept for reuse: every shipped write needs a copy of
//! its bytes until it lands on the target, and a fresh aligned allocation per write (a mapping
//! and its page faults for large ones) costs more than the copy itself.

use crate::io::backing::AlignedBuf;
use std::sync::Mutex;

/// Size classes: powers of two from 4 KiB to 4 MiB (larger writes get their own buffer).
const MIN_SHIFT: u32 = 12;
const CLASSES: usize = 11;

/// Free buffers by size class, holding at most `limit` bytes in all.
#[derive(Default)]
pub struct ShipPool {
    free: Mutex<Pooled>,
}

#[derive(Default)]
struct Pooled {
    classes: [Vec<AlignedBuf>; CLASSES],
    bytes: u64,
}

fn class(len: usize) -> Option<usize> {
    let c = len.max(1 << MIN_SHIFT).next_power_of_two().trailing_zeros().saturating_sub(MIN_SHIFT) as usize;
    (c < CLASSES).then_some(c)
}

impl ShipPool {
    /// A buffer of at least `len` bytes (its contents are whatever a previous write left).
    pub fn take(&self, len: usize) -> AlignedBuf {
        let Some(c) = class(len) else { return AlignedBuf::new(len) };
        let mut p = crate::engine::lock_recovering(&self.free);
        match p.classes[c].pop() {
            Some(b) => {
                p.bytes -= b.len() as u64;
                b
            }
            None => {
                drop(p);
                AlignedBuf::new(1 << (c as u32 + MIN_SHIFT))
            }
        }
    }

    /// Keeps `b` for reuse if the pool holds less than `limit` bytes; frees it otherwise.
    pub fn give(&self, b: AlignedBuf, limit: u64) {
        let Some(c) = class(b.len()).filter(|&c| b.len() == 1 << (c as u32 + MIN_SHIFT)) else { return };
        let mut p = crate::engine::lock_recovering(&self.free);
        if p.bytes + b.len() as u64 <= limit {
            p.bytes += b.len() as u64;
            p.classes[c].push(b);
        }
    }

    /// Bytes held for reuse.
    pub fn bytes(&self) -> u64 {
        crate::engine::lock_recovering(&self.free).bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_by_class_up_to_the_limit() {
        let p = ShipPool::default();
        let a = p.take(4096);
        assert_eq!(a.len(), 4096);
        let b = p.take(5000);
        assert_eq!(b.len(), 8192);
        let addr = b.as_ptr();
        p.give(b, 1 << 20);
        assert_eq!(p.bytes(), 8192);
        let c = p.take(6000);
        assert_eq!(c.as_ptr(), addr, "the pooled buffer is reused");
        assert_eq!(p.bytes(), 0);
        p.give(a, 4095);
        assert_eq!(p.bytes(), 0, "over the limit: freed, not kept");
        let big = p.take(8 << 20);
        assert_eq!(big.len(), 8 << 20);
        p.give(big, u64::MAX);
        assert_eq!(p.bytes(), 0, "larger than the largest class: not kept");
    }
}
