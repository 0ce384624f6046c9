//! Replays a dm-log-writes log onto a block device or file, for the power-loss scenario
//! (`tests/vm/power-loss.sh`, `docs/crash-safety.md`). Debian ships no replay tool.
//!
//! ```text
//! log_writes_replay list LOG                   one line per entry
//! log_writes_replay replay LOG DEV --to-mark NAME [--resume INDEX:OFFSET]
//! ```
//!
//! The log format is the kernel's (drivers/md/dm-log-writes.c, written from its description in
//! Documentation/admin-guide/device-mapper/log-writes.rst): a super block in the first sector
//! (magic, version, entry count, sector size), then per entry one sector holding
//! `sector, nr_sectors, flags, data_len` (little-endian u64 each; a mark's text follows in the
//! same sector) and, for a data write, its `nr_sectors` sectors of data. Sectors are the data
//! device's logical block size.
//!
//! dm-log-writes appends a write to its log only once a FLUSH that covers it has completed (a FUA
//! write at its completion), and a mark at once. So the entries before a mark are exactly what the
//! device's medium held at that moment if every write not yet flushed was lost: replaying up to a
//! mark reconstructs the strongest power loss at that moment.
//!
//! `replay` applies the entries before the mark in order (a discard as zeros) and prints
//! `resume=<index>:<log offset> applied=<entries> bytes=<data bytes> flushes=<n> fua=<n>
//! discards=<n>`; `--resume` with that token replays the entries between this mark and a later
//! one onto the same device, without reading the log from its start again.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::process::ExitCode;

const MAGIC: u64 = 0x006a_7366_7773_6872;
const FLUSH: u64 = 1;
const FUA: u64 = 1 << 1;
const DISCARD: u64 = 1 << 2;
const MARK: u64 = 1 << 3;
const METADATA: u64 = 1 << 4;
const ENTRY_HEADER: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Super {
    nr_entries: u64,
    sectorsize: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    index: u64,
    /// Byte offset of the entry's header sector in the log.
    log_offset: u64,
    /// In the data device's sectors.
    sector: u64,
    nr_sectors: u64,
    flags: u64,
    mark: Option<String>,
}

impl Entry {
    fn kind(&self) -> &'static str {
        if self.flags & MARK != 0 {
            "mark"
        } else if self.flags & DISCARD != 0 {
            "discard"
        } else if self.flags & FLUSH != 0 && self.nr_sectors == 0 {
            "flush"
        } else {
            "write"
        }
    }
    /// Bytes of data that follow the header sector in the log.
    fn data_len(&self, s: &Super) -> u64 {
        if self.flags & (MARK | DISCARD) != 0 {
            0
        } else {
            self.nr_sectors * s.sectorsize
        }
    }
}

fn le64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

fn parse_super(b: &[u8]) -> Result<Super, String> {
    if b.len() < 28 {
        return Err("log shorter than its super block".into());
    }
    if le64(b, 0) != MAGIC {
        return Err(format!("not a dm-log-writes log: magic {:#x}", le64(b, 0)));
    }
    if le64(b, 8) != 1 {
        return Err(format!("log format version {}, this tool reads version 1", le64(b, 8)));
    }
    let sectorsize = u32::from_le_bytes([b[24], b[25], b[26], b[27]]) as u64;
    if !sectorsize.is_power_of_two() || !(512..=65536).contains(&sectorsize) {
        return Err(format!("implausible sector size {sectorsize} in the log's super block"));
    }
    Ok(Super { nr_entries: le64(b, 16), sectorsize })
}

/// Decodes one entry header sector.
fn parse_entry(b: &[u8], index: u64, log_offset: u64) -> Result<Entry, String> {
    let (sector, nr_sectors, flags, data_len) = (le64(b, 0), le64(b, 8), le64(b, 16), le64(b, 24));
    let known = FLUSH | FUA | DISCARD | MARK | METADATA;
    if flags & !known != 0 {
        return Err(format!("entry {index} at log byte {log_offset}: unknown flags {flags:#x}"));
    }
    let mark = if flags & MARK != 0 {
        let len = data_len as usize;
        if ENTRY_HEADER + len > b.len() {
            return Err(format!("entry {index}: mark text of {len} bytes overflows its sector"));
        }
        Some(String::from_utf8_lossy(&b[ENTRY_HEADER..ENTRY_HEADER + len]).into_owned())
    } else {
        // The kernel logs private data only for marks; anything else would be a newer format
        // whose layout this tool would get wrong.
        if data_len != 0 {
            return Err(format!("entry {index}: data_len {data_len} on a non-mark entry is not supported"));
        }
        None
    };
    Ok(Entry { index, log_offset, sector, nr_sectors, flags, mark })
}

