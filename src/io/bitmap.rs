//! The persistent dirty bitmap: a small header and one bit per region, memory-mapped.
//!
//! Layout (little-endian), all offsets in bytes:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `UBLKMIRB` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | header size (4096): the bits start there |
//! | 16 | 16 | UUID (random, made at creation) |
//! | 32 | 8 | granularity in bytes (power of two, 4 KiB..64 MiB) |
//! | 40 | 8 | device size in bytes |
//! | 48 | 8 | number of regions |
//! | 56 | 4 | state: 0 clean (closed in order), 1 active (open, or its daemon died), 2 switched over (the device moved to the target: this pair must not be served again) |
//! | 60 | 4 | flags (none defined) |
//! | 64 | 8 | creation time, seconds since the epoch |
//! | 72 | 8 | source fingerprint (a regular file: its inode number, generation and birth time mixed, see `file_fingerprint`; 0 for a block device) |
//! | 80 | 8 | target fingerprint |
//! | 88 | 2 | source path length |
//! | 90 | 2 | target path length |
//! | 96 | 1024 | source path (absolute, as given) |
//! | 1120 | 1024 | target path |
//! | 2144 | 4 | CRC-32 of bytes 0..2144 |
//!
//! The header fits in the first 4 KiB block and its checked part in the first 2.2 KiB; it is
//! rewritten only on state changes. The bits are not checksummed: they change on every first
//! write to a region, and a torn bit is harmless (a set bit costs one region's copy, a clear bit
//! is only ever written after the target holds the region).
//!
//! Durability goes through the file descriptor (fdatasync), never msync: the engine issues the
//! fdatasync on io_uring, so the I/O path never blocks on it.

use crate::core::PersistentBits;
use crate::core::lifecycle::Fill;
use crate::error::{BitmapProblem, Error, Result};
use memmap2::{MmapMut, MmapOptions};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const MAGIC: &[u8; 8] = b"UBLKMIRB";
pub const VERSION: u32 = 1;
pub const HEADER_SIZE: u64 = 4096;
const CHECKED_LEN: usize = 2144;
const PATH_MAX: usize = 1024;
pub const MIN_GRANULARITY: u64 = 4096;
pub const MAX_GRANULARITY: u64 = 64 << 20;
pub const DEFAULT_GRANULARITY: u64 = 64 << 10;
/// The most regions a bitmap gets when no granularity is asked for: 64 Mi regions, 8 MiB of
/// bits, which is 4 TiB at the default 64 KiB. The daemon's state keeps several sets of the
/// bitmap's size, so its memory follows this bound.
pub const MAX_DEFAULT_REGIONS: u64 = 1 << 26;
/// The most regions any bitmap may have: 2^32, 512 MiB of bits. With the largest granularity
/// (64 MiB) that covers 256 PiB (2^58 bytes), the largest device ublk-mirror mirrors. The
/// daemon keeps several sets of the bitmap's size in memory and a full sync writes every bit,
/// so a bitmap beyond this (the 2^37 regions of an 8 EiB device, 16 GiB of bits) would fail
/// late, by running out of memory or address space, instead of being refused up front.
pub const MAX_REGIONS: u64 = 1 << 32;
/// The largest device size a header may record: the largest multiple of 512 that an off_t
/// (i64) addresses. [`MAX_REGIONS`] bounds real bitmaps lower (256 PiB); this bound comes first
/// because it keeps every byte offset of the header's regions within u64.
pub const MAX_DEVICE_SIZE: u64 = i64::MAX as u64 / 512 * 512;

/// The granularity of a new bitmap when none is asked for: 64 KiB, doubled (as mdadm does)
/// until the bitmap has at most [`MAX_DEFAULT_REGIONS`] regions, up to 64 MiB (then a device
/// beyond 4 PiB gets a larger bitmap, up to [`MAX_REGIONS`] regions at 256 PiB; a larger device
/// is refused when its bitmap is made).
pub fn default_granularity(device_size: u64) -> u64 {
    let mut g = DEFAULT_GRANULARITY;
    while regions_for(device_size, g) > MAX_DEFAULT_REGIONS && g < MAX_GRANULARITY {
        g *= 2;
    }
    g
}

/// Header state field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BitmapState {
    /// Closed in order by its last user.
    Clean,
    /// In use, or its user died without closing it (the bits are still trustworthy: they were
    /// made durable before every write they cover).
    Active,
    /// `switchover` moved the device onto the target: the source is stale from then on, and
    /// this pair may never be served or synced again with this bitmap.
    SwitchedOver,
}

/// Who a bitmap belongs to: the paths and fingerprints of its source and target.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PairIdentity {
    pub source: String,
    pub source_fingerprint: u64,
    pub target: String,
    pub target_fingerprint: u64,
}

/// The decoded header.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Header {
    pub version: u32,
    pub uuid: String,
    pub granularity: u64,
    pub device_size: u64,
    pub nregions: u64,
    pub state: BitmapState,
    pub created: u64,
    pub pair: PairIdentity,
}

pub fn check_granularity(g: u64) -> Result<()> {
    if !g.is_power_of_two() || !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&g) {
        return Err(Error::config(format!(
            "granularity {g} is not valid: it must be a power of two from 4 KiB to 64 MiB \
             (for example 64K, the default)"
        )));
    }
    Ok(())
}

pub fn regions_for(device_size: u64, granularity: u64) -> u64 {
    device_size.div_ceil(granularity)
}

/// A granularity as `--granularity` takes it: `64K`, `256K`, `64M`.
pub(crate) fn size_arg(g: u64) -> String {
    if g >= 1 << 20 && g % (1 << 20) == 0 {
        format!("{}M", g >> 20)
    } else if g % 1024 == 0 {
        format!("{}K", g >> 10)
    } else {
        g.to_string()
    }
}

/// Refuses a (valid) granularity that gives a device of `device_size` bytes more than
/// [`MAX_REGIONS`] regions, naming the smallest granularity that does not.
pub fn check_regions(device_size: u64, granularity: u64) -> Result<()> {
    let n = regions_for(device_size, granularity);
    if n <= MAX_REGIONS {
        return Ok(());
    }
    let fits = std::iter::successors(Some(MIN_GRANULARITY), |g| Some(g * 2))
        .take_while(|&g| g <= MAX_GRANULARITY)
        .find(|&g| regions_for(device_size, g) <= MAX_REGIONS);
    Err(Error::config(match fits {
        Some(g) => format!(
            "granularity {} gives {n} regions for this {device_size} byte device, more than the \
             {MAX_REGIONS} a bitmap may have: use --granularity {} or larger",
            crate::units::human(granularity),
            size_arg(g)
        ),
        None => format!(
            "the device is {device_size} bytes, larger than the 256 PiB a bitmap can cover \
             ({MAX_REGIONS} regions of 64 MiB): mirror it as several devices of at most 256 PiB"
        ),
    }))
}

fn file_len_for(nregions: u64) -> u64 {
    let bytes = nregions.div_ceil(8);
    HEADER_SIZE + bytes.div_ceil(4096) * 4096
}

