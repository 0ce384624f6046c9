//! Opening sources and targets: regular files and block devices, O_DIRECT where possible.

use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

/// How to use O_DIRECT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum DirectMode {
    /// O_DIRECT, or buffered I/O with a warning where the filesystem refuses it (tmpfs).
    Auto,
    /// O_DIRECT or an error.
    Always,
    /// Buffered I/O through the page cache (flushes still make data durable).
    Never,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    File,
    BlockDevice,
}

/// An open source or target.
#[derive(Debug)]
pub struct Backing {
    pub file: File,
    pub path: PathBuf,
    pub kind: Kind,
    pub size: u64,
    pub logical_block: u32,
    pub physical_block: u32,
    pub direct: bool,
    /// Identity for the bitmap header (absolute path as given, inode for files).
    pub identity: (String, u64),
}

nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
nix::ioctl_read_bad!(blksszget, 0x1268, libc::c_int);
nix::ioctl_read_bad!(blkpbszget, 0x127b, libc::c_uint);

impl Backing {
    /// Opens `path` as a `role` ("source" or "target").
    pub fn open(path: &Path, role: &'static str, writable: bool, direct: DirectMode) -> Result<Self> {
        let fail = |what: &str, fix: &str, e: std::io::Error| Error::Open {
            role,
            path: path.to_path_buf(),
            what: what.into(),
            fix: fix.into(),
            source: e,
        };
        let meta = std::fs::metadata(path).map_err(|e| {
            fail("cannot open", &format!("check the --{role} path: it must be an existing file or block device"), e)
        })?;
        let kind = if meta.file_type().is_block_device() {
            Kind::BlockDevice
        } else if meta.is_file() {
            Kind::File
        } else {
            return Err(fail(
                "cannot use",
                &format!("the {role} must be a regular file or a block device"),
                std::io::Error::from_raw_os_error(libc::EINVAL),
            ));
        };
        let open = |odirect: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(writable);
            if odirect {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(path)
        };
        let (file, direct_on) = open_direct(direct, open, || {
            log::warn!(
                "{role} {}: the filesystem refuses O_DIRECT; using buffered I/O (flushes still \
                 make data durable). Pass --direct never to silence this.",
                path.display()
            )
        });
        let file = file.map_err(|e| match e.raw_os_error() {
            Some(libc::EINVAL) if direct_on => fail(
                "cannot open with O_DIRECT",
                "its filesystem refuses direct I/O (tmpfs does): pass --direct auto or --direct never",
                e,
            ),
            Some(libc::EBUSY) => fail("cannot open", "it is in use (mounted, or held by another device)", e),
            Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => fail(
                "cannot open",
                if writable { "the target must be writable by this user" } else { "check the permissions" },
                e,
            ),
            _ => fail("cannot open", "check the path", e),
        })?;
        let fd = file.as_raw_fd();
        let (size, logical_block, physical_block) = match kind {
            Kind::File => (meta.len(), 512, 4096),
            Kind::BlockDevice => {
                let mut size = 0u64;
                let mut lbs: libc::c_int = 0;
                let mut pbs: libc::c_uint = 0;
                // SAFETY: fd is an open block device and each pointer is a valid, exclusively
                // borrowed integer of the type the ioctl writes.
                let r = unsafe { blkgetsize64(fd, &mut size) }
                    .and_then(|_| unsafe { blksszget(fd, &mut lbs) })
                    .and_then(|_| unsafe { blkpbszget(fd, &mut pbs) });
                r.map_err(|e| fail("cannot read the geometry of", "is it really a block device?", e.into()))?;
                (size, lbs.max(512) as u32, pbs.max(lbs as u32).max(512))
            }
        };
        if size == 0 {
            return Err(fail(
                "is empty",
                &format!("the {role} has size 0; give a file or device with data"),
                std::io::Error::from_raw_os_error(libc::EINVAL),
            ));
        }
        let identity = crate::io::bitmap::identity_of(path, &file, &meta);
        Ok(Backing {
            file,
            path: path.to_path_buf(),
            kind,
            size,
            logical_block,
            physical_block,
            direct: direct_on,
            identity,
        })
    }