/// Walks a log, handing every entry (and its data, for writes) to `f`, which returns false to
/// stop. `start` is an entry index and the byte offset of its header (from `resume=`), or None
/// for the first entry.
fn walk<R: Read + Seek>(
    log: R,
    start: Option<(u64, u64)>,
    with_data: bool,
    mut f: impl FnMut(&Super, &Entry, &[u8]) -> Result<bool, String>,
) -> Result<Super, String> {
    let mut log = BufReader::with_capacity(1 << 20, log);
    let mut first = vec![0u8; 512];
    log.read_exact(&mut first).map_err(|e| format!("reading the super block: {e}"))?;
    let s = parse_super(&first)?;
    let (first_index, mut off) = start.unwrap_or((0, s.sectorsize));
    if off < s.sectorsize || off % s.sectorsize != 0 {
        return Err(format!("resume offset {off} is not an entry boundary"));
    }
    log.seek(SeekFrom::Start(off)).map_err(|e| format!("seeking to log byte {off}: {e}"))?;
    let mut hdr = vec![0u8; s.sectorsize as usize];
    let mut data = Vec::new();
    for index in first_index..s.nr_entries {
        log.read_exact(&mut hdr).map_err(|e| format!("entry {index} at log byte {off}: {e}"))?;
        let e = parse_entry(&hdr, index, off)?;
        let len = e.data_len(&s) as usize;
        if with_data {
            data.resize(len, 0);
            log.read_exact(&mut data).map_err(|err| format!("data of entry {index}: {err}"))?;
        } else {
            log.seek_relative(len as i64).map_err(|err| format!("data of entry {index}: {err}"))?;
        }
        off += s.sectorsize + len as u64;
        if !f(&s, &e, &data)? {
            break;
        }
    }
    Ok(s)
}

fn open_log(path: &str) -> Result<File, String> {
    File::open(path).map_err(|e| format!("{path}: {e}"))
}

fn list(path: &str) -> Result<(), String> {
    let s = walk(open_log(path)?, None, false, |_, e, _| {
        let mut flags = String::new();
        for (bit, name) in [(FLUSH, "F"), (FUA, "U"), (DISCARD, "D"), (MARK, "M"), (METADATA, "m")] {
            if e.flags & bit != 0 {
                flags.push_str(name);
            }
        }
        match &e.mark {
            Some(m) => println!("{} mark {m}", e.index),
            None => println!("{} {} {} +{} {}", e.index, e.kind(), e.sector, e.nr_sectors, flags),
        }
        Ok(true)
    })?;
    eprintln!("{path}: {} entries, sector size {}", s.nr_entries, s.sectorsize);
    Ok(())
}

#[derive(Default, Debug, PartialEq, Eq)]
struct Replayed {
    /// Index and log offset of the entry after the mark.
    next: (u64, u64),
    applied: u64,
    bytes: u64,
    flushes: u64,
    fua: u64,
    discards: u64,
}

