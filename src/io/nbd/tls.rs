//! TLS for the NBD target: the client side of `NBD_OPT_STARTTLS`, with rustls.
//!
//! rustls (with the aws-lc-rs provider) rather than OpenSSL bindings or kernel TLS: it is memory
//! safe, needs no system library, and its connection is a plain state machine (bytes in,
//! bytes out), which the target drives from its own io_uring exactly as it drives the bare
//! socket. Kernel TLS would keep the data path in the kernel, but it needs `CONFIG_TLS`, which
//! common kernels (this project's own CI host among them) lack, and rustls's AES-GCM keeps
//! pace anyway (docs/security.md has the measurement). What rustls lacks is external
//! pre-shared keys: `tls-type=psk` is refused with that reason.
//!
//! Policy: TLS 1.2 or 1.3, the provider's safe defaults; the server's certificate is always
//! verified against the CA file given (or the system's trust store) and the name in the URI
//! (or its `tls-hostname`); session resumption is off, so every connection, reconnects
//! included, verifies the certificate afresh.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{CertificateError, ClientConfig, ClientConnection};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The files of the TLS client. Without `ca`, the system's trust store is used; `cert` and
/// `key` (both or neither) identify the client to servers that ask (mutual TLS).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TlsFiles {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

impl TlsFiles {
    pub fn is_empty(&self) -> bool {
        self.ca.is_none() && self.cert.is_none() && self.key.is_none()
    }
}

/// A TLS client ready to connect: its configuration and the name the server's certificate
/// must carry.
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsClient({:?})", self.name)
    }
}

/// Reads a private key file, refusing one that other users may access or its group may write,
/// or that belongs to another user than root or the one this process runs as. The checks are
/// made on the opened file (fstat), so the file read is the file checked.
pub fn read_key(key: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let mut f = std::fs::File::open(key).map_err(|e| format!("TLS key {}: {e}", key.display()))?;
    let m = f.metadata().map_err(|e| format!("TLS key {}: {e}", key.display()))?;
    let mode = m.permissions().mode() & 0o777;
    if mode & 0o027 != 0 {
        return Err(format!(
            "TLS key {} is open to other users or writable by its group (mode {mode:04o}): a private \
             key must not be; fix it with: chmod o-rwx,g-w {}",
            key.display(),
            key.display()
        ));
    }
    let me = nix::unistd::geteuid().as_raw();
    if m.uid() != 0 && m.uid() != me {
        return Err(format!(
            "TLS key {} belongs to user {}: a private key must belong to root or to the user the \
             daemon runs as ({me}); fix it with: chown {me} {}",
            key.display(),
            m.uid(),
            key.display()
        ));
    }
    let mut pem = Vec::new();
    f.read_to_end(&mut pem).map_err(|e| format!("TLS key {}: {e}", key.display()))?;
    Ok(pem)
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{what} {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{what} {}: not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {}: no certificate in it (expected PEM: -----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certs)
}

impl TlsClient {
    /// Loads `files` and sets up a client that checks the server's certificate for `name`.
    /// Errors name the file, the problem and the fix.
    pub fn new(files: &TlsFiles, name: &str) -> Result<TlsClient, String> {
        let mut roots = rustls::RootCertStore::empty();
        match &files.ca {
            Some(ca) => {
                for c in read_certs(ca, "TLS CA file")? {
                    roots.add(c).map_err(|e| format!("TLS CA file {}: a certificate in it is unusable: {e}", ca.display()))?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err("no --tls-ca given and no CA certificate in the system's trust store: \
                                give the CA that signed the server's certificate with --tls-ca FILE"
                        .into());
                }
            }
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS set-up: {e}"))?
            .with_root_certificates(roots);
        let mut config = match (&files.cert, &files.key) {
            (Some(cert), Some(key)) => {
                let pem = read_key(key)?;
                let chain = read_certs(cert, "TLS client certificate")?;
                let key_der = PrivateKeyDer::from_pem_slice(&pem)
                    .map_err(|e| format!("TLS key {}: not a PEM private key: {e}", key.display()))?;
                builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                    format!(
                        "TLS client certificate {} and key {} do not go together: {e}",
                        cert.display(),
                        key.display()
                    )
                })?
            }
            (None, None) => builder.with_no_client_auth(),
            (Some(_), None) => return Err("--tls-cert needs its private key: add --tls-key FILE".into()),
            (None, Some(_)) => return Err("--tls-key needs its certificate: add --tls-cert FILE".into()),
        };
        config.resumption = rustls::client::Resumption::disabled();
        let name = ServerName::try_from(name.to_string())
            .map_err(|e| format!("{name:?} cannot be checked against a certificate: {e}"))?;
        Ok(TlsClient { config: Arc::new(config), name })
    }

    /// A new client connection (the handshake starts with its first I/O).
    pub fn connection(&self) -> io::Result<ClientConnection> {
        let mut c = ClientConnection::new(self.config.clone(), self.name.clone())
            .map_err(|e| io::Error::other(format!("TLS set-up: {e}")))?;
        // The target bounds what it hands over at once (a send batch); rustls must take it
        // all, so that a request is never half encrypted.
        c.set_buffer_limit(None);
        Ok(c)
    }
}

