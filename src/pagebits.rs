//! A set of regions kept as pages of bits, each page empty, full or mixed.
//!
//! The mirror's state keeps about ten sets of regions (dirty, being copied, copied since the
//! last target flush, ...), each with one bit per region of the device. As flat bit vectors they
//! cost ten times the bitmap: 80 MiB for a 16 TiB device at 256 KiB regions, although most of
//! them are empty or cover whole stretches of the device (a full sync marks every region dirty,
//! then moves hole-sized runs from set to set). Like md's and DRBD's two-level bitmaps, a page
//! here that is all clear or all set holds no memory; only a page with both kinds of bits
//! allocates its 4 KiB of words. Memory then follows the scattered part of the state, and
//! whole-page operations (a copy of a hole run, clearing after a flush) cost a word per page.
//!
//! Invariants: `pages.len() == len.div_ceil(PAGE_BITS)`; a `Mixed` page has `ones` equal to
//! its number of set bits, with `0 < ones < page_len`, and no bit set at or past `len`; `ones`
//! of the set is the sum over its pages.

use bitvec::prelude::*;

/// Bits per page: 4 KiB of words.
pub const PAGE_BITS: usize = 1 << 15;
const WORDS: usize = PAGE_BITS / 64;

#[derive(Clone, Debug)]
enum Page {
    Empty,
    Full,
    Mixed { ones: usize, words: Box<[u64]> },
}

/// A set of `len` regions (bits), indexed from 0.
#[derive(Clone, Debug)]
pub struct PagedBits {
    len: usize,
    pages: Vec<Page>,
    ones: usize,
}

/// Bits `[a, b)` of a word (`a < b <= 64`).
fn mask(a: usize, b: usize) -> u64 {
    debug_assert!(a < b && b <= 64);
    (u64::MAX >> (64 - (b - a))) << a
}

