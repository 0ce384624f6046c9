//! A set of regions kept as pages of bits, each page empty, full, sparse or mixed.
//!
//! The mirror's state keeps about ten sets of regions (dirty, being copied, copied since the
//! last target flush, ...), each with one bit per region of the device. As flat bit vectors they
//! cost ten times the bitmap: 80 MiB for a 16 TiB device at 256 KiB regions, although most of
//! them are empty or cover whole stretches of the device (a full sync marks every region dirty,
//! then moves hole-sized runs from set to set). Like md's and DRBD's two-level bitmaps, a page
//! here that is all clear or all set holds no memory. Like Roaring bitmaps' array containers, a
//! page with few set bits keeps only their offsets (2 bytes each), so that scattered writes over
//! a big device (60k random writes over 32 Mi regions: about 60 bits in each of 1024 pages) cost
//! memory per set bit rather than 4 KiB per page. Only a page with many set and clear bits
//! allocates its 4 KiB of words. Memory then follows the scattered part of the state, and
//! whole-page operations (a copy of a hole run, clearing after a flush) cost a word per page.
//!
//! Invariants: `pages.len() == len.div_ceil(PAGE_BITS)`; no bit is set at or past `len`; `ones`
//! of the set is the sum over its pages; for a page of `page_len` bits:
//! - `Sparse(list)`: `list` holds the offsets of its set bits, sorted, no duplicates, with
//!   `0 < list.len() <= SPARSE_MAX`, `list.len() < page_len` and
//!   `list.capacity() <= SPARSE_MAX` (never more bytes than the words);
//! - `Mixed { ones, words }`: `ones` is its number of set bits, `SPARSE_MIN < ones < page_len`.
//!
//! A page with between `SPARSE_MIN` and `SPARSE_MAX` set bits may be either (hysteresis: a page
//! near a threshold does not change form on every set and clear). Each operation restores the
//! invariants of the pages it touched with `settle`.

use bitvec::prelude::*;

/// Bits per page: 4 KiB of words.
pub const PAGE_BITS: usize = 1 << 15;
const WORDS: usize = PAGE_BITS / 64;
/// Most set bits a sparse page lists: at 2 bytes an offset, a full list is no bigger than the
/// words (2048 x 2 B = 4 KiB). A page going past it becomes words. Measured (the `timings`
/// test): random sets into lists of about 1000 take about 85 ns against 20 ns in words, well
/// below a write's cost; a limit of 1024 was no faster, 512 a little (67 ns), and both give up
/// memory on pages of a few hundred to 2048 set bits.
const SPARSE_MAX: usize = 2048;
/// A page of words whose set bits drop to this many becomes sparse again.
const SPARSE_MIN: usize = SPARSE_MAX / 2;
// Offsets in a page fit in a u16; the limits leave a band between them; a full list is no
// bigger than the words.
const _: () = assert!(PAGE_BITS <= 1 << 16 && SPARSE_MIN < SPARSE_MAX && SPARSE_MAX * 2 <= WORDS * 8);

#[derive(Clone, Debug)]
enum Page {
    Empty,
    Full,
    /// The offsets of the set bits: sorted, no duplicates, `0 < len <= SPARSE_MAX`.
    Sparse(Vec<u16>),
    /// The bits as words, `ones` of them set: `SPARSE_MIN < ones < page_len`.
    Mixed { ones: usize, words: Box<[u64]> },
}

/// A set of `len` regions (bits), indexed from 0.
#[derive(Clone, Debug)]
pub struct PagedBits {
    len: usize,
    pages: Vec<Page>,
    ones: usize,
}

/// A page that bits `[s, e)` of a set touch: its number `p`, its first bit `base`, its length
/// `plen` (the last page may be short), and the offsets `[a, b)` of those bits within it.
#[derive(Clone, Copy)]
struct PageSpan {
    p: usize,
    base: usize,
    a: usize,
    b: usize,
    plen: usize,
}