fn bad(path: &Path, problem: BitmapProblem, what: String, fix: &str) -> Error {
    Error::Bitmap { path: path.to_path_buf(), problem, what, fix: fix.to_string() }
}

const FIX_REBUILD: &str = "this bitmap cannot be trusted, so ublk-mirror will not guess which \
regions are in sync: if you are sure this is the right file, pass --full to rebuild it and copy \
the whole device; otherwise give the path of this pair's bitmap";

fn encode_header(h: &Header) -> [u8; HEADER_SIZE as usize] {
    let st: u32 = match h.state {
        BitmapState::Clean => 0,
        BitmapState::Active => 1,
        BitmapState::SwitchedOver => 2,
    };
    encode_header_state(h, st)
}

/// [`encode_header`] with the state field's raw value `st` (also [`STATE_LOST`], which no
/// [`BitmapState`] has).
fn encode_header_state(h: &Header, st: u32) -> [u8; HEADER_SIZE as usize] {
    let mut b = [0u8; HEADER_SIZE as usize];
    b[0..8].copy_from_slice(MAGIC);
    b[8..12].copy_from_slice(&h.version.to_le_bytes());
    b[12..16].copy_from_slice(&(HEADER_SIZE as u32).to_le_bytes());
    let uuid = uuid::Uuid::parse_str(&h.uuid).unwrap_or_default();
    b[16..32].copy_from_slice(uuid.as_bytes());
    b[32..40].copy_from_slice(&h.granularity.to_le_bytes());
    b[40..48].copy_from_slice(&h.device_size.to_le_bytes());
    b[48..56].copy_from_slice(&h.nregions.to_le_bytes());
    b[56..60].copy_from_slice(&st.to_le_bytes());
    b[64..72].copy_from_slice(&h.created.to_le_bytes());
    b[72..80].copy_from_slice(&h.pair.source_fingerprint.to_le_bytes());
    b[80..88].copy_from_slice(&h.pair.target_fingerprint.to_le_bytes());
    // Both at most PATH_MAX bytes: decode_header refuses longer ones (and paths that are not
    // UTF-8, which a lossy decoding would lengthen), and a new bitmap refuses longer ones.
    let s = h.pair.source.as_bytes();
    let t = h.pair.target.as_bytes();
    b[88..90].copy_from_slice(&(s.len() as u16).to_le_bytes());
    b[90..92].copy_from_slice(&(t.len() as u16).to_le_bytes());
    b[96..96 + s.len()].copy_from_slice(s);
    b[1120..1120 + t.len()].copy_from_slice(t);
    let crc = crc32fast::hash(&b[..CHECKED_LEN]);
    b[CHECKED_LEN..CHECKED_LEN + 4].copy_from_slice(&crc.to_le_bytes());
    b
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[o..o + 4]);
    u32::from_le_bytes(a)
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}
fn u16_at(b: &[u8], o: usize) -> usize {
    u16::from_le_bytes([b[o], b[o + 1]]) as usize
}

fn check_header_len(path: &Path, len: u64) -> Result<()> {
    if len < HEADER_SIZE {
        return Err(bad(
            path,
            BitmapProblem::Truncated { len, need: HEADER_SIZE },
            format!("the file is {len} bytes, shorter than a bitmap header ({HEADER_SIZE})"),
            FIX_REBUILD,
        ));
    }
    Ok(())
}

/// Reads and checks the header of `file`, whose length is `len`.
/// The file holds the header and the bits of `nregions` regions.
fn check_bits_len(path: &Path, file_len: u64, nregions: u64) -> Result<()> {
    let need = file_len_for(nregions);
    if file_len < need {
        return Err(bad(
            path,
            BitmapProblem::Truncated { len: file_len, need },
            format!("the file is truncated: {file_len} bytes, its header needs {need}"),
            FIX_REBUILD,
        ));
    }
    Ok(())
}

fn header_of(path: &Path, file: &File, len: u64) -> Result<Header> {
    // Checked before reading: a short file would get a vaguer error.
    check_header_len(path, len)?;
    let mut b = vec![0u8; HEADER_SIZE as usize];
    file.read_exact_at(&mut b, 0).map_err(|e| Error::io("read bitmap header", e))?;
    decode_header(path, &b, len)
}

/// Decodes and checks a header; `file_len` is the file's actual length.
fn decode_header(path: &Path, b: &[u8], file_len: u64) -> Result<Header> {
    check_header_len(path, file_len.min(b.len() as u64))?;
    if &b[0..8] != MAGIC {
        return Err(bad(
            path,
            BitmapProblem::BadMagic,
            "this is not a ublk-mirror bitmap (wrong magic number)".into(),
            "check the --bitmap path; ublk-mirror never overwrites a file it did not make unless \
             you pass --full",
        ));
    }
    let version = u32_at(b, 8);
    if version != VERSION {
        return Err(bad(
            path,
            BitmapProblem::UnsupportedVersion(version),
            format!("format version {version}, this ublk-mirror reads version {VERSION}"),
            "use the ublk-mirror version that made it, or pass --full to rebuild it",
        ));
    }
    let crc = u32_at(b, CHECKED_LEN);
    if crc != crc32fast::hash(&b[..CHECKED_LEN]) {
        return Err(bad(
            path,
            BitmapProblem::Checksum,
            "the header checksum does not match: the header is damaged".into(),
            FIX_REBUILD,
        ));
    }
    if u32_at(b, 56) == STATE_LOST {
        return Err(bad(
            path,
            BitmapProblem::Lost,
            "the file shrank or became unreadable while a mirror used it (another process \
             truncated it, or its disk failed): its bits are incomplete"
                .into(),
            FIX_REBUILD,
        ));
    }
    let granularity = u64_at(b, 32);
    let device_size = u64_at(b, 40);
    let nregions = u64_at(b, 48);
    let (slen, tlen) = (u16_at(b, 88), u16_at(b, 90));
    // Every size a mirror serves is a positive multiple of 512 that an off_t addresses (the
    // engine refuses other sources); within these bounds, and with at most MAX_REGIONS regions,
    // every region's byte range fits in u64 for whoever reads the header.
    let size_problem = if device_size == 0 {
        Some(("device size 0", "a device size 0".to_string()))
    } else if device_size % 512 != 0 {
        Some(("device size not whole sectors", format!("a device size of {device_size} bytes, not a multiple of 512")))
    } else if device_size > MAX_DEVICE_SIZE {
        Some((
            "device size too large",
            format!("a device size of {device_size} bytes, more than the largest a file or device can have ({MAX_DEVICE_SIZE})"),
        ))
    } else {
        None
    };
    if let Some((problem, what)) = size_problem {
        return Err(bad(
            path,
            BitmapProblem::Corrupt(problem.into()),
            format!("the header records {what}: no mirrored device has that size"),
            FIX_REBUILD,
        ));
    }
    if check_granularity(granularity).is_err()
        || nregions != regions_for(device_size, granularity)
        || slen > PATH_MAX
        || tlen > PATH_MAX
        || u32_at(b, 12) as u64 != HEADER_SIZE
    {
        return Err(bad(
            path,
            BitmapProblem::Corrupt("inconsistent header fields".into()),
            "the header's fields contradict each other".into(),
            FIX_REBUILD,
        ));
    }
    if nregions > MAX_REGIONS {
        return Err(bad(
            path,
            BitmapProblem::Corrupt("too many regions".into()),
            format!("the header records {nregions} regions, more than the {MAX_REGIONS} a bitmap may have"),
            FIX_REBUILD,
        ));
    }
    let state = match u32_at(b, 56) {
        0 => BitmapState::Clean,
        1 => BitmapState::Active,
        2 => BitmapState::SwitchedOver,
        s => {
            return Err(bad(
                path,
                BitmapProblem::Corrupt(format!("state {s}")),
                format!("unknown state {s} in the header"),
                FIX_REBUILD,
            ))
        }
    };
    // After the state: a switched-over bitmap whose bits were cut off still says where the
    // data is (its bits are never used again; what maps them checks the length itself).
    if state != BitmapState::SwitchedOver {
        check_bits_len(path, file_len, nregions)?;
    }
    // Paths are stored as UTF-8 (a path that is not is stored lossily): anything else is damage,
    // and a lossy decoding here could grow a path past its field when the header is rewritten.
    let text = |o: usize, l: usize, which: &str| {
        std::str::from_utf8(&b[o..o + l]).map(str::to_owned).map_err(|_| {
            bad(
                path,
                BitmapProblem::Corrupt(format!("{which} path not UTF-8")),
                format!("the header's {which} path is not valid UTF-8"),
                FIX_REBUILD,
            )
        })
    };
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&b[16..32]);
    Ok(Header {
        version,
        uuid: uuid::Uuid::from_bytes(uuid).to_string(),
        granularity,
        device_size,
        nregions,
        state,
        created: u64_at(b, 64),
        pair: PairIdentity {
            source: text(96, slen, "source")?,
            source_fingerprint: u64_at(b, 72),
            target: text(1120, tlen, "target")?,
            target_fingerprint: u64_at(b, 80),
        },
    })
}