impl PagedBits {
    /// A set of `len` regions, all clear. Costs one small entry per page.
    pub fn new(len: usize) -> Self {
        PagedBits { len, pages: vec![Page::Empty; len.div_ceil(PAGE_BITS)], ones: 0 }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of set bits, kept as bits change.
    pub fn count_ones(&self) -> usize {
        self.ones
    }

    pub fn any(&self) -> bool {
        self.ones > 0
    }

    /// Bytes of page memory held (the mixed pages).
    pub fn heap_bytes(&self) -> usize {
        self.pages.iter().filter(|p| matches!(p, Page::Mixed { .. })).count() * WORDS * 8
    }

    /// Bits in page `p` (the last page may be short).
    fn page_len(&self, p: usize) -> usize {
        (self.len - p * PAGE_BITS).min(PAGE_BITS)
    }

    pub fn get(&self, i: usize) -> bool {
        assert!(i < self.len, "bit {i} of a set of {}", self.len);
        match &self.pages[i / PAGE_BITS] {
            Page::Empty => false,
            Page::Full => true,
            Page::Mixed { words, .. } => {
                let o = i % PAGE_BITS;
                words[o / 64] >> (o % 64) & 1 == 1
            }
        }
    }

    pub fn set(&mut self, i: usize, v: bool) {
        if self.get(i) != v {
            self.fill(i, i + 1, v);
        }
    }

    /// The words of page `p`, allocated from its uniform state if needed.
    fn words_mut(&mut self, p: usize) -> (&mut usize, &mut [u64]) {
        let plen = self.page_len(p);
        let page = &mut self.pages[p];
        if !matches!(page, Page::Mixed { .. }) {
            let full = matches!(page, Page::Full);
            let mut words = vec![0u64; WORDS].into_boxed_slice();
            if full {
                for (w, word) in words.iter_mut().enumerate() {
                    let (a, b) = (w * 64, (w * 64 + 64).min(plen));
                    if a < b {
                        *word = mask(0, b - a);
                    }
                }
            }
            *page = Page::Mixed { ones: if full { plen } else { 0 }, words };
        }
        match page {
            Page::Mixed { ones, words } => (ones, words),
            // The page was made mixed just above.
            _ => unreachable!(),
        }
    }

    /// Makes page `p` uniform again if its mixed words became all clear or all set.
    fn settle(&mut self, p: usize) {
        let plen = self.page_len(p);
        let page = &mut self.pages[p];
        if let Page::Mixed { ones, .. } = page {
            if *ones == 0 {
                *page = Page::Empty;
            } else if *ones == plen {
                *page = Page::Full;
            }
        }
    }

    /// Sets (`v`) or clears bits `[s, e)`. A page covered whole becomes uniform at the cost of
    /// one entry; a page covered in part changes only the words it covers.
    pub fn fill(&mut self, s: usize, e: usize, v: bool) {
        assert!(s <= e && e <= self.len, "range {s}..{e} of a set of {}", self.len);
        let mut at = s;
        while at < e {
            let p = at / PAGE_BITS;
            let base = p * PAGE_BITS;
            let plen = self.page_len(p);
            let (a, b) = (at - base, (e - base).min(plen));
            at = base + b;
            let before = self.page_ones(p);
            if a == 0 && b == plen {
                self.pages[p] = if v { Page::Full } else { Page::Empty };
                self.ones = self.ones - before + if v { plen } else { 0 };
                continue;
            }
            match (&self.pages[p], v) {
                (Page::Full, true) | (Page::Empty, false) => continue,
                _ => {}
            }
            let (ones, words) = self.words_mut(p);
            let mut delta: isize = 0;
            let mut i = a;
            while i < b {
                let w = i / 64;
                let hi = (b - w * 64).min(64);
                let m = mask(i % 64, hi);
                let old = words[w];
                let new = if v { old | m } else { old & !m };
                delta += new.count_ones() as isize - old.count_ones() as isize;
                words[w] = new;
                i = w * 64 + hi;
            }
            *ones = (*ones as isize + delta) as usize;
            self.ones = (self.ones as isize + delta) as usize;
            self.settle(p);
        }
    }

    fn page_ones(&self, p: usize) -> usize {
        match &self.pages[p] {
            Page::Empty => 0,
            Page::Full => self.page_len(p),
            Page::Mixed { ones, .. } => *ones,
        }
    }

    /// Number of set bits in `[s, e)`.
    pub fn count_in(&self, s: usize, e: usize) -> usize {
        assert!(s <= e && e <= self.len, "range {s}..{e} of a set of {}", self.len);
        let mut n = 0;
        let mut at = s;
        while at < e {
            let p = at / PAGE_BITS;
            let base = p * PAGE_BITS;
            let plen = self.page_len(p);
            let (a, b) = (at - base, (e - base).min(plen));
            at = base + b;
            n += match &self.pages[p] {
                Page::Empty => 0,
                Page::Full => b - a,
                Page::Mixed { ones, .. } if a == 0 && b == plen => *ones,
                Page::Mixed { words, .. } => {
                    let mut c = 0;
                    let mut i = a;
                    while i < b {
                        let w = i / 64;
                        let hi = (b - w * 64).min(64);
                        c += (words[w] & mask(i % 64, hi)).count_ones() as usize;
                        i = w * 64 + hi;
                    }
                    c
                }
            };
        }
        n
    }

    /// Is any bit of `[s, e)` set?
    pub fn any_in(&self, s: usize, e: usize) -> bool {
        self.first_one(s, e).is_some()
    }

    /// Is every bit of `[s, e)` set?
    pub fn all_in(&self, s: usize, e: usize) -> bool {
        self.first_zero(s, e).is_none()
    }

    /// The first set bit in `[s, e)`.
    pub fn first_one(&self, s: usize, e: usize) -> Option<usize> {
        self.first(s, e, true)
    }

    /// The first clear bit in `[s, e)`.
    pub fn first_zero(&self, s: usize, e: usize) -> Option<usize> {
        self.first(s, e, false)
    }

    /// The first bit equal to `v` in `[s, e)`: a page at a time over uniform pages, a word at a
    /// time within mixed ones.
    fn first(&self, s: usize, e: usize, v: bool) -> Option<usize> {
        assert!(s <= e && e <= self.len, "range {s}..{e} of a set of {}", self.len);
        let mut at = s;
        while at < e {
            let p = at / PAGE_BITS;
            let base = p * PAGE_BITS;
            let plen = self.page_len(p);
            let (a, b) = (at - base, (e - base).min(plen));
            at = base + b;
            match (&self.pages[p], v) {
                (Page::Empty, false) | (Page::Full, true) => return Some(base + a),
                (Page::Empty, true) | (Page::Full, false) => {}
                (Page::Mixed { words, .. }, _) => {
                    let mut i = a;
                    while i < b {
                        let w = i / 64;
                        let hi = (b - w * 64).min(64);
                        let word = if v { words[w] } else { !words[w] };
                        let hit = word & mask(i % 64, hi);
                        if hit != 0 {
                            return Some(base + w * 64 + hit.trailing_zeros() as usize);
                        }
                        i = w * 64 + hi;
                    }
                }
            }
        }
        None
    }

    /// The set bits of `[s, e)`, in order.
    pub fn ones_in(&self, s: usize, e: usize) -> impl Iterator<Item = usize> + '_ {
        let mut at = s;
        std::iter::from_fn(move || {
            let i = self.first_one(at, e)?;
            at = i + 1;
            Some(i)
        })
    }