/// The pages bits `[s, e)` of a set of `len` bits touch, in order.
fn page_spans(len: usize, s: usize, e: usize) -> impl Iterator<Item = PageSpan> {
    // Callers pass ranges within the set: request extents are bounded by the device's size
    // (QueueRequests::start), everything else comes from the state's own nregions. A bad one
    // is a bug, stopped here rather than turned into wrong bits.
    assert!(s <= e && e <= len, "range {s}..{e} of a set of {len}");
    let mut at = s;
    std::iter::from_fn(move || {
        (at < e).then(|| {
            let p = at / PAGE_BITS;
            let base = p * PAGE_BITS;
            let plen = (len - base).min(PAGE_BITS);
            let span = PageSpan { p, base, a: at - base, b: (e - base).min(plen), plen };
            at = base + span.b;
            span
        })
    })
}

/// The words bits `[a, b)` of a page touch, in order: each word's index and the mask of those
/// bits in it.
fn word_spans(a: usize, b: usize) -> impl Iterator<Item = (usize, u64)> {
    let mut i = a;
    std::iter::from_fn(move || {
        (i < b).then(|| {
            let w = i / 64;
            let hi = (b - w * 64).min(64);
            let m = mask(i % 64, hi);
            i = w * 64 + hi;
            (w, m)
        })
    })
}

/// Bits `[a, b)` of a word (`a < b <= 64`).
fn mask(a: usize, b: usize) -> u64 {
    debug_assert!(a < b && b <= 64);
    (u64::MAX >> (64 - (b - a))) << a
}

/// Where offset `a` is or would go in a sorted list: the number of its entries below `a`.
fn rank(list: &[u16], a: usize) -> usize {
    list.partition_point(|&o| (o as usize) < a)
}

/// The words of a page whose set bits are at the offsets of `list`.
fn words_of(list: &[u16]) -> Box<[u64]> {
    let mut words = vec![0u64; WORDS].into_boxed_slice();
    for &o in list {
        words[o as usize / 64] |= 1 << (o % 64);
    }
    words
}

/// The offsets of the `ones` set bits of `words`, in order (a list of exactly that capacity).
fn list_of(words: &[u64], ones: usize) -> Vec<u16> {
    let mut list = Vec::with_capacity(ones);
    for (w, &word) in words.iter().enumerate() {
        let mut x = word;
        while x != 0 {
            list.push((w * 64 + x.trailing_zeros() as usize) as u16);
            x &= x - 1;
        }
    }
    debug_assert_eq!(list.len(), ones);
    list
}

/// The union of two sorted lists without duplicates. Its capacity is at most `SPARSE_MAX`
/// unless the union itself is longer (then the page becomes words).
fn union(x: &[u16], y: &[u16]) -> Vec<u16> {
    let mut out = Vec::with_capacity((x.len() + y.len()).min(SPARSE_MAX));
    let (mut i, mut j) = (0, 0);
    while i < x.len() && j < y.len() {
        let (a, b) = (x[i], y[j]);
        out.push(a.min(b));
        i += (a <= b) as usize;
        j += (b <= a) as usize;
    }
    out.extend_from_slice(&x[i..]);
    out.extend_from_slice(&y[j..]);
    out
}

