//! Checks the crash invariant of `docs/crash-safety.md` on media left by a power loss:
//! for every region, its bit is set in the bitmap OR source and target hold the same bytes.
//!
//! ```text
//! invariant_check SOURCE TARGET BITMAP
//! ```
//!
//! It reads the bitmap file by the documented layout (`src/io/bitmap.rs`: granularity at byte 32,
//! device size at 40, region count at 48, one bit per region from byte 4096, least significant
//! bit first), on purpose without the crate's code, so that it checks `ublk-mirror verify
//! --bitmap` as much as the media. Prints one summary line
//! `regions=N granularity=G dirty=D differing=X violations=V` and, for every region whose bit is
//! clear while source and target differ, a `VIOLATION` line with the region, its byte range and
//! the first differing byte. Exit status 1 if there is any violation, 2 on an error.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::process::ExitCode;

fn le64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

struct Bits {
    granularity: u64,
    device_size: u64,
    nregions: u64,
    bits: Vec<u8>,
}

impl Bits {
    fn parse(file: &[u8]) -> Result<Bits, String> {
        if file.len() < 4096 || &file[..8] != b"UBLKMIRB" {
            return Err("not a ublk-mirror bitmap".into());
        }
        let (granularity, device_size, nregions) = (le64(file, 32), le64(file, 40), le64(file, 48));
        if !granularity.is_power_of_two() || nregions != device_size.div_ceil(granularity) {
            return Err(format!(
                "inconsistent header: granularity {granularity}, size {device_size}, {nregions} regions"
            ));
        }
        let bits = file[4096..].to_vec();
        if (bits.len() as u64) * 8 < nregions {
            return Err(format!("{} bytes of bits for {nregions} regions", bits.len()));
        }
        Ok(Bits { granularity, device_size, nregions, bits })
    }
    fn set(&self, r: u64) -> bool {
        self.bits[(r / 8) as usize] & (1 << (r % 8)) != 0
    }
}

fn run(args: &[String]) -> Result<bool, String> {
    let [src, tgt, bm] = args else {
        return Err("usage: invariant_check SOURCE TARGET BITMAP".into());
    };
    let mut raw = Vec::new();
    File::open(bm).and_then(|mut f| f.read_to_end(&mut raw)).map_err(|e| format!("{bm}: {e}"))?;
    let b = Bits::parse(&raw).map_err(|e| format!("{bm}: {e}"))?;
    let open = |p: &String| -> Result<File, String> {
        let mut f = File::open(p).map_err(|e| format!("{p}: {e}"))?;
        let size = f.seek(SeekFrom::End(0)).map_err(|e| format!("{p}: {e}"))?;
        if size < b.device_size {
            return Err(format!("{p} is {size} bytes, the bitmap covers {}", b.device_size));
        }
        f.seek(SeekFrom::Start(0)).map_err(|e| format!("{p}: {e}"))?;
        Ok(f)
    };
    let (mut s, mut t) = (open(src)?, open(tgt)?);
    let g = b.granularity as usize;
    let (mut sb, mut tb) = (vec![0u8; g], vec![0u8; g]);
    let (mut dirty, mut differing, mut violations) = (0u64, 0u64, 0u64);
    for r in 0..b.nregions {
        let len = (b.device_size - r * b.granularity).min(b.granularity) as usize;
        s.read_exact(&mut sb[..len]).map_err(|e| format!("{src}, region {r}: {e}"))?;
        t.read_exact(&mut tb[..len]).map_err(|e| format!("{tgt}, region {r}: {e}"))?;
        let set = b.set(r);
        dirty += set as u64;
        if sb[..len] == tb[..len] {
            continue;
        }
        differing += 1;
        if !set {
            violations += 1;
            let first = (0..len).find(|&i| sb[i] != tb[i]).unwrap_or(0);
            let start = r * b.granularity;
            println!(
                "VIOLATION region {r} (bytes {start}..{}): bit clear, source and target differ \
                 from byte {} (source {:#04x}, target {:#04x})",
                start + len as u64,
                start + first as u64,
                sb[first],
                tb[first]
            );
        }
    }
    println!(
        "regions={} granularity={} dirty={dirty} differing={differing} violations={violations}",
        b.nregions, b.granularity
    );
    Ok(violations == 0)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("invariant_check: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_bits_least_significant_first() {
        let mut f = vec![0u8; 8192];
        f[..8].copy_from_slice(b"UBLKMIRB");
        f[32..40].copy_from_slice(&65536u64.to_le_bytes());
        f[40..48].copy_from_slice(&(10 * 65536u64).to_le_bytes());
        f[48..56].copy_from_slice(&10u64.to_le_bytes());
        f[4096] = 0b0000_0101;
        f[4097] = 0b0000_0010;
        let b = Bits::parse(&f).unwrap();
        let set: Vec<u64> = (0..10).filter(|&r| b.set(r)).collect();
        assert_eq!(set, vec![0, 2, 9]);
        f[48] = 11;
        assert!(Bits::parse(&f).is_err());
    }
}