/// A bitmap open for use by one mirror: locked against other users, mapped shared.
pub struct Bitmap {
    path: PathBuf,
    file: Arc<File>,
    /// Before `map`: dropped (unregistered) before the mapping goes.
    watch: Option<crate::io::sigbus::Watch>,
    map: MmapMut,
    header: Header,
}

/// The header state of a bitmap that was lost while in use ([`Bitmap::mark_lost`]): not a
/// [`BitmapState`], since no open accepts it.
const STATE_LOST: u32 = 3;

/// What `Bitmap::open` must find in the header.
pub struct Expect<'a> {
    pub pair: &'a PairIdentity,
    pub device_size: u64,
    /// `None`: take the bitmap's own granularity.
    pub granularity: Option<u64>,
}

/// Writes `bitmap show --json`: the header, the dirty count in regions and bytes, and every
/// run of dirty regions (`{"start", "count"}`), then a newline. Written as it is serialised: a
/// bitmap of millions of scattered runs must not cost a JSON value per run (hundreds of MiB),
/// only the 16 bytes a run takes in `runs`.
pub fn write_show_json(h: &Header, runs: &[(u64, u64)], out: &mut impl std::io::Write) -> std::io::Result<()> {
    #[derive(serde::Serialize)]
    struct Run {
        start: u64,
        count: u64,
    }
    struct Runs<'a>(&'a [(u64, u64)]);
    impl serde::Serialize for Runs<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
            s.collect_seq(self.0.iter().map(|&(start, count)| Run { start, count }))
        }
    }
    #[derive(serde::Serialize)]
    struct Show<'a> {
        header: &'a Header,
        dirty_regions: u64,
        dirty_bytes: u64,
        dirty_runs: Runs<'a>,
    }
    let dirty: u64 = runs.iter().map(|r| r.1).sum();
    let show = Show {
        header: h,
        dirty_regions: dirty,
        dirty_bytes: dirty.saturating_mul(h.granularity).min(h.device_size),
        dirty_runs: Runs(runs),
    };
    serde_json::to_writer_pretty(&mut *out, &show)?;
    writeln!(out)
}