/// Applies the entries from `start` to the mark named `mark` through `write(offset, data)`; a
/// discard is applied as zeros (what the zero-initialised replay device then reads).
fn replay<R: Read + Seek>(
    log: R,
    mark: &str,
    start: Option<(u64, u64)>,
    mut write: impl FnMut(u64, &[u8]) -> Result<(), String>,
) -> Result<Replayed, String> {
    let mut r = Replayed::default();
    let mut found = false;
    let zeros = vec![0u8; 1 << 20];
    walk(log, start, true, |s, e, data| {
        if e.mark.as_deref() == Some(mark) {
            found = true;
            r.next = (e.index + 1, e.log_offset + s.sectorsize);
            return Ok(false);
        }
        if e.flags & MARK != 0 {
            return Ok(true);
        }
        r.applied += 1;
        if e.flags & FLUSH != 0 {
            r.flushes += 1;
        }
        if e.flags & FUA != 0 {
            r.fua += 1;
        }
        let mut at = e.sector * s.sectorsize;
        if e.flags & DISCARD != 0 {
            r.discards += 1;
            let mut left = e.nr_sectors * s.sectorsize;
            while left > 0 {
                let n = left.min(zeros.len() as u64) as usize;
                write(at, &zeros[..n])?;
                at += n as u64;
                left -= n as u64;
            }
        } else if !data.is_empty() {
            write(at, data)?;
            r.bytes += data.len() as u64;
        }
        Ok(true)
    })?;
    if !found {
        let from = start.map_or(0, |s| s.0);
        return Err(format!("no mark '{mark}' at or after entry {from}"));
    }
    Ok(r)
}

fn replay_cmd(path: &str, dev: &str, mark: &str, start: Option<(u64, u64)>) -> Result<(), String> {
    let out = OpenOptions::new().write(true).open(dev).map_err(|e| format!("{dev}: {e}"))?;
    let size = device_size(&out).map_err(|e| format!("size of {dev}: {e}"))?;
    let r = replay(open_log(path)?, mark, start, |at, data| {
        if at + data.len() as u64 > size {
            return Err(format!("a logged write at byte {at} (+{}) ends past the end of {dev} ({size})", data.len()));
        }
        out.write_all_at(data, at).map_err(|e| format!("writing {dev} at byte {at}: {e}"))
    })?;
    // The checks read the device through other block devices (dm snapshots), not this page cache.
    out.sync_all().map_err(|e| format!("fsync {dev}: {e}"))?;
    println!(
        "resume={}:{} applied={} bytes={} flushes={} fua={} discards={}",
        r.next.0, r.next.1, r.applied, r.bytes, r.flushes, r.fua, r.discards
    );
    Ok(())
}

fn device_size(f: &File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    // Works for block devices, whose metadata length is 0.
    let mut f = f;
    f.seek(SeekFrom::End(0))
}

fn usage() -> String {
    "usage: log_writes_replay list LOG\n       log_writes_replay replay LOG DEV --to-mark NAME [--resume INDEX:OFFSET]"
        .into()
}