    /// The runs of set bits, as `(start, end)` pairs; a run longer than `most` comes in pieces
    /// of `most`.
    pub fn runs(&self, most: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        let mut at = 0;
        std::iter::from_fn(move || {
            let s = self.first_one(at, self.len)?;
            let lim = s.saturating_add(most.max(1)).min(self.len);
            let e = self.first_zero(s, lim).unwrap_or(lim);
            at = e;
            Some((s, e))
        })
    }

    /// Sets every bit of `other` here (same length).
    pub fn or_assign(&mut self, other: &PagedBits) {
        assert_eq!(self.len, other.len, "union of sets of different lengths");
        for p in 0..other.pages.len() {
            match &other.pages[p] {
                Page::Empty => {}
                Page::Full => {
                    let base = p * PAGE_BITS;
                    self.fill(base, base + self.page_len(p), true);
                }
                Page::Mixed { words, .. } => self.or_page_words(p, words),
            }
        }
    }

    /// ORs whole words into page `p` (bits past the set's end are clear in `src`).
    fn or_page_words(&mut self, p: usize, src: &[u64]) {
        match self.pages[p] {
            Page::Full => return,
            _ if src.iter().all(|&w| w == 0) => return,
            _ => {}
        }
        let (ones, words) = self.words_mut(p);
        let mut delta = 0;
        for (d, s) in words.iter_mut().zip(src) {
            let new = *d | s;
            delta += (new.count_ones() - d.count_ones()) as usize;
            *d = new;
        }
        *ones += delta;
        self.ones += delta;
        self.settle(p);
    }

    /// Sets the bits of `b` here, bit `i` of `b` at `at + i`. `at` is a multiple of 64 (the
    /// callers load persistent bits in aligned pieces), which lets it go a word at a time.
    pub fn or_bits_at(&mut self, at: usize, b: &BitSlice<u64, Lsb0>) {
        assert!(at % 64 == 0, "or_bits_at at {at}, not a word boundary");
        assert!(at + b.len() <= self.len, "{} bits at {at} past a set of {}", b.len(), self.len);
        let mut k = 0;
        while k < b.len() {
            let i = at + k;
            let (p, o) = (i / PAGE_BITS, i % PAGE_BITS);
            let n = (self.page_len(p) - o).min(b.len() - k);
            let part = &b[k..k + n];
            k += n;
            if part.not_any() || matches!(self.pages[p], Page::Full) {
                continue;
            }
            if n == self.page_len(p) && part.all() {
                self.fill(i, i + n, true);
                continue;
            }
            let (ones, words) = self.words_mut(p);
            let mut delta = 0;
            for (w, chunk) in part.chunks(64).enumerate() {
                let old = words[o / 64 + w];
                let new = old | chunk.load_le::<u64>();
                delta += (new.count_ones() - old.count_ones()) as usize;
                words[o / 64 + w] = new;
            }
            *ones += delta;
            self.ones += delta;
            self.settle(p);
        }
    }

    /// Clears every bit.
    pub fn clear_all(&mut self) {
        self.pages.iter_mut().for_each(|p| *p = Page::Empty);
        self.ones = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Fill(usize, usize, bool),
        Set(usize, bool),
        Or(Vec<(usize, usize)>),
        OrBits(usize, Vec<bool>),
        Clear,
    }

    fn op(len: usize) -> impl Strategy<Value = Op> {
        let range = (0..=len, 0..=len).prop_map(|(a, b)| (a.min(b), a.max(b)));
        prop_oneof![
            4 => (range.clone(), any::<bool>()).prop_map(|((a, b), v)| Op::Fill(a, b, v)),
            3 => (0..len, any::<bool>()).prop_map(|(i, v)| Op::Set(i, v)),
            2 => proptest::collection::vec(range, 0..4).prop_map(Op::Or),
            2 => (0..=len / 64, proptest::collection::vec(any::<bool>(), 0..200)).prop_map(|(w, v)| Op::OrBits(w * 64, v)),
            1 => Just(Op::Clear),
        ]
    }