impl Bitmap {
    /// Opens an existing bitmap and checks it against what the caller expects. Nothing in the
    /// file is modified unless every check passes.
    pub fn open(path: &Path, expect: &Expect<'_>) -> Result<Self> {
        let bm = Self::open_unchecked(path)?;
        let h = &bm.header;
        let mismatch = |role: &'static str, recorded: &str, given: &str| {
            bad(
                path,
                BitmapProblem::WrongPair {
                    role,
                    recorded: recorded.to_string(),
                    given: given.to_string(),
                },
                format!(
                    "it belongs to another pair: its {role} is {recorded}, you gave {given} \
                     (using it would skip regions that differ)"
                ),
                "give the bitmap made for this pair, or a new bitmap path (a full sync), or \
                 pass --full to rebuild this one for the new pair",
            )
        };
        if h.pair.source != expect.pair.source {
            return Err(mismatch("source", &h.pair.source, &expect.pair.source));
        }
        if h.pair.target != expect.pair.target {
            return Err(mismatch("target", &h.pair.target, &expect.pair.target));
        }
        let roles = [
            ("source", (&h.pair.source, h.pair.source_fingerprint), (&expect.pair.source, expect.pair.source_fingerprint)),
            ("target", (&h.pair.target, h.pair.target_fingerprint), (&expect.pair.target, expect.pair.target_fingerprint)),
        ];
        let mut upgrade = false;
        for (role, (path, recorded), (given, fingerprint)) in roles {
            if !same_file(recorded, fingerprint, given, h.created) {
                return Err(mismatch(
                    role,
                    &format!("{path} (file {recorded:016x})"),
                    &format!("{given} (a different file, {fingerprint:016x})"),
                ));
            }
            upgrade |= recorded != fingerprint;
        }
        if h.device_size != expect.device_size {
            return Err(bad(
                path,
                BitmapProblem::SizeMismatch { recorded: h.device_size, device: expect.device_size },
                format!(
                    "it was made for a {} byte device, the source is now {} bytes",
                    h.device_size, expect.device_size
                ),
                "the source changed size: pass --full to rebuild the bitmap and copy everything",
            ));
        }
        if let Some(g) = expect.granularity {
            if g != h.granularity {
                return Err(bad(
                    path,
                    BitmapProblem::GranularityMismatch { recorded: h.granularity, requested: g },
                    format!("its granularity is {} bytes, you asked for {g}", h.granularity),
                    "omit --granularity to use the bitmap's own, or pass --full to rebuild it \
                     with the new granularity",
                ));
            }
        }
        let mut bm = bm;
        if upgrade {
            // An older header's inode-only fingerprints, accepted for the same files: the next
            // header write (the open's state change) records the full ones.
            bm.header.pair.source_fingerprint = expect.pair.source_fingerprint;
            bm.header.pair.target_fingerprint = expect.pair.target_fingerprint;
        }
        Ok(bm)
    }

    /// Opens the bitmap of a device that was switched over to its target (for `recover`),
    /// checking that it was and that `target` (an identity) is that target.
    pub fn open_switched(path: &Path, target: &(String, u64)) -> Result<Self> {
        let bm = Self::open_unchecked(path)?;
        let h = &bm.header;
        if h.state != BitmapState::SwitchedOver {
            return Err(Error::config(format!("bitmap {}: the device was not switched over", path.display())));
        }
        if h.pair.target != target.0 || !same_file(h.pair.target_fingerprint, target.1, &target.0, h.created) {
            return Err(bad(
                path,
                BitmapProblem::WrongPair { role: "target", recorded: h.pair.target.clone(), given: target.0.clone() },
                format!("the device was switched over to {}, not to {}", h.pair.target, target.0),
                "recover with the device's own configuration, or add the switched-over target anew",
            ));
        }
        Ok(bm)
    }

    fn open_unchecked(path: &Path) -> Result<Self> {
        let unreadable = |e: std::io::Error, fix: &str| Error::Open {
            role: "bitmap",
            path: path.to_path_buf(),
            what: "cannot open".into(),
            fix: fix.into(),
            source: e,
        };
        let meta = std::fs::metadata(path)
            .map_err(|e| unreadable(e, "check the --bitmap path (it is created only by a full sync)"))?;
        if !meta.is_file() {
            return Err(bad(
                path,
                BitmapProblem::Unreadable,
                "not a regular file".into(),
                "give the path of a bitmap file (ublk-mirror creates it on first use)",
            ));
        }
        // Root opens a mode-0444 file for writing without complaint; a file made read-only was
        // made so on purpose, so honour the bits rather than the privilege.
        if meta.permissions().mode() & 0o222 == 0 {
            return Err(bad(
                path,
                BitmapProblem::ReadOnly,
                format!("the file is read-only (mode {:o})", meta.permissions().mode() & 0o777),
                "the mirror must update its bitmap: make it writable (chmod u+w) or use another path",
            ));
        }
        if meta.permissions().mode() & 0o444 == 0 {
            return Err(bad(
                path,
                BitmapProblem::Unreadable,
                "the file is not readable (mode 0)".into(),
                "make it readable and writable by its owner (chmod 600)",
            ));
        }
        let file = OpenOptions::new().read(true).write(true).open(path).map_err(|e| {
            if e.raw_os_error() == Some(libc::EROFS) || e.raw_os_error() == Some(libc::EACCES) {
                bad(path, BitmapProblem::ReadOnly, format!("cannot open for writing: {e}"),
                    "the mirror must update its bitmap: put it on a writable filesystem")
            } else {
                unreadable(e, "check the path and its permissions")
            }
        })?;
        // One user at a time: two mirrors clearing each other's bits would lose intent.
        if !try_lock_exclusive(&file) {
            return Err(bad(
                path,
                BitmapProblem::InUse,
                "another ublk-mirror process is using it".into(),
                "stop that mirror first (ublk-mirror list shows the running devices)",
            ));
        }
        let len = file.metadata().map_err(|e| unreadable(e, "check the file"))?.len();
        let header = header_of(path, &file, len)?;
        check_bits_len(path, len, header.nregions)?;
        // Exactly the header and the bits are mapped (whatever follows them in the file is not
        // ours), and the file holds them (checked just above).
        let need = file_len_for(header.nregions);
        // SAFETY: the file is a regular file we hold an exclusive flock on, so no cooperating
        // process maps it concurrently; it is at least `need` bytes long (checked above) and we
        // never truncate an open bitmap. All access goes through bounds-checked slices of the
        // map. (If another process truncates it anyway, an access past the new end raises
        // SIGBUS, a signal, not a stray memory access: crate::io::sigbus answers it.)
        let map = unsafe { MmapOptions::new().len(need as usize).map_mut(&file) }
            .map_err(|e| unreadable(e, "the bitmap must be on a filesystem that supports mmap"))?;
        // Another process may still shrink the file (flock is advisory): a SIGBUS on the map
        // is then survived and reported (Self::lost) instead of ending the daemon.
        // SAFETY: the map is this Bitmap's alone, and `watch` is dropped before it (field order).
        let watch = unsafe { crate::io::sigbus::watch(map.as_ptr(), map.len()) };
        Ok(Bitmap { path: path.to_path_buf(), file: Arc::new(file), watch, map, header })
    }

    /// Reads and checks a bitmap's header alone (its first 4 KiB), even while a mirror uses it:
    /// for deciding how to open it, without scanning its bits.
    pub fn read_header(path: &Path) -> Result<Header> {
        let (file, len) = open_to_read(path)?;
        header_of(path, &file, len)
    }

    /// Opens a bitmap read-only for inspection (`bitmap show`), even while a mirror uses it:
    /// its header and its runs of set bits.
    pub fn inspect(path: &Path) -> Result<(Header, Vec<(u64, u64)>)> {
        let (file, len) = open_to_read(path)?;
        let header = header_of(path, &file, len)?;
        check_bits_len(path, len, header.nregions)?;
        // SAFETY: read-only shared mapping of the header and bits of a regular file at least
        // that long (checked just above); a live mirror may flip bits underneath, which only
        // makes the snapshot slightly stale (bytes are read whole, no invariant depends on them
        // here).
        let map = unsafe { MmapOptions::new().len(file_len_for(header.nregions) as usize).map(&file) }
            .map_err(|e| Error::io("mmap bitmap", e))?;
        // A file shrunk meanwhile reads as all dirty past its end instead of ending the process.
        // SAFETY: the map is this function's alone; `_watch`, declared after it, is dropped first.
        let _watch = unsafe { crate::io::sigbus::watch(map.as_ptr(), map.len()) };
        // Runs found a word at a time (bit r is bit r % 8 of byte r / 8).
        let bits = bitvec::slice::BitSlice::<u8, bitvec::order::Lsb0>::from_slice(&map[HEADER_SIZE as usize..]);
        let bits = &bits[..(header.nregions as usize).min(bits.len())];
        let mut runs = Vec::new();
        let mut at = 0;
        while let Some(i) = bits[at..].first_one() {
            let s = at + i;
            let e = bits[s..].first_zero().map_or(bits.len(), |j| s + j);
            runs.push((s as u64, (e - s) as u64));
            at = e;
        }
        Ok((header, runs))
    }

    pub fn header(&self) -> &Header {
        &self.header
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn nregions(&self) -> u64 {
        self.header.nregions
    }
    pub fn granularity(&self) -> u64 {
        self.header.granularity
    }
    /// A shared handle on the file, for fdatasync issued through io_uring.
    pub fn file(&self) -> Arc<File> {
        self.file.clone()
    }
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Rewrites the header with a new state and makes it durable. Used at open and close only,
    /// never on the I/O path, so a blocking fdatasync is fine here.
    pub fn set_state(&mut self, state: BitmapState) -> Result<()> {
        if self.lost() {
            // Through the mapping the header no longer reaches the file, and the file keeps
            // what mark_lost wrote: a state change (a switchover, a clean close) is refused.
            return Err(self.lost_error());
        }
        self.header.state = state;
        let h = encode_header(&self.header);
        self.map[..HEADER_SIZE as usize].copy_from_slice(&h);
        self.sync()
    }

    /// Records a new pair (`switchover --reverse`: source and target swapped) and makes it
    /// durable. The header is one 4 KiB block written in place, like a state change.
    pub fn set_pair(&mut self, pair: PairIdentity) -> Result<()> {
        self.header.pair = pair;
        self.set_state(BitmapState::Active)
    }

    /// Rewrites the header with a new state without making it durable: for the informational
    /// states (clean, active), which the next fdatasync of the bitmap carries along.
    pub fn set_state_lazy(&mut self, state: BitmapState) {
        if self.lost() {
            return;
        }
        self.header.state = state;
        let h = encode_header(&self.header);
        self.map[..HEADER_SIZE as usize].copy_from_slice(&h);
    }

    /// Part of the mapping no longer reaches the file: it shrank under the mirror, or its pages
    /// could not be read (see [`crate::io::sigbus`]). Bits written since may not be in the file.
    pub fn lost(&self) -> bool {
        self.watch.as_ref().is_some_and(|w| w.lost())
    }

    fn lost_error(&self) -> Error {
        bad(
            &self.path,
            BitmapProblem::Lost,
            "the file shrank or became unreadable while this mirror used it".into(),
            FIX_REBUILD,
        )
    }

    /// Marks the file as lost ([`Self::lost`]), so that no later open trusts it: the header,
    /// with the state "lost", written through the file (not the mapping, which may no longer
    /// reach it) and made durable; if that fails (a failing disk, a full file system), the file
    /// is cut to nothing instead (metadata only), which every open refuses too. A switched-over
    /// bitmap is left as it is: its state already refuses every use of its pair, and says
    /// where the data is, which "lost" would not.
    pub fn mark_lost(&self) -> Result<()> {
        if self.header.state == BitmapState::SwitchedOver {
            return Ok(());
        }
        let b = encode_header_state(&self.header, STATE_LOST);
        let written = self.file.write_all_at(&b, 0).map_err(|e| Error::io(format!("marking bitmap {} lost", self.path.display()), e));
        match written.and_then(|()| self.sync()) {
            Ok(()) => Ok(()),
            Err(e) => {
                let cut = self.file.set_len(0).and_then(|()| self.file.sync_all());
                cut.map_err(|_| e)
            }
        }
    }

    /// Blocking fdatasync (start-up, shutdown, offline tools).
    pub fn sync(&self) -> Result<()> {
        nix::unistd::fdatasync(self.file.as_raw_fd())
            .map_err(|e| Error::io(format!("fdatasync bitmap {}", self.path.display()), e.into()))
    }

    pub fn count_set(&self) -> u64 {
        (0..self.header.nregions).filter(|&r| self.get(r)).count() as u64
    }

    fn byte(&self, r: u64) -> usize {
        HEADER_SIZE as usize + (r / 8) as usize
    }
}