fn run(args: &[String]) -> Result<(), String> {
    match args.first().map(String::as_str) {
        Some("list") if args.len() == 2 => list(&args[1]),
        Some("replay") if args.len() >= 5 => {
            let (mut mark, mut start) = (None, None);
            let mut i = 3;
            while i < args.len() {
                match (args[i].as_str(), args.get(i + 1)) {
                    ("--to-mark", Some(v)) => mark = Some(v.clone()),
                    ("--resume", Some(v)) => {
                        let bad = || format!("--resume {v}: not INDEX:OFFSET");
                        let (i, o) = v.split_once(':').ok_or_else(bad)?;
                        start = Some((i.parse().map_err(|_| bad())?, o.parse().map_err(|_| bad())?));
                    }
                    _ => return Err(usage()),
                }
                i += 2;
            }
            let mark = mark.ok_or_else(usage)?;
            replay_cmd(&args[1], &args[2], &mark, start)
        }
        _ => Err(usage()),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("log_writes_replay: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a log as the kernel lays it out, for a device with `ss`-byte sectors.
    fn build(ss: usize, entries: &[(u64, u64, u64, Vec<u8>, &str)]) -> Vec<u8> {
        let mut log = vec![0u8; ss];
        log[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        log[8..16].copy_from_slice(&1u64.to_le_bytes());
        log[16..24].copy_from_slice(&(entries.len() as u64).to_le_bytes());
        log[24..28].copy_from_slice(&(ss as u32).to_le_bytes());
        for (sector, nr, flags, data, mark) in entries {
            let mut h = vec![0u8; ss];
            h[0..8].copy_from_slice(&sector.to_le_bytes());
            h[8..16].copy_from_slice(&nr.to_le_bytes());
            h[16..24].copy_from_slice(&flags.to_le_bytes());
            h[24..32].copy_from_slice(&(mark.len() as u64).to_le_bytes());
            h[32..32 + mark.len()].copy_from_slice(mark.as_bytes());
            log.extend_from_slice(&h);
            log.extend_from_slice(data);
        }
        log
    }

    fn apply(log: &[u8], mark: &str, start: Option<(u64, u64)>, dev: &mut [u8]) -> Result<Replayed, String> {
        replay(std::io::Cursor::new(log), mark, start, |at, d| {
            dev[at as usize..at as usize + d.len()].copy_from_slice(d);
            Ok(())
        })
    }

    #[test]
    fn replays_up_to_a_mark_then_on_from_it() {
        let log = build(
            512,
            &[
                (0, 1, 0, vec![1; 512], ""),
                (2, 2, 0, vec![2; 1024], ""),
                (0, 0, FLUSH, vec![], ""),
                (0, 0, MARK, vec![], "one"),
                (1, 1, FUA, vec![3; 512], ""),
                (0, 2, DISCARD, vec![], ""),
                (0, 0, MARK, vec![], "two"),
            ],
        );
        let mut dev = vec![9u8; 2048];
        let r = apply(&log, "one", None, &mut dev).unwrap();
        // The super block, 4 headers before the mark and 3 data sectors, then the mark's header.
        assert_eq!(r, Replayed { next: (4, 8 * 512), applied: 3, bytes: 1536, flushes: 1, ..Default::default() });
        assert_eq!(&dev[..512], &[1; 512][..]);
        assert_eq!(&dev[512..1024], &[9; 512][..]);
        assert_eq!(&dev[1024..], &[2; 1024][..]);
        let r = apply(&log, "two", Some(r.next), &mut dev).unwrap();
        assert_eq!(r, Replayed { next: (7, 12 * 512), applied: 2, bytes: 512, fua: 1, discards: 1, ..Default::default() });
        assert_eq!(&dev[..1024], &[0; 1024][..], "the discard zeroes what it covers");
        assert_eq!(&dev[1024..], &[2; 1024][..]);
    }

    #[test]
    fn four_kib_sectors_and_listing_kinds() {
        let log = build(4096, &[(3, 1, FUA | METADATA, vec![7; 4096], ""), (0, 0, MARK, vec![], "m")]);
        let mut seen = Vec::new();
        let s = walk(std::io::Cursor::new(&log), None, true, |_, e, d| {
            seen.push((e.kind(), e.sector, d.len(), e.mark.clone(), e.log_offset));
            Ok(true)
        })
        .unwrap();
        assert_eq!(s, Super { nr_entries: 2, sectorsize: 4096 });
        assert_eq!(seen, vec![("write", 3, 4096, None, 4096), ("mark", 0, 0, Some("m".into()), 12288)]);
        // Listing skips the data instead of reading it, and must land on the same headers.
        let mut offsets = Vec::new();
        walk(std::io::Cursor::new(&log), None, false, |_, e, d| {
            offsets.push((e.log_offset, d.len()));
            Ok(true)
        })
        .unwrap();
        assert_eq!(offsets, vec![(4096, 0), (12288, 0)]);
    }

    #[test]
    fn refuses_what_it_does_not_understand() {
        let mut dev = vec![0u8; 512];
        let log = build(512, &[(0, 0, MARK, vec![], "a")]);
        assert!(apply(&log, "b", None, &mut dev).unwrap_err().contains("no mark 'b'"));
        assert!(apply(&log, "a", Some((1, 1024)), &mut dev).is_err(), "the mark is before --resume");
        assert!(apply(&log, "a", Some((0, 100)), &mut dev).unwrap_err().contains("entry boundary"));
        let mut bad = log.clone();
        bad[0] ^= 1;
        assert!(apply(&bad, "a", None, &mut dev).unwrap_err().contains("magic"));
        let odd = build(512, &[(0, 0, 1 << 9, vec![], "")]);
        assert!(apply(&odd, "a", None, &mut dev).unwrap_err().contains("unknown flags"));
        // The kernel updates the entry count lazily: a log cut short must not be read past its end.
        let short = &log[..log.len() - 1];
        assert!(apply(short, "a", None, &mut dev).unwrap_err().contains("entry 0"));
    }
}
