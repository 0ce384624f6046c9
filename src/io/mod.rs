//! Input and output: the files, devices and servers the mirror reads and writes, all through
//! io_uring. Nothing here decides what to copy or when ([`crate::core`] does); these modules
//! carry it out.
//!
//! - [`uring`]: ring set-up and the encoding of who owns a completion;
//! - [`backing`]: a source or target file or block device (size, block sizes, O_DIRECT, holes);
//! - [`bitmap`]: the persistent dirty bitmap file, memory-mapped, with its header;
//! - [`sigbus`]: surviving a mapped bitmap file that shrinks under the daemon;
//! - [`target`]: the target interface, and its file and block-device implementation;
//! - [`nbd`]: a target behind an NBD server, on the same ring;
//! - [`open_target`]: the target a user names, a path or an NBD URI (here, above both kinds).

pub mod backing;
pub mod bitmap;
pub mod nbd;
pub mod sigbus;
pub mod target;
pub mod uring;

/// True if `spec` names a network target (a URI) rather than a path.
pub fn is_uri(spec: &std::path::Path) -> bool {
    let s = spec.to_string_lossy();
    ["nbd://", "nbd+unix://", "nbds://", "nbds+unix://"].iter().any(|p| s.starts_with(p))
}

/// Opens a target: a file or block device path, or a network target URI (over TLS with
/// `tls`'s files if it asks for TLS).
pub fn open_target(
    spec: &std::path::Path,
    direct: backing::DirectMode,
    tls: &nbd::tls::TlsFiles,
) -> crate::Result<target::BoxTarget> {
    if is_uri(spec) {
        let uri = spec.to_str().ok_or_else(|| {
            crate::Error::config(format!("target {}: an NBD URI must be valid UTF-8", spec.display()))
        })?;
        return Ok(Box::new(nbd::NbdTarget::open(uri, tls)?));
    }
    check_no_tls(spec, tls)?;
    Ok(Box::new(target::open_file_target(spec, direct)?))
}

/// Refuses TLS files with a target that is a path: they would be ignored.
pub fn check_no_tls(spec: &std::path::Path, tls: &nbd::tls::TlsFiles) -> crate::Result<()> {
    if tls.is_empty() {
        return Ok(());
    }
    Err(crate::Error::config(format!(
        "target {}: TLS files (--tls-ca, --tls-cert, --tls-key) only apply to an nbds:// target",
        spec.display()
    )))
}