impl PersistentBits for Bitmap {
    fn nregions(&self) -> u64 {
        self.header.nregions
    }
    fn load(&self, s: u64, e: u64) -> bitvec::vec::BitVec<u64, bitvec::order::Lsb0> {
        // Whole little-endian words around [s, e): bit r is bit r % 8 of byte r / 8, which is
        // bit r % 64 of word r / 64 read little-endian. The bits area is a whole number of
        // 4 KiB blocks, so every word touched exists.
        let bits = &self.map[HEADER_SIZE as usize..];
        let (bs, be) = ((s / 64 * 8) as usize, (e.div_ceil(64) * 8) as usize);
        let words: Vec<u64> = bits[bs..be]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        let mut all = bitvec::vec::BitVec::<u64, bitvec::order::Lsb0>::from_vec(words);
        let off = (s % 64) as usize;
        if off == 0 {
            all.truncate((e - s) as usize);
            return all;
        }
        all[off..off + (e - s) as usize].to_bitvec()
    }
    fn clear_range(&mut self, s: u64, e: u64) {
        // Whole bytes at once, the bits of partial bytes at either end one by one.
        let (a, b) = (s.div_ceil(8) * 8, e / 8 * 8);
        if a >= b {
            (s..e).for_each(|r| self.clear(r));
            return;
        }
        (s..a).chain(b..e).for_each(|r| self.clear(r));
        let (i, j) = (self.byte(a), self.byte(b));
        self.map[i..j].fill(0);
    }
    fn get(&self, r: u64) -> bool {
        self.map[self.byte(r)] & (1 << (r % 8)) != 0
    }
    fn set(&mut self, r: u64) {
        let i = self.byte(r);
        self.map[i] |= 1 << (r % 8);
    }
    fn clear(&mut self, r: u64) {
        let i = self.byte(r);
        self.map[i] &= !(1 << (r % 8));
    }
}

/// The real files of a bitmap's lifecycle ([`crate::core::lifecycle`]): the bitmap at `path`, a new
/// one written as `.NAME.tmp-PID` beside it.
pub struct BitmapFiles<'a> {
    path: &'a Path,
    dir: PathBuf,
    /// The header a new bitmap gets.
    new_header: Header,
    /// What an existing bitmap must match to be resumed.
    expect: Expect<'a>,
    temp: Option<(PathBuf, File)>,
}

impl<'a> BitmapFiles<'a> {
    /// `granularity` is a new bitmap's; `expect` is checked when an existing one is opened.
    pub fn new(path: &'a Path, pair: PairIdentity, device_size: u64, granularity: u64, expect: Expect<'a>) -> Self {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let new_header = Header {
            version: VERSION,
            uuid: uuid::Uuid::new_v4().to_string(),
            granularity,
            device_size,
            nregions: regions_for(device_size, granularity),
            state: BitmapState::Clean,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            pair,
        };
        BitmapFiles { path, dir, new_header, expect, temp: None }
    }

    fn create_err(&self, e: std::io::Error) -> Error {
        Error::Open {
            role: "bitmap",
            path: self.path.to_path_buf(),
            what: "cannot create".into(),
            fix: "check that the directory exists and is writable, with room for the bitmap".into(),
            source: e,
        }
    }
}

/// Writes the bits of a new bitmap of `nregions` regions after its header: every bit set, or
/// none (a hole). Bits past `nregions` stay clear.
fn write_fill(f: &mut File, nregions: u64, fill: Fill) -> std::io::Result<()> {
    f.set_len(file_len_for(nregions))?;
    if fill == Fill::Clean {
        return Ok(());
    }
    let full = nregions / 8;
    const CHUNK: u64 = 1 << 20;
    let ones = vec![0xffu8; CHUNK.min(full.max(1)) as usize];
    let mut done = 0u64;
    while done < full {
        let n = (full - done).min(CHUNK);
        f.write_all_at(&ones[..n as usize], HEADER_SIZE + done)?;
        done += n;
    }
    let tail = nregions % 8;
    if tail != 0 {
        f.write_all_at(&[(1u8 << tail) - 1], HEADER_SIZE + full)?;
    }
    Ok(())
}