/// A TLS problem as the user sees it: what is wrong, and what fixes it. Travels inside an
/// `io::Error` (kind `PermissionDenied`); the target's open puts the fix where errors put
/// theirs.
#[derive(Debug)]
pub struct TlsProblem {
    pub problem: String,
    pub fix: String,
}

impl std::fmt::Display for TlsProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}; {}", self.problem, self.fix)
    }
}

impl std::error::Error for TlsProblem {}

impl TlsProblem {
    pub fn io(problem: impl Into<String>, fix: impl Into<String>) -> io::Error {
        io::Error::new(io::ErrorKind::PermissionDenied, TlsProblem { problem: problem.into(), fix: fix.into() })
    }

    /// The problem inside `e`, if it carries one.
    pub fn of(e: &io::Error) -> Option<&TlsProblem> {
        e.get_ref().and_then(|x| x.downcast_ref::<TlsProblem>())
    }
}

/// What a TLS error means for the user, and what fixes it.
pub fn explain(e: &rustls::Error) -> io::Error {
    use rustls::AlertDescription as A;
    let (problem, fix): (String, &str) = match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => (
                format!("the server's certificate has expired ({e})"),
                "renew it on the server (or check this machine's clock)",
            ),
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => (
                format!("the server's certificate is not valid yet ({e})"),
                "check the clocks of this machine and of the server",
            ),
            CertificateError::UnknownIssuer => (
                "the server's certificate is not signed by a trusted CA".into(),
                "give the CA that signed it with --tls-ca FILE",
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => (
                format!("the server's certificate is not valid for the name connected to ({e})"),
                "connect by a name the certificate carries (a subjectAltName), or give that name with ?tls-hostname=NAME",
            ),
            CertificateError::BadSignature => (
                "the server's certificate has a bad signature".into(),
                "it is forged or corrupt: check who answers at that address",
            ),
            _ => (format!("the server's certificate was refused: {e}"), "give the server a valid certificate"),
        },
        rustls::Error::AlertReceived(a @ (A::CertificateRequired | A::HandshakeFailure | A::BadCertificate)) => (
            format!("the server refused the TLS handshake (alert {a:?})"),
            "if it requires a client certificate, give one signed by a CA it trusts with --tls-cert FILE --tls-key FILE",
        ),
        rustls::Error::AlertReceived(a @ (A::UnknownCA | A::CertificateUnknown | A::CertificateExpired)) => (
            format!("the server refused this client's certificate (alert {a:?})"),
            "give a certificate signed by a CA the server trusts (--tls-cert, --tls-key)",
        ),
        rustls::Error::PeerIncompatible(_) => (
            format!("the server's TLS is not compatible ({e})"),
            "it needs TLS 1.2 or 1.3 with a current cipher suite",
        ),
        _ => (format!("TLS: {e}"), "check the server's TLS set-up (its log says more)"),
    };
    TlsProblem::io(problem, fix)
}

/// An I/O error of a TLS connection (during the negotiation) as the user should see it: the
/// rustls error inside explained, or the connection ended without a word (what servers do to
/// a client whose certificate they wanted); `None` for other errors.
pub fn explain_io(e: &io::Error) -> Option<io::Error> {
    if let Some(r) = e.get_ref().and_then(|x| x.downcast_ref::<rustls::Error>()) {
        return Some(explain(r));
    }
    use io::ErrorKind as K;
    matches!(e.kind(), K::UnexpectedEof | K::ConnectionReset | K::BrokenPipe).then(|| {
        TlsProblem::io(
            format!("the server ended the TLS connection without a word ({e})"),
            "if it requires a client certificate, give one signed by a CA it trusts with --tls-cert FILE --tls-key FILE",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key is taken at 0600 and 0640, refused when others may touch it or its group write
    /// it, and when another user than root or this process's owns it.
    #[test]
    fn key_permissions() {
        let dir = tempfile::tempdir().expect("dir");
        let key = dir.path().join("key.pem");
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\n").expect("write");
        let chmod = |m: u32| std::fs::set_permissions(&key, std::fs::Permissions::from_mode(m)).expect("chmod");
        for ok in [0o600, 0o640, 0o400] {
            chmod(ok);
            assert!(read_key(&key).is_ok(), "{ok:o} refused");
        }
        for bad in [0o604, 0o620, 0o666, 0o601] {
            chmod(bad);
            let e = read_key(&key).expect_err("refused");
            assert!(e.contains("chmod o-rwx,g-w"), "{bad:o}: {e}");
        }
        chmod(0o600);
        // (Needs root, as the test suite does: another owner is made with chown.)
        nix::unistd::chown(&key, Some(nix::unistd::Uid::from_raw(54321)), None).expect("chown (run the tests as root)");
        let e = read_key(&key).expect_err("another user's key");
        assert!(e.contains("belongs to user 54321"), "{e}");
    }
}