/// Sets (`v`) or clears offsets `[a, b)` in a sparse page's list and returns the change in its
/// set bits; or `None`, the list untouched, if it would grow past `SPARSE_MAX`. The list's
/// capacity grows by a factor (2 to 1.25), never past `SPARSE_MAX`; it shrinks by half when
/// only a quarter of it is used.
fn fill_list(list: &mut Vec<u16>, a: usize, b: usize, v: bool) -> Option<isize> {
    let lo = rank(list, a);
    let hi = lo + rank(&list[lo..], b);
    let had = hi - lo;
    if !v {
        list.drain(lo..hi);
        if list.len() <= list.capacity() / 4 && list.capacity() > 8 {
            list.shrink_to(list.len() * 2);
        }
        return Some(-(had as isize));
    }
    let need = list.len() - had + (b - a);
    if need > SPARSE_MAX {
        return None;
    }
    if need > list.capacity() {
        // Growth as Roaring's array containers: less slack the longer the list.
        let c = list.capacity();
        let grown = match c {
            0..64 => 2 * c,
            64..1024 => c * 3 / 2,
            _ => c * 5 / 4,
        };
        let cap = need.max(grown).clamp(4, SPARSE_MAX);
        list.reserve_exact(cap - list.len());
    }
    if b - a == 1 && had == 0 {
        list.insert(lo, a as u16);
    } else {
        list.splice(lo..hi, (a..b).map(|o| o as u16));
    }
    Some((b - a - had) as isize)
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

    /// Bytes of page memory held: the words of mixed pages and the lists (their capacity) of
    /// sparse ones.
    pub fn heap_bytes(&self) -> usize {
        self.pages
            .iter()
            .map(|p| match p {
                Page::Empty | Page::Full => 0,
                Page::Sparse(list) => list.capacity() * std::mem::size_of::<u16>(),
                Page::Mixed { .. } => WORDS * 8,
            })
            .sum()
    }

    /// Bits in page `p` (the last page may be short).
    fn page_len(&self, p: usize) -> usize {
        (self.len - p * PAGE_BITS).min(PAGE_BITS)
    }

    pub fn get(&self, i: usize) -> bool {
        // Region numbers are within the set (see page_spans).
        assert!(i < self.len, "bit {i} of a set of {}", self.len);
        let o = i % PAGE_BITS;
        match &self.pages[i / PAGE_BITS] {
            Page::Empty => false,
            Page::Full => true,
            Page::Sparse(list) => list.binary_search(&(o as u16)).is_ok(),
            Page::Mixed { words, .. } => words[o / 64] >> (o % 64) & 1 == 1,
        }
    }

    pub fn set(&mut self, i: usize, v: bool) {
        if self.get(i) != v {
            self.fill(i, i + 1, v);
        }
    }

    /// The words of page `p`, made from its other form if needed. The page may break the
    /// invariants of `Mixed` until `settle`.
    fn words_mut(&mut self, p: usize) -> (&mut usize, &mut [u64]) {
        let plen = self.page_len(p);
        let page = &mut self.pages[p];
        let made = match page {
            Page::Mixed { .. } => None,
            Page::Empty => Some((0, vec![0u64; WORDS].into_boxed_slice())),
            Page::Sparse(list) => Some((list.len(), words_of(list))),
            Page::Full => {
                let mut words = vec![0u64; WORDS].into_boxed_slice();
                for (w, word) in words.iter_mut().enumerate() {
                    let (a, b) = (w * 64, (w * 64 + 64).min(plen));
                    if a < b {
                        *word = mask(0, b - a);
                    }
                }
                Some((plen, words))
            }
        };
        if let Some((ones, words)) = made {
            *page = Page::Mixed { ones, words };
        }
        match page {
            Page::Mixed { ones, words } => (ones, words),
            // The page was made mixed just above.
            _ => unreachable!(),
        }
    }

    /// Restores the invariants of page `p` after a change: no set bits make it empty, all set
    /// full; a list past `SPARSE_MAX` becomes words, words down to `SPARSE_MIN` a list.
    fn settle(&mut self, p: usize) {
        let plen = self.page_len(p);
        let page = &mut self.pages[p];
        let n = match page {
            Page::Empty | Page::Full => return,
            Page::Sparse(list) => list.len(),
            Page::Mixed { ones, .. } => *ones,
        };
        let new = match page {
            _ if n == 0 => Page::Empty,
            _ if n == plen => Page::Full,
            Page::Sparse(list) if n > SPARSE_MAX => Page::Mixed { ones: n, words: words_of(list) },
            Page::Mixed { words, .. } if n <= SPARSE_MIN => Page::Sparse(list_of(words, n)),
            _ => return,
        };
        *page = new;
    }

    /// Sets (`v`) or clears bits `[s, e)`. A page covered whole becomes uniform at the cost of
    /// one entry; a page covered in part changes only the words or list entries it covers.
    pub fn fill(&mut self, s: usize, e: usize, v: bool) {
        for PageSpan { p, a, b, plen, .. } in page_spans(self.len, s, e) {
            let before = self.page_ones(p);
            if a == 0 && b == plen {
                self.pages[p] = if v { Page::Full } else { Page::Empty };
                self.ones = self.ones - before + if v { plen } else { 0 };
                continue;
            }
            match (&self.pages[p], v) {
                (Page::Full, true) | (Page::Empty, false) => continue,
                // A few bits set in an empty page: a list of them.
                (Page::Empty, true) if b - a <= SPARSE_MAX => self.pages[p] = Page::Sparse(Vec::new()),
                _ => {}
            }
            let delta = match &mut self.pages[p] {
                Page::Sparse(list) => fill_list(list, a, b, v),
                _ => None,
            };
            // Not a list, or one that would grow too long: the words.
            let delta = delta.unwrap_or_else(|| self.fill_words(p, a, b, v));
            self.ones = (self.ones as isize + delta) as usize;
            self.settle(p);
        }
    }

    /// Sets (`v`) or clears bits `[a, b)` of page `p` in its words (made if needed); returns
    /// the change in its set bits. The caller settles the page.
    fn fill_words(&mut self, p: usize, a: usize, b: usize, v: bool) -> isize {
        let (ones, words) = self.words_mut(p);
        let mut delta: isize = 0;
        for (w, m) in word_spans(a, b) {
            let old = words[w];
            let new = if v { old | m } else { old & !m };
            delta += new.count_ones() as isize - old.count_ones() as isize;
            words[w] = new;
        }
        *ones = (*ones as isize + delta) as usize;
        delta
    }

    fn page_ones(&self, p: usize) -> usize {
        match &self.pages[p] {
            Page::Empty => 0,
            Page::Full => self.page_len(p),
            Page::Sparse(list) => list.len(),
            Page::Mixed { ones, .. } => *ones,
        }
    }

    /// Number of set bits in `[s, e)`.
    pub fn count_in(&self, s: usize, e: usize) -> usize {
        let mut n = 0;
        for PageSpan { p, a, b, plen, .. } in page_spans(self.len, s, e) {
            n += match &self.pages[p] {
                Page::Empty => 0,
                Page::Full => b - a,
                Page::Sparse(list) => rank(list, b) - rank(list, a),
                Page::Mixed { ones, .. } if a == 0 && b == plen => *ones,
                Page::Mixed { words, .. } => {
                    word_spans(a, b).map(|(w, m)| (words[w] & m).count_ones() as usize).sum()
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
    /// time within mixed ones, by binary search (a one) or along the list (a zero) in sparse
    /// ones.
    fn first(&self, s: usize, e: usize, v: bool) -> Option<usize> {
        for PageSpan { p, base, a, b, .. } in page_spans(self.len, s, e) {
            match (&self.pages[p], v) {
                (Page::Empty, false) | (Page::Full, true) => return Some(base + a),
                (Page::Empty, true) | (Page::Full, false) => {}
                (Page::Sparse(list), true) => {
                    match list.get(rank(list, a)) {
                        Some(&o) if (o as usize) < b => return Some(base + o as usize),
                        _ => {}
                    }
                }
                (Page::Sparse(list), false) => {
                    // The set bits from `a` on, in order: the first offset they skip is clear.
                    let mut z = a;
                    for &o in &list[rank(list, a)..] {
                        if o as usize != z {
                            break;
                        }
                        z += 1;
                    }
                    if z < b {
                        return Some(base + z);
                    }
                }
                (Page::Mixed { words, .. }, _) => {
                    for (w, m) in word_spans(a, b) {
                        let hit = if v { words[w] } else { !words[w] } & m;
                        if hit != 0 {
                            return Some(base + w * 64 + hit.trailing_zeros() as usize);
                        }
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
        // Every set of a MirrorState has its nregions bits.
        assert_eq!(self.len, other.len, "union of sets of different lengths");
        for p in 0..other.pages.len() {
            match &other.pages[p] {
                Page::Empty => {}
                Page::Full => {
                    let base = p * PAGE_BITS;
                    self.fill(base, base + self.page_len(p), true);
                }
                Page::Sparse(list) => self.or_offsets(p, list),
                Page::Mixed { words, .. } => self.or_page_words(p, words),
            }
        }
    }

    /// Sets the bits at offsets `add` (sorted, no duplicates) of page `p`.
    fn or_offsets(&mut self, p: usize, add: &[u16]) {
        let page = &mut self.pages[p];
        let delta = match page {
            Page::Full => return,
            Page::Empty => {
                *page = Page::Sparse(add.to_vec());
                add.len()
            }
            Page::Sparse(list) => {
                let n = list.len();
                *list = union(list, add);
                list.len() - n
            }
            Page::Mixed { ones, words } => {
                let mut delta = 0;
                for &o in add {
                    let (w, m) = (o as usize / 64, 1 << (o % 64));
                    delta += (words[w] & m == 0) as usize;
                    words[w] |= m;
                }
                *ones += delta;
                delta
            }
        };
        self.ones += delta;
        self.settle(p);
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
        // Callers load persistent bits [a, e) with e <= nregions into a set of nregions bits.
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
            // Few bits into an empty or sparse page: as a list.
            if matches!(self.pages[p], Page::Empty | Page::Sparse(_)) && part.count_ones() <= SPARSE_MAX {
                let add: Vec<u16> = part.iter_ones().map(|j| (o + j) as u16).collect();
                self.or_offsets(p, &add);
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
        /// Sets (`v`) or clears bits `start, start + step, ...` (`count` of them, below the
        /// end) one at a time.
        Scatter(Scatter, bool),
        /// ORs in a set with these ranges and scattered bits set.
        Or(Vec<(usize, usize)>, Option<Scatter>),
        OrBits(usize, Vec<bool>),
        Clear,
    }

    /// Bits `start, start + step, ...`, `count` of them (fewer past the end of the set).
    #[derive(Clone, Copy, Debug)]
    struct Scatter {
        start: usize,
        step: usize,
        count: usize,
    }

    impl Scatter {
        fn bits(self, len: usize) -> impl Iterator<Item = usize> {
            (0..self.count).map(move |k| self.start + k * self.step).take_while(move |&i| i < len)
        }
    }

    /// Scattered bits in numbers around the sparse limits: a few, about `SPARSE_MIN` or
    /// `SPARSE_MAX` (close together, so that they fall in one or two pages), or any up to
    /// 3000. Fills and clears of the same bits then cross the limits both ways.
    fn scatter(len: usize) -> impl Strategy<Value = Scatter> {
        let count = prop_oneof![
            1..40usize,
            SPARSE_MIN - 3..SPARSE_MIN + 3,
            SPARSE_MAX - 3..SPARSE_MAX + 3,
            0..3000usize,
        ];
        (0..len, prop_oneof![Just(1usize), 1..16usize], count)
            .prop_map(|(start, step, count)| Scatter { start, step, count })
    }

    fn op(len: usize) -> impl Strategy<Value = Op> {
        let range = (0..=len, 0..=len).prop_map(|(a, b)| (a.min(b), a.max(b)));
        // Short ranges (lists of runs in sparse pages) as well as any.
        let short = (0..=len, 0..70usize).prop_map(move |(a, n)| (a, (a + n).min(len)));
        // Bits to OR in: a short random piece, or up to two pages of every `step`th bit.
        let bits = prop_oneof![
            proptest::collection::vec(any::<bool>(), 0..200),
            (0..2 * PAGE_BITS, 1..40usize, 0..40usize).prop_map(|(n, step, k)| (0..n).map(|i| i % step == k % step).collect()),
        ];
        prop_oneof![
            4 => (prop_oneof![range.clone(), short], any::<bool>()).prop_map(|((a, b), v)| Op::Fill(a, b, v)),
            3 => (0..len, any::<bool>()).prop_map(|(i, v)| Op::Set(i, v)),
            4 => (scatter(len), any::<bool>()).prop_map(|(s, v)| Op::Scatter(s, v)),
            2 => (proptest::collection::vec(range, 0..4), proptest::option::of(scatter(len))).prop_map(|(r, s)| Op::Or(r, s)),
            2 => (0..=len / 64, bits).prop_map(|(w, v)| Op::OrBits(w * 64, v)),
            1 => Just(Op::Clear),
        ]
    }

    /// The form of a page, for counting the changes of form.
    fn form(p: &Page) -> usize {
        match p {
            Page::Empty => 0,
            Page::Full => 1,
            Page::Sparse(_) => 2,
            Page::Mixed { .. } => 3,
        }
    }
    const FORMS: [&str; 4] = ["empty", "full", "sparse", "mixed"];

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
        assert_eq!(p.pages.len(), p.len.div_ceil(PAGE_BITS));
        assert_eq!(p.ones, (0..p.pages.len()).map(|pg| p.page_ones(pg)).sum::<usize>());
        for pg in 0..p.pages.len() {
            let plen = p.page_len(pg);
            match &p.pages[pg] {
                Page::Empty | Page::Full => {}
                Page::Sparse(list) => {
                    assert!(!list.is_empty() && list.len() <= SPARSE_MAX, "page {pg}: {} listed", list.len());
                    assert!(list.len() < plen, "page {pg} should be full");
                    assert!(list.capacity() <= SPARSE_MAX, "page {pg}: list capacity {}", list.capacity());
                    assert!(list.windows(2).all(|w| w[0] < w[1]), "page {pg}: list not sorted or with duplicates");
                    assert!((*list.last().unwrap() as usize) < plen, "page {pg}: offset past its end");
                }
                Page::Mixed { ones, words } => {
                    assert!(*ones > SPARSE_MIN && *ones < plen, "page {pg}: {ones} ones as words");
                    assert_eq!(*ones, words.iter().map(|w| w.count_ones() as usize).sum::<usize>());
                    assert_eq!(p.count_in(pg * PAGE_BITS, pg * PAGE_BITS + plen), *ones, "bits past the end of page {pg}");
                }
            }
        }
    }

    fn case() -> impl Strategy<Value = (usize, Vec<Op>, Vec<(usize, usize)>)> {
        // Lengths around page and word boundaries: one bit, a short last word, one page, a
        // short last page (of 65 bits, and of about the sparse limits), and any length up to
        // three pages.
        prop_oneof![
            Just(1usize),
            Just(63),
            Just(PAGE_BITS),
            Just(2 * PAGE_BITS + 65),
            Just(PAGE_BITS + SPARSE_MIN + 1),
            Just(2 * PAGE_BITS + SPARSE_MAX),
            1..3 * PAGE_BITS
        ]
        .prop_flat_map(|len| {
            let q = (0..=len, 0..=len).prop_map(|(a, b)| (a.min(b), a.max(b)));
            let near = (0..len, 0..70usize).prop_map(move |(a, n)| (a, (a + n).min(len)));
            (Just(len), proptest::collection::vec(op(len), 1..40), proptest::collection::vec(prop_oneof![q, near], 12))
        })
    }

    /// Runs `ops` on a set of `len` bits and on a flat bit vector, checking them against each
    /// other after each op and with the queries `q` at the end. Counts the changes of form
    /// of pages (`[from][to]`) in `forms`.
    fn run(len: usize, ops: Vec<Op>, q: Vec<(usize, usize)>, forms: &mut [[usize; 4]; 4]) {
        let mut p = PagedBits::new(len);
        let mut r: BitVec<u64, Lsb0> = BitVec::repeat(false, len);
        for o in ops {
            let before: Vec<usize> = p.pages.iter().map(form).collect();
            match o {
                Op::Fill(a, b, v) => {
                    p.fill(a, b, v);
                    r[a..b].fill(v);
                }
                Op::Set(i, v) => {
                    p.set(i, v);
                    r.set(i, v);
                }
                Op::Scatter(sc, v) => {
                    for i in sc.bits(len) {
                        p.set(i, v);
                        r.set(i, v);
                    }
                }
                Op::Or(ranges, sc) => {
                    let mut o = PagedBits::new(len);
                    let mut ro: BitVec<u64, Lsb0> = BitVec::repeat(false, len);
                    for (a, b) in ranges {
                        o.fill(a, b, true);
                        ro[a..b].fill(true);
                    }
                    for i in sc.iter().flat_map(|sc| sc.bits(len)) {
                        o.set(i, true);
                        ro.set(i, true);
                    }
                    check(&o, &ro);
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
                Op::Clear => {
                    p.clear_all();
                    r.fill(false);
                }
            }
            check(&p, &r);
            for (pg, &b) in before.iter().enumerate() {
                forms[b][form(&p.pages[pg])] += 1;
            }
        }
        for i in 0..len {
            assert_eq!(p.get(i), r[i], "bit {i}");
        }
        for &(s, e) in &q {
            assert_eq!(p.count_in(s, e), r[s..e].count_ones(), "count_in({s}, {e})");
            assert_eq!(p.first_one(s, e), r[s..e].first_one().map(|i| s + i), "first_one({s}, {e})");
            assert_eq!(p.first_zero(s, e), r[s..e].first_zero().map(|i| s + i), "first_zero({s}, {e})");
            assert_eq!(p.any_in(s, e), r[s..e].any(), "any_in({s}, {e})");
            assert_eq!(p.all_in(s, e), r[s..e].all(), "all_in({s}, {e})");
            assert_eq!(p.ones_in(s, e).collect::<Vec<_>>(), r[s..e].iter_ones().map(|i| s + i).collect::<Vec<_>>());
        }
        let most = q.first().map_or(7, |&(s, e)| (e - s) % 100 + 1);
        let mut pieces = Vec::new();
        for (s, e) in p.runs(usize::MAX) {
            pieces.extend((s..e).step_by(most).map(|a| (a, (a + most).min(e))));
        }
        assert_eq!(p.runs(most).collect::<Vec<_>>(), pieces, "runs({most})");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]
        #[test]
        fn paged_bits_match_a_flat_bit_vector((len, ops, q) in case()) {
            run(len, ops, q, &mut [[0; 4]; 4]);
        }
    }

    /// The cases of the property test reach every change of form a page can make, the sparse
    /// ones among them (from and to a list, both ways across the limits). The same 96 cases
    /// (a fixed seed, not the property test's), counted.
    #[test]
    fn the_cases_change_every_form() {
        use proptest::strategy::ValueTree;
        use proptest::test_runner::TestRunner;
        let mut runner = TestRunner::deterministic();
        let mut forms = [[0; 4]; 4];
        for _ in 0..96 {
            let (len, ops, q) = case().new_tree(&mut runner).unwrap().current();
            run(len, ops, q, &mut forms);
        }
        for (f, row) in forms.iter().enumerate() {
            println!("from {:>6}: {:?}", FORMS[f], row);
        }
        for (f, t) in [(0, 2), (2, 0), (2, 3), (3, 2), (2, 1), (1, 2), (0, 3), (3, 0), (1, 3), (3, 1), (0, 1), (1, 0), (2, 2), (3, 3)] {
            assert!(forms[f][t] > 0, "no page went from {} to {}: {forms:?}", FORMS[f], FORMS[t]);
        }
    }

    /// A page changes form at `SPARSE_MAX` going up and at `SPARSE_MIN` going down, not back
    /// and forth around one limit.
    #[test]
    fn sparse_pages_change_form_with_hysteresis() {
        let mut p = PagedBits::new(3 * PAGE_BITS);
        let base = PAGE_BITS;
        let at = |k: usize| base + k * 11;
        let is_sparse = |p: &PagedBits| matches!(p.pages[1], Page::Sparse(_));
        for k in 0..SPARSE_MAX {
            p.set(at(k), true);
            assert!(is_sparse(&p), "{} bits", k + 1);
        }
        assert_eq!(p.heap_bytes(), SPARSE_MAX * 2, "a full list costs the words' 4 KiB, no more");
        p.set(at(SPARSE_MAX), true);
        assert!(matches!(p.pages[1], Page::Mixed { ones, .. } if ones == SPARSE_MAX + 1));
        assert_eq!(p.heap_bytes(), WORDS * 8);
        // Around SPARSE_MAX the page stays words.
        for _ in 0..3 {
            p.set(at(SPARSE_MAX), false);
            assert!(!is_sparse(&p));
            p.set(at(SPARSE_MAX), true);
            assert!(!is_sparse(&p));
        }
        for k in (SPARSE_MIN..=SPARSE_MAX).rev() {
            assert!(!is_sparse(&p), "{} bits", k + 1);
            p.set(at(k), false);
        }
        assert!(is_sparse(&p), "down to SPARSE_MIN bits, a list again");
        assert_eq!(p.count_ones(), SPARSE_MIN);
        // Around SPARSE_MIN it stays a list, of exactly the bits left.
        for _ in 0..3 {
            p.set(at(SPARSE_MIN), true);
            assert!(is_sparse(&p));
            p.set(at(SPARSE_MIN), false);
            assert!(is_sparse(&p));
        }
        assert_eq!(p.ones_in(0, p.len()).collect::<Vec<_>>(), (0..SPARSE_MIN).map(at).collect::<Vec<_>>());
        // The list grew once (by a quarter) for the bit set and cleared.
        assert_eq!(p.heap_bytes(), SPARSE_MIN * 2 * 5 / 4);
        // A dense fill makes words of a list, a big clear a list of words.
        p.fill(base + 100, base + 10_000, true);
        assert!(matches!(p.pages[1], Page::Mixed { .. }));
        p.fill(base + 50, base + 20_000, false);
        assert!(is_sparse(&p));
        assert_eq!(p.count_ones(), (0..SPARSE_MIN).map(at).filter(|&i| !(base + 50..base + 20_000).contains(&i)).count());
    }

    /// Scattered bits over a big set (the 2 TiB device at 64 KiB regions: 32 Mi regions, 1024
    /// pages, under random 4 KiB writes) cost memory per set bit, not the 4 KiB of a page.
    #[test]
    fn memory_follows_scattered_bits() {
        let len = 1 << 25;
        let pages = len / PAGE_BITS;
        let mut p = PagedBits::new(len);
        for pg in 0..pages {
            p.set(pg * PAGE_BITS + (pg * 7919) % PAGE_BITS, true);
        }
        assert_eq!(p.count_ones(), pages);
        // Words in every page would be 4 MiB; one bit per page must stay within 16 KiB.
        assert!(p.heap_bytes() <= 16 << 10, "one bit in each of {pages} pages: {} bytes", p.heap_bytes());
        println!("one bit per page: {} bytes", p.heap_bytes());
        // 64 bits per page (64 Ki bits, about the benchmark's 60k random writes): 2 bytes each
        // plus the lists' slack, within 160 KiB.
        for pg in 0..pages {
            for k in 1..64 {
                p.set(pg * PAGE_BITS + (pg * 7919 + k * 4099) % PAGE_BITS, true);
            }
        }
        assert_eq!(p.count_ones(), 64 * pages);
        assert!(p.heap_bytes() <= 160 << 10, "64 bits in each of {pages} pages: {} bytes", p.heap_bytes());
        println!("64 bits per page: {} bytes", p.heap_bytes());
        // Cleared again bit by bit, the pages hold nothing.
        let ones: Vec<usize> = p.ones_in(0, len).collect();
        for i in ones {
            p.set(i, false);
        }
        assert_eq!((p.count_ones(), p.heap_bytes()), (0, 0));
    }

    #[test]
    fn whole_pages_hold_no_memory() {
        let mut p = PagedBits::new(64 * PAGE_BITS + 5);
        p.fill(0, p.len(), true);
        assert_eq!(p.heap_bytes(), 0);
        assert_eq!(p.count_ones(), p.len());
        p.fill(PAGE_BITS + 3000, 3 * PAGE_BITS, false);
        assert_eq!(p.heap_bytes(), WORDS * 8, "only the partly cleared page holds words");
        p.fill(PAGE_BITS + 3, PAGE_BITS + 3000, false);
        assert_eq!(p.heap_bytes(), 3 * 2, "the page with 3 bits left lists them");
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