impl crate::core::lifecycle::BitmapFiles for BitmapFiles<'_> {
    type Bits = Bitmap;

    fn exists(&self) -> bool {
        self.path.exists()
    }

    fn write_temp(&mut self, fill: Fill) -> Result<()> {
        check_granularity(self.new_header.granularity)?;
        check_regions(self.new_header.device_size, self.new_header.granularity)?;
        let pair = &self.new_header.pair;
        for p in [&pair.source, &pair.target] {
            if p.len() > PATH_MAX {
                return Err(Error::config(format!("path too long for the bitmap header: {p}")));
            }
        }
        let name = self.path.file_name().ok_or_else(|| {
            Error::config(format!("bitmap path {} names no file", self.path.display()))
        })?;
        let tmp = self.dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| self.create_err(e))?;
        // Recorded before writing: a failure from here on leaves a file for discard_temp.
        let header = encode_header(&self.new_header);
        let r = f.write_all(&header).and_then(|_| write_fill(&mut f, self.new_header.nregions, fill));
        self.temp = Some((tmp, f));
        r.map_err(|e| self.create_err(e))
    }

    fn sync_temp(&mut self) -> Result<()> {
        let r = match &self.temp {
            Some((_, f)) => f.sync_all(),
            None => Ok(()),
        };
        r.map_err(|e| self.create_err(e))
    }

    fn rename_temp(&mut self) -> Result<()> {
        let r = match &self.temp {
            Some((tmp, _)) => std::fs::rename(tmp, self.path),
            None => Ok(()),
        };
        r.map_err(|e| self.create_err(e))?;
        self.temp = None;
        Ok(())
    }

    fn sync_dir(&mut self) -> Result<()> {
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|e| self.create_err(e))
    }

    fn discard_temp(&mut self) {
        if let Some((tmp, _)) = self.temp.take() {
            let _ = std::fs::remove_file(tmp);
        }
    }

    fn open(&mut self, created: bool) -> Result<Bitmap> {
        if created {
            Bitmap::open_unchecked(self.path)
        } else {
            Bitmap::open(self.path, &self.expect)
        }
    }

    fn sync(&mut self, bits: &Bitmap) -> Result<()> {
        bits.sync()
    }
}

/// What a switchover records in the header.
pub enum BitmapSwitch {
    /// The device moved onto the target (state switched over).
    Over,
    /// Source and target swapped (`switchover --reverse`): the new pair.
    Reverse(PairIdentity),
}

impl crate::core::lifecycle::RecordSwitch for Bitmap {
    type Switch = BitmapSwitch;
    fn record_switch(&mut self, s: BitmapSwitch) -> Result<()> {
        match s {
            BitmapSwitch::Over => self.set_state(BitmapState::SwitchedOver),
            BitmapSwitch::Reverse(pair) => self.set_pair(pair),
        }
    }
}

/// A bitmap opened read-only, and its length.
fn open_to_read(path: &Path) -> Result<(File, u64)> {
    let file = File::open(path).map_err(|e| Error::Open {
        role: "bitmap",
        path: path.to_path_buf(),
        what: "cannot open".into(),
        fix: "check the path and its permissions".into(),
        source: e,
    })?;
    let len = file.metadata().map_err(|e| Error::io("stat bitmap", e))?.len();
    Ok((file, len))
}

/// The identity of a backing file for the bitmap header: its absolute path as given (not
/// resolved: `/dev/disk/by-id/...` stays stable where `/dev/sdb` does not) and, for a regular
/// file, its [`file_fingerprint`], so that a different file at the same path is noticed. A
/// block device's fingerprint is 0: its path (a by-id link, usually) names it.
pub fn identity_of(path: &Path, file: &File, meta: &std::fs::Metadata) -> (String, u64) {
    let abs = absolute(path);
    let fp = if meta.file_type().is_file() { file_fingerprint(file, meta) } else { 0 };
    (abs.to_string_lossy().into_owned(), fp)
}

// FS_IOC_GETVERSION is numbered as _IOR('v', 1, long), but ext4, xfs and btrfs write an int
// through its pointer: declared with the long's number and an int's buffer.
nix::ioctl_read_bad!(fs_ioc_getversion, nix::request_code_read!(b'v', 1, std::mem::size_of::<libc::c_long>()), libc::c_int);

/// What tells one regular file from another that later took its place: the inode number
/// mixed with the inode's generation (FS_IOC_GETVERSION: drawn at random each time ext4 or
/// xfs allocates an inode) and its birth time. The inode number alone is not enough: a file
/// deleted and written anew at the same path often gets the freed number back.
///
/// Where the file system has neither generation nor birth time, the inode number alone. A
/// header written before fingerprints had them holds the inode number alone too;
/// [`Bitmap::open`] accepts that for the same file (see [`legacy_fingerprint_matches`]).
pub fn file_fingerprint(file: &File, meta: &std::fs::Metadata) -> u64 {
    let mut generation: libc::c_int = 0;
    // SAFETY: `file` is an open descriptor and `generation` a live, exclusively borrowed int,
    // the size the file systems write.
    let generation = match unsafe { fs_ioc_getversion(file.as_raw_fd(), &mut generation) } {
        Ok(_) => generation as u32 as u64,
        Err(_) => 0,
    };
    let born = meta
        .created()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    if generation == 0 && born == 0 {
        return meta.ino();
    }
    // A 64-bit mix (splitmix64's finaliser) of the three: equal fingerprints mean the same
    // file up to a 2^-64 chance.
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let fp = mix(meta.ino() ^ mix(generation ^ mix(born)));
    // Never equal to the bare inode number, which would read as a legacy fingerprint.
    if fp == meta.ino() { !fp } else { fp }
}

/// Whether `recorded`, a fingerprint from an older header (the inode number alone), names
/// the regular file now at `path`: the same inode number, and a file born no later than the
/// bitmap (`created`, seconds since the epoch), so that a file made anew at a reused number
/// after the bitmap is refused. Where the file system keeps no birth time, the inode number
/// alone decides. Only for headers written before full fingerprints, which [`Bitmap::open`]
/// then upgrades.
fn legacy_fingerprint_matches(recorded: u64, path: &str, created: u64) -> bool {
    std::fs::metadata(path).is_ok_and(|m| {
        let born = m.created().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
        m.is_file() && m.ino() == recorded && born.is_none_or(|b| b.as_secs() <= created)
    })
}

/// Whether a header's pair (`h`) is the pair `given`: the same paths, and fingerprints equal
/// or, for a header written before full fingerprints, naming the same files (see
/// [`legacy_fingerprint_matches`]).
pub fn same_pair(h: &Header, given: &PairIdentity) -> bool {
    h.pair.source == given.source
        && h.pair.target == given.target
        && same_file(h.pair.source_fingerprint, given.source_fingerprint, &given.source, h.created)
        && same_file(h.pair.target_fingerprint, given.target_fingerprint, &given.target, h.created)
}