    /// The set equals `r` (bits, count and runs) and its pages keep their invariants.
    fn check(p: &PagedBits, r: &BitVec<u64, Lsb0>) {
        assert_eq!(p.count_ones(), r.count_ones());
        let runs: Vec<_> = p.runs(usize::MAX).collect();
        let mut want = Vec::new();
        for i in r.iter_ones() {
            match want.last_mut() {
                Some((_, e)) if *e == i => *e += 1,
                _ => want.push((i, i + 1)),
            }
        }
        assert_eq!(runs, want);
        for pg in 0..p.pages.len() {
            if let Page::Mixed { ones, words } = &p.pages[pg] {
                assert!(*ones > 0 && *ones < p.page_len(pg), "page {pg} should be uniform");
                assert_eq!(*ones, words.iter().map(|w| w.count_ones() as usize).sum::<usize>());
            }
        }
    }

    fn case() -> impl Strategy<Value = (usize, Vec<Op>, Vec<(usize, usize)>)> {
        // Lengths around page and word boundaries: one bit, a short last word, one page, a
        // short last page, and any length up to three pages.
        prop_oneof![Just(1usize), Just(63), Just(PAGE_BITS), Just(2 * PAGE_BITS + 65), 1..3 * PAGE_BITS]
            .prop_flat_map(|len| {
                let q = (0..=len, 0..=len).prop_map(|(a, b)| (a.min(b), a.max(b)));
                (Just(len), proptest::collection::vec(op(len), 1..40), proptest::collection::vec(q, 8))
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]
        #[test]
        fn paged_bits_match_a_flat_bit_vector((len, ops, q) in case()) {
            let mut p = PagedBits::new(len);
            let mut r: BitVec<u64, Lsb0> = BitVec::repeat(false, len);
            for o in ops {
                match o {
                    Op::Fill(a, b, v) => { p.fill(a, b, v); r[a..b].fill(v); }
                    Op::Set(i, v) => { p.set(i, v); r.set(i, v); }
                    Op::Or(ranges) => {
                        let mut o = PagedBits::new(len);
                        let mut ro: BitVec<u64, Lsb0> = BitVec::repeat(false, len);
                        for (a, b) in ranges { o.fill(a, b, true); ro[a..b].fill(true); }
                        p.or_assign(&o);
                        r |= ro;
                    }
                    Op::OrBits(at, v) => {
                        if at <= len {
                            let n = v.len().min(len - at);
                            let b: BitVec<u64, Lsb0> = v[..n].iter().collect();
                            p.or_bits_at(at, &b);
                            r[at..at + n] |= b;
                        }
                    }
                    Op::Clear => { p.clear_all(); r.fill(false); }
                }
                check(&p, &r);
            }
            for i in 0..len {
                prop_assert_eq!(p.get(i), r[i], "bit {}", i);
            }
            for (s, e) in q {
                prop_assert_eq!(p.count_in(s, e), r[s..e].count_ones());
                prop_assert_eq!(p.first_one(s, e), r[s..e].first_one().map(|i| s + i));
                prop_assert_eq!(p.first_zero(s, e), r[s..e].first_zero().map(|i| s + i));
                prop_assert_eq!(p.ones_in(s, e).collect::<Vec<_>>(), r[s..e].iter_ones().map(|i| s + i).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn whole_pages_hold_no_memory() {
        let mut p = PagedBits::new(64 * PAGE_BITS + 5);
        p.fill(0, p.len(), true);
        assert_eq!(p.heap_bytes(), 0);
        assert_eq!(p.count_ones(), p.len());
        p.fill(PAGE_BITS + 3, 3 * PAGE_BITS, false);
        assert_eq!(p.heap_bytes(), WORDS * 8, "only the partly cleared page holds words");
        p.set(PAGE_BITS + 1, false);
        p.fill(PAGE_BITS, PAGE_BITS + 3, false);
        assert_eq!(p.heap_bytes(), 0, "a page cleared bit by bit becomes empty again");
        let mut b: BitVec<u64, Lsb0> = BitVec::repeat(true, 2 * PAGE_BITS);
        b.set(5, false);
        let mut q = PagedBits::new(4 * PAGE_BITS);
        q.or_bits_at(PAGE_BITS, &b);
        assert_eq!(q.heap_bytes(), WORDS * 8, "the page with a hole is mixed, the next one full");
        assert_eq!(q.count_ones(), 2 * PAGE_BITS - 1);
    }
}