    /// Another descriptor of the same open file (same flags and, for a block device, the
    /// same exclusive claim).
    pub fn try_clone(&self) -> std::io::Result<Backing> {
        Ok(Backing {
            file: self.file.try_clone()?,
            path: self.path.clone(),
            kind: self.kind,
            size: self.size,
            logical_block: self.logical_block,
            physical_block: self.physical_block,
            direct: self.direct,
            identity: self.identity.clone(),
        })
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Does `lseek(SEEK_DATA/SEEK_HOLE)` tell holes apart here? Block devices report all data.
    pub fn knows_holes(&self) -> bool {
        self.kind == Kind::File
    }

    /// The next data segment at or after `pos`, below `end`: `Some((data_start, data_end))`, or
    /// `None` if `[pos, end)` is all hole. Metadata only: no data is read.
    pub fn next_data(&self, pos: u64, end: u64) -> std::io::Result<Option<(u64, u64)>> {
        if !self.knows_holes() {
            return Ok(Some((pos, end)));
        }
        next_data(self.fd(), pos, end)
    }
}

/// [`Backing::next_data`] for any descriptor: SEEK_DATA, then SEEK_HOLE. A descriptor without
/// holes (a block device answers SEEK_DATA with `pos` itself) or without SEEK_DATA (EINVAL,
/// EOPNOTSUPP) is all data. It moves the descriptor's file offset, which nothing relies on:
/// all data I/O here uses explicit offsets.
pub fn next_data(fd: RawFd, pos: u64, end: u64) -> std::io::Result<Option<(u64, u64)>> {
    use nix::errno::Errno;
    use nix::unistd::{lseek, Whence};
    let Ok(at) = i64::try_from(pos) else { return Ok(None) };
    let data = match lseek(fd, at, Whence::SeekData) {
        Ok(d) => d as u64,
        Err(Errno::ENXIO) => return Ok(None),
        Err(Errno::EINVAL | Errno::EOPNOTSUPP) => return Ok(Some((pos, end))),
        Err(e) => return Err(e.into()),
    };
    if data >= end {
        return Ok(None);
    }
    let hole = lseek(fd, data as i64, Whence::SeekHole).map_or(end, |h| (h as u64).min(end));
    Ok(Some((data, hole)))
}

/// Applies `mode` with `open(odirect)`: returns the file and whether O_DIRECT is on. In `Auto`,
/// a filesystem that refuses O_DIRECT (EINVAL at open) gets buffered I/O and `warn` is called.
fn open_direct(
    mode: DirectMode,
    open: impl Fn(bool) -> std::io::Result<File>,
    warn: impl FnOnce(),
) -> (std::io::Result<File>, bool) {
    match mode {
        DirectMode::Never => (open(false), false),
        DirectMode::Always => (open(true), true),
        DirectMode::Auto => match open(true) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                warn();
                (open(false), false)
            }
            r => (r, true),
        },
    }
}

/// An aligned, zero-initialised buffer for O_DIRECT I/O. Large ones are anonymous mappings:
/// their pages are zero-filled by the kernel when first touched, so a 1 MiB copy buffer used for
/// 64 KiB copies costs 16 pages, not a 1 MiB memset (which made up most of a small resync's
/// fixed cost with 32 buffers).
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    mapped: bool,
}

/// Buffers at least this large are mapped rather than allocated.
const MAP_MIN: usize = 64 << 10;

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for AlignedBuf {}

pub const BUF_ALIGN: usize = 4096;

impl AlignedBuf {
    pub fn new(len: usize) -> Self {
        let len = len.max(BUF_ALIGN);
        if len >= MAP_MIN {
            use nix::sys::mman::{mmap_anonymous, MapFlags, ProtFlags};
            // len >= MAP_MIN, so it is not zero.
            if let Some(size) = std::num::NonZeroUsize::new(len) {
                // SAFETY: a fresh private anonymous mapping at an address the kernel picks; no
                // existing memory is affected.
                let mapped = unsafe {
                    mmap_anonymous(None, size, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_PRIVATE)
                };
                if let Ok(ptr) = mapped {
                    return AlignedBuf { ptr: ptr.cast(), len, mapped: true };
                }
            }
            // Out of address space or mappings: the allocator's answer follows.
        }
        // The layout is valid: BUF_ALIGN is a power of two and len is far below isize::MAX for
        // any buffer this program makes.
        let layout = std::alloc::Layout::from_size_align(len, BUF_ALIGN)
            .expect("buffer layout: power-of-two alignment and small size");
        // SAFETY: layout has non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len, mapped: false }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is a live allocation or mapping of len initialised (zeroed) bytes owned
        // by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}
impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}
impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: mapped in new() with exactly this length, and unmapped only here; no
            // reference into it outlives self.
            let _ = unsafe { nix::sys::mman::munmap(self.ptr.cast(), self.len) };
            return;
        }
        // SAFETY: allocated in new() with exactly this layout.
        unsafe {
            std::alloc::dealloc(
                self.ptr.as_ptr(),
                std::alloc::Layout::from_size_align_unchecked(self.len, BUF_ALIGN),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusing(odirect: bool) -> std::io::Result<File> {
        if odirect {
            Err(std::io::Error::from_raw_os_error(libc::EINVAL))
        } else {
            File::open("/dev/null")
        }
    }

    #[test]
    fn auto_falls_back_where_o_direct_is_refused() {
        let mut warned = false;
        let (f, direct) = open_direct(DirectMode::Auto, refusing, || warned = true);
        assert!(f.is_ok() && !direct && warned);
        let (f, direct) = open_direct(DirectMode::Always, refusing, || panic!("no warning"));
        assert_eq!(f.unwrap_err().raw_os_error(), Some(libc::EINVAL));
        assert!(direct, "the error is reported as an O_DIRECT refusal");
        let (f, direct) = open_direct(DirectMode::Never, refusing, || panic!("no warning"));
        assert!(f.is_ok() && !direct);
        // Other errors are not mistaken for a refusal.
        let (f, _) = open_direct(DirectMode::Auto, |_| Err(std::io::Error::from_raw_os_error(libc::ENOENT)), || panic!());
        assert_eq!(f.unwrap_err().raw_os_error(), Some(libc::ENOENT));
    }
}