/// Whether a header's `recorded` fingerprint names the file `fingerprint` (now at `path`):
/// equal, or an older inode-only fingerprint of that file (see [`legacy_fingerprint_matches`]).
fn same_file(recorded: u64, fingerprint: u64, path: &str, created: u64) -> bool {
    recorded == fingerprint || legacy_fingerprint_matches(recorded, path, created)
}

/// `path` made absolute against the current directory, not resolved (as the header records it).
pub fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map(|d| d.join(path)).unwrap_or_else(|_| path.to_path_buf())
    }
}

/// Takes an exclusive, non-blocking flock on `file` (held until the file is closed). False if
/// another open file description holds a lock.
///
/// A process that just died may hold the lock for a moment more (the kernel tears down its
/// io_uring asynchronously, with file references in it), so this retries for up to a second.
pub(crate) fn try_lock_exclusive(file: &File) -> bool {
    for _ in 0..20 {
        // nix's replacement, `Flock`, unlocks when dropped: the lock must instead last as long
        // as the open file description, which the daemon's io_uring rings also hold (see
        // admin::serve), so the plain call it deprecates is the one that fits.
        #[allow(deprecated)]
        if nix::fcntl::flock(file.as_raw_fd(), nix::fcntl::FlockArg::LockExclusiveNonblock).is_ok() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::lifecycle::{open_bitmap, SyncMode};
    use rand::{Rng, SeedableRng};

    /// 64 KiB up to 4 TiB; larger devices get the granularity that keeps the bitmap at 64 Mi
    /// regions or fewer; 64 MiB at most.
    #[test]
    fn default_granularity_grows_with_the_device() {
        const TIB: u64 = 1 << 40;
        assert_eq!(default_granularity(1 << 30), 64 << 10);
        assert_eq!(default_granularity(4 * TIB), 64 << 10);
        assert_eq!(default_granularity(4 * TIB + 4096), 128 << 10);
        assert_eq!(default_granularity(16 * TIB), 256 << 10);
        assert_eq!(default_granularity(4096 * TIB), 64 << 20);
        assert_eq!(default_granularity(u64::MAX / 2), MAX_GRANULARITY, "capped");
        for size in [TIB, 5 * TIB, 20 * TIB, 999 * TIB] {
            assert!(regions_for(size, default_granularity(size)) <= MAX_DEFAULT_REGIONS);
        }
    }

    fn test_pair() -> PairIdentity {
        PairIdentity { source: "/s".into(), source_fingerprint: 0, target: "/t".into(), target_fingerprint: 0 }
    }

    /// Writes a bitmap at `p` whose header (with a valid checksum) records `size` and `g`, and
    /// the length that header needs, its bits a hole (sparse).
    fn crafted(p: &Path, size: u64, g: u64) {
        let nregions = regions_for(size, g);
        let h = Header {
            version: VERSION,
            uuid: uuid::Uuid::new_v4().to_string(),
            granularity: g,
            device_size: size,
            nregions,
            state: BitmapState::Clean,
            created: 0,
            pair: test_pair(),
        };
        let mut f = File::create(p).expect("create");
        f.write_all(&encode_header(&h)).expect("write the header");
        f.set_len(file_len_for(nregions)).expect("extend (sparse)");
    }

    /// A header is refused, naming the field, when its device size could not be a real device
    /// (0, not whole sectors, beyond what an off_t addresses) or needs more regions than a
    /// bitmap may have; `bitmap show` then never does arithmetic on it.
    #[test]
    fn header_with_an_impossible_device_size_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("bm");
        for (size, g, what) in [
            (0, 4096, "size 0"),
            (1000, 4096, "not a multiple of 512"),
            (u64::MAX, MAX_GRANULARITY, "not a multiple of 512"),
            (1u64 << 63, MAX_GRANULARITY, "more than the largest"),
            (((1u64 << 32) + 1) * 4096, 4096, "regions"),
        ] {
            crafted(&p, size, g);
            for r in [Bitmap::read_header(&p).err(), Bitmap::inspect(&p).err()] {
                let e = r.unwrap_or_else(|| panic!("size {size}, granularity {g}: accepted"));
                assert!(matches!(e.bitmap_problem(), Some(BitmapProblem::Corrupt(_))), "{e}");
                let msg = e.to_string();
                assert!(msg.contains(what) && msg.contains("fix:"), "size {size}: {msg}");
            }
        }
    }

    /// A header whose path bytes are not UTF-8 (never written by ublk-mirror, which stores paths
    /// as UTF-8) is refused as corrupt, naming the field: decoded lossily, 1000 such bytes would
    /// have grown to 3000 and overrun the header when it is next rewritten.
    #[test]
    fn a_header_path_that_is_not_utf8_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("bm");
        crafted(&p, 1 << 20, 4096);
        let mut b = std::fs::read(&p).expect("read");
        b[90..92].copy_from_slice(&1000u16.to_le_bytes());
        b[1120..2120].fill(0xff);
        let crc = crc32fast::hash(&b[..CHECKED_LEN]);
        b[CHECKED_LEN..CHECKED_LEN + 4].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&p, &b).expect("write");
        let e = Bitmap::read_header(&p).expect_err("a header with a non-UTF-8 path was accepted");
        assert!(matches!(e.bitmap_problem(), Some(BitmapProblem::Corrupt(_))), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("target path is not valid UTF-8") && msg.contains("fix:"), "{msg}");
    }

    /// An explicit granularity that would give more regions than a bitmap may have is refused
    /// before anything is written, with the granularity that would do; so is a device too large
    /// for any granularity.
    #[test]
    fn too_many_regions_are_refused_at_create() {
        use crate::core::lifecycle::BitmapFiles as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bm");
        let pair = test_pair();
        // 1 PiB in 4 KiB regions: 2^38 of them (a 32 GiB bitmap); 256K gives 2^32.
        let (size, g) = (1u64 << 50, 4096);
        let expect = Expect { pair: &pair, device_size: size, granularity: Some(g) };
        let mut files = BitmapFiles::new(&path, pair.clone(), size, g, expect);
        let r = files.write_temp(Fill::Clean);
        files.discard_temp();
        let msg = r.expect_err("a bitmap of 2^38 regions was created").to_string();
        assert!(msg.contains("--granularity 256K"), "{msg}");
        // Beyond 256 PiB even 64 MiB regions are too many.
        let size = (1u64 << 58) + (64 << 20);
        let expect = Expect { pair: &pair, device_size: size, granularity: None };
        let mut files = BitmapFiles::new(&path, pair.clone(), size, default_granularity(size), expect);
        let r = files.write_temp(Fill::Clean);
        files.discard_temp();
        let msg = r.expect_err("a bitmap of 2^32 + 1 regions was created").to_string();
        assert!(msg.contains("256 PiB"), "{msg}");
    }

    /// A bitmap file longer than its bits need is mapped only as far as they go: a long (even
    /// huge, sparse) tail is neither mapped nor a reason to fail.
    #[test]
    fn only_the_bits_are_mapped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bm");
        let pair = test_pair();
        const N: u64 = 70_000;
        let expect = Expect { pair: &pair, device_size: N * 4096, granularity: None };
        let mut files = BitmapFiles::new(&path, pair.clone(), N * 4096, 4096, expect);
        drop(open_bitmap(&mut files, SyncMode::AssumeIdentical).expect("create"));
        let need = file_len_for(N);
        OpenOptions::new().write(true).open(&path).and_then(|f| f.set_len(1 << 40)).expect("extend");
        let bm = Bitmap::open_unchecked(&path).expect("open");
        assert_eq!(bm.map.len() as u64, need);
        assert_eq!(bm.nregions(), N);
    }

    /// A bitmap file truncated under its open Bitmap (crate::io::sigbus): the access survives,
    /// the lost page reads as all dirty, a state change (a switchover's record) is refused, and
    /// once marked lost no open trusts the file. A switched-over bitmap keeps its state.
    #[test]
    fn a_truncated_bitmap_is_lost_reads_dirty_and_is_refused_after() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bm");
        let pair = test_pair();
        const N: u64 = 70_000; // 8750 bytes of bits: three pages of the mapping
        let expect = Expect { pair: &pair, device_size: N * 4096, granularity: None };
        let mut files = BitmapFiles::new(&path, pair.clone(), N * 4096, 4096, expect);
        let mut bm = open_bitmap(&mut files, SyncMode::AssumeIdentical).expect("create").state;
        assert!(!bm.pbits().lost());
        bm.pbits_mut().set(5);
        OpenOptions::new().write(true).open(&path).and_then(|f| f.set_len(0)).expect("truncate");
        // Past the file's end now: without the watch, SIGBUS would end this test's process.
        assert!(bm.pbits().get(5));
        assert!(bm.pbits().get(40_000), "a lost page reads as dirty, not clean");
        assert!(bm.pbits().lost());
        let e = bm.pbits_mut().set_state(BitmapState::SwitchedOver).expect_err("a state change on a lost bitmap");
        assert!(e.to_string().contains("while this mirror used it"), "{e}");
        bm.pbits().mark_lost().expect("mark");
        drop(bm);
        let expect = Expect { pair: &pair, device_size: N * 4096, granularity: None };
        let e = Bitmap::open(&path, &expect).err().expect("a lost bitmap was opened");
        assert!(e.to_string().contains("while a mirror used it") && e.to_string().contains("--full"), "{e}");

        // Switched over first: mark_lost leaves the state that says where the data is.
        let path2 = dir.path().join("bm2");
        let expect = Expect { pair: &pair, device_size: N * 4096, granularity: None };
        let mut files = BitmapFiles::new(&path2, pair.clone(), N * 4096, 4096, expect);
        let mut bm = open_bitmap(&mut files, SyncMode::AssumeIdentical).expect("create").state;
        bm.pbits_mut().set_state(BitmapState::SwitchedOver).expect("switch");
        OpenOptions::new().write(true).open(&path2).and_then(|f| f.set_len(HEADER_SIZE)).expect("truncate the bits");
        assert!(bm.pbits().get(1));
        bm.pbits().mark_lost().expect("mark");
        assert_eq!(Bitmap::read_header(&path2).expect("header").state, BitmapState::SwitchedOver);
        assert!(Bitmap::open_unchecked(&path2).is_err(), "a bitmap whose bits were cut off was mapped");
    }

    /// mark_lost when the header cannot be written (a failing disk, a full file system): the
    /// file is cut to nothing instead, which every open refuses; when that fails too, the
    /// header write's error is returned. The file is swapped for one that refuses writes: a
    /// memfd sealed against writes (it may still shrink), then a descriptor opened read-only.
    #[test]
    fn mark_lost_cuts_the_file_when_the_header_cannot_be_written() {
        use nix::fcntl::{fcntl, FcntlArg, SealFlag};
        use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bm");
        let pair = test_pair();
        let expect = Expect { pair: &pair, device_size: 1 << 30, granularity: None };
        let mut files = BitmapFiles::new(&path, pair.clone(), 1 << 30, 65536, expect);
        let mut bm = open_bitmap(&mut files, SyncMode::AssumeIdentical).expect("create").state;

        let sealed = File::from(memfd_create(c"bitmap", MemFdCreateFlag::MFD_ALLOW_SEALING).expect("memfd"));
        sealed.write_all_at(&[1u8; 8192], 0).expect("fill the memfd");
        fcntl(sealed.as_raw_fd(), FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_WRITE)).expect("seal");
        assert!(sealed.write_all_at(&[0u8; 16], 0).is_err(), "the sealed memfd took a write");
        let sealed = Arc::new(sealed);
        bm.pbits_mut().file = sealed.clone();
        bm.pbits().mark_lost().expect("the header write failed, the cut did not: marked");
        assert_eq!(sealed.metadata().expect("stat").len(), 0, "the file was not cut");

        bm.pbits_mut().file = Arc::new(File::open(&path).expect("open read-only"));
        let e = bm.pbits().mark_lost().expect_err("neither the header nor the cut could be written");
        assert!(e.to_string().contains("marking bitmap") && e.to_string().contains("lost"), "{e}");
    }

    /// The word-at-a-time range operations agree with the bit-by-bit ones, at every alignment.
    #[test]
    fn range_operations_match_single_bits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bm");
        let pair = PairIdentity { source: "/s".into(), source_fingerprint: 1, target: "/t".into(), target_fingerprint: 2 };
        const N: u64 = 70_000; // bits past one 4 KiB block, a last word that is not whole
        let expect = Expect { pair: &pair, device_size: N * 4096, granularity: None };
        let mut files = BitmapFiles::new(&path, pair.clone(), N * 4096, 4096, expect);
        let mut bm = open_bitmap(&mut files, SyncMode::AssumeIdentical).expect("create").state;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut model = vec![false; N as usize];
        for _ in 0..3000 {
            let r = rng.gen_range(0..N);
            bm.pbits_mut().set(r);
            model[r as usize] = true;
        }
        for _ in 0..300 {
            let s = rng.gen_range(0..N);
            let len: u64 = rng.gen_range(0..5000);
            let e = rng.gen_range(s..=N.min(s + len));
            let got = bm.pbits().load(s, e);
            assert_eq!(got.len() as u64, e - s);
            for r in s..e {
                assert_eq!(got[(r - s) as usize], model[r as usize], "load({s}, {e}) at {r}");
            }
            if rng.gen_ratio(1, 3) {
                bm.pbits_mut().clear_range(s, e);
                model[s as usize..e as usize].fill(false);
            }
        }
        for r in 0..N {
            assert_eq!(bm.pbits().get(r), model[r as usize], "after clear_range, bit {r}");
        }
        let (_, runs) = Bitmap::inspect(&path).expect("inspect");
        let mut from_runs = vec![false; N as usize];
        for (s, n) in runs {
            from_runs[s as usize..(s + n) as usize].fill(true);
        }
        assert_eq!(from_runs, model, "inspect's runs");
    }
}
