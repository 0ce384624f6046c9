//! NBD URIs, in the form qemu and nbdkit use:
//!
//! - `nbd://HOST[:PORT]/EXPORT` (TCP; the port defaults to 10809, an IPv6 address is written
//!   `[addr]`, the export may be empty: `nbd://HOST` or `nbd://HOST/`);
//! - `nbd+unix:///EXPORT?socket=PATH` (a Unix domain socket; the authority must be empty);
//! - `nbds://...` and `nbds+unix://...`: the same over TLS, which must then be negotiated (the
//!   NBD URI specification's schemes). Their query may carry the specification's TLS
//!   parameters: `tls-hostname=NAME` (the name the server's certificate must carry; needed over
//!   a Unix socket), `tls-type=x509` (the only kind supported) and `tls-verify-peer=1` (the
//!   server is always verified).
//!
//! The export and the socket path may be percent-encoded. [`NbdUri::normalized`] is the
//! canonical spelling (explicit port, absolute socket path), used to name the target;
//! [`NbdUri::identity`], the same without TLS, is its identity in the bitmap (a mirror may
//! move to TLS and back without a new full sync).

use std::fmt;
use std::path::PathBuf;

pub const DEFAULT_PORT: u16 = 10809;

const FORMS: &str = "expected nbd[s]://HOST[:PORT]/EXPORT or nbd[s]+unix:///EXPORT?socket=PATH";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A host name or address (IPv6 without brackets) and a port.
    Tcp { host: String, port: u16 },
    /// An absolute socket path.
    Unix(PathBuf),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    pub endpoint: Endpoint,
    pub export: String,
    /// TLS is required (`nbds`, `nbds+unix`).
    pub tls: bool,
    /// The name the server's certificate must carry, when it is not the URI's host.
    pub tls_hostname: Option<String>,
}

/// A URI that cannot be used, with the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UriError {
    pub uri: String,
    pub problem: String,
}

impl fmt::Display for UriError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad NBD URI {:?}: {} ({FORMS})", self.uri, self.problem)
    }
}

impl std::error::Error for UriError {}

/// The longest socket path `sockaddr_un` holds (108 bytes with the terminating NUL).
const SUN_PATH_MAX: usize = 107;

impl NbdUri {
    pub fn parse(uri: &str) -> Result<NbdUri, UriError> {
        let bad = |problem: String| UriError { uri: uri.to_string(), problem };
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| bad("no scheme".into()))?;
        let (unix, tls) = match scheme.to_ascii_lowercase().as_str() {
            "nbd" => (false, false),
            "nbd+unix" => (true, false),
            "nbds" => (false, true),
            "nbds+unix" => (true, true),
            s => return Err(bad(format!("unsupported scheme {s:?}"))),
        };
        if rest.contains('#') {
            return Err(bad("a fragment (#...) is not allowed".into()));
        }
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = decode(path).map_err(|p| bad(format!("export name: {p}")))?;
        if export.len() > 4096 {
            return Err(bad("export name longer than 4096 bytes".into()));
        }
        let mut socket = None;
        let mut tls_hostname = None;
        for kv in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let v = decode(v).map_err(|p| bad(format!("{k}: {p}")))?;
            let once = |seen: bool| if seen { Err(bad(format!("{k} given twice"))) } else { Ok(()) };
            if k.starts_with("tls-") && !tls {
                return Err(bad(format!("{k} is a TLS parameter: use the nbds or nbds+unix scheme")));
            }
            match k {
                "socket" => {
                    once(socket.is_some())?;
                    socket = Some(v);
                }
                "tls-hostname" => {
                    once(tls_hostname.is_some())?;
                    if v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':')) {
                        return Err(bad(format!("tls-hostname {v:?} is not a host name or address")));
                    }
                    tls_hostname = Some(v.to_ascii_lowercase());
                }
                "tls-type" => match v.as_str() {
                    "x509" => {}
                    "psk" => {
                        return Err(bad(
                            "tls-type=psk: pre-shared keys are not supported (the TLS library, rustls, has no \
                             external PSK); give the server an X.509 certificate"
                                .into(),
                        ))
                    }
                    "anon" => {
                        return Err(bad(
                            "tls-type=anon: anonymous TLS authenticates nobody and is refused; give the \
                             server an X.509 certificate"
                                .into(),
                        ))
                    }
                    _ => return Err(bad(format!("tls-type {v:?} (only x509)"))),
                },
                "tls-verify-peer" => match v.as_str() {
                    "1" | "true" => {}
                    _ => {
                        return Err(bad(format!(
                            "tls-verify-peer={v}: the server's certificate is always verified; give the \
                             CA that signed it with --tls-ca"
                        )))
                    }
                },
                _ => {
                    return Err(bad(format!(
                        "unknown query parameter {kv:?} (socket=PATH, tls-hostname=NAME, tls-type=x509, tls-verify-peer=1)"
                    )))
                }
            }
        }
        let endpoint = if unix {
            if !authority.is_empty() {
                return Err(bad(format!(
                    "nbd+unix takes no host ({authority:?}): write three slashes, nbd+unix:///EXPORT?socket=PATH"
                )));
            }
            let socket = socket.ok_or_else(|| bad("no socket: add ?socket=PATH".into()))?;
            if socket.is_empty() {
                return Err(bad("empty socket path".into()));
            }
            let mut path = PathBuf::from(socket);
            if path.is_relative() {
                let cwd = std::env::current_dir()
                    .map_err(|e| bad(format!("relative socket path and no current directory: {e}")))?;
                path = cwd.join(path);
            }
            if path.as_os_str().len() > SUN_PATH_MAX {
                return Err(bad(format!(
                    "socket path is {} bytes long; a Unix socket path holds at most {SUN_PATH_MAX}",
                    path.as_os_str().len()
                )));
            }
            Endpoint::Unix(path)
        } else {
            if socket.is_some() {
                return Err(bad("socket=PATH is only allowed with nbd+unix (or nbds+unix)".into()));
            }
            if authority.contains('@') {
                return Err(bad("user information (...@) is not supported".into()));
            }
            let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
                let (addr, after) =
                    v6.split_once(']').ok_or_else(|| bad("IPv6 address without its closing ']'".into()))?;
                if addr.parse::<std::net::Ipv6Addr>().is_err() {
                    return Err(bad(format!("{addr:?} is not an IPv6 address")));
                }
                let port = match after {
                    "" => None,
                    p => Some(p.strip_prefix(':').ok_or_else(|| bad(format!("unexpected {p:?} after ']'")))?),
                };
                (addr.to_string(), port)
            } else {
                match authority.rsplit_once(':') {
                    Some((h, _)) if h.contains(':') => {
                        return Err(bad("an IPv6 address must be written in brackets: nbd://[ADDR]:PORT/".into()))
                    }
                    Some((h, p)) => (h.to_ascii_lowercase(), Some(p)),
                    None => (authority.to_ascii_lowercase(), None),
                }
            };
            if host.is_empty() {
                return Err(bad("no host".into()));
            }
            if !host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':')) {
                return Err(bad(format!("{host:?} is not a host name or address")));
            }
            let port = match port {
                None => DEFAULT_PORT,
                Some(p) => match p.parse::<u16>() {
                    Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
                    _ => return Err(bad(format!("bad port {p:?} (1 to 65535)"))),
                },
            };
            Endpoint::Tcp { host, port }
        };
        if unix && tls && tls_hostname.is_none() {
            return Err(bad(
                "nbds+unix needs the name in the server's certificate: add &tls-hostname=NAME".into(),
            ));
        }
        Ok(NbdUri { endpoint, export, tls, tls_hostname })
    }

    /// The canonical spelling: same server, export and TLS <=> same string.
    pub fn normalized(&self) -> String {
        let mut s = self.spelled(self.tls);
        if let Some(h) = &self.tls_hostname {
            s.push(if s.contains('?') { '&' } else { '?' });
            s.push_str(&format!("tls-hostname={}", encode(h)));
        }
        s
    }

    /// [`Self::normalized`] without TLS: the export's identity (the same data whether it is
    /// reached over TLS or not).
    pub fn identity(&self) -> String {
        self.spelled(false)
    }

    fn spelled(&self, tls: bool) -> String {
        let s = if tls { "s" } else { "" };
        let export = encode(&self.export);
        match &self.endpoint {
            Endpoint::Tcp { host, port } if host.contains(':') => format!("nbd{s}://[{host}]:{port}/{export}"),
            Endpoint::Tcp { host, port } => format!("nbd{s}://{host}:{port}/{export}"),
            Endpoint::Unix(p) => {
                format!("nbd{s}+unix:///{export}?socket={}", encode(&p.to_string_lossy()))
            }
        }
    }

    /// The name the server's certificate must carry: `tls-hostname`, or the URI's host.
    pub fn tls_name(&self) -> Option<&str> {
        match (&self.tls_hostname, &self.endpoint) {
            (Some(h), _) => Some(h),
            (None, Endpoint::Tcp { host, .. }) => Some(host),
            (None, Endpoint::Unix(_)) => None,
        }
    }

    /// Where the server is, for messages: `HOST:PORT` or the socket path.
    pub fn server(&self) -> String {
        match &self.endpoint {
            Endpoint::Tcp { host, port } if host.contains(':') => format!("[{host}]:{port}"),
            Endpoint::Tcp { host, port } => format!("{host}:{port}"),
            Endpoint::Unix(p) => p.display().to_string(),
        }
    }
}

fn decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            // Two hex digits exactly (from_str_radix alone would take "+f").
            let hex = b.get(i + 1..i + 3).filter(|h| h.iter().all(u8::is_ascii_hexdigit)).and_then(|h| std::str::from_utf8(h).ok());
            match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(v) => out.push(v),
                None => return Err(format!("bad percent-escape at byte {i}")),
            }
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    let out = String::from_utf8(out).map_err(|_| "not UTF-8 after percent-decoding".to_string())?;
    if out.contains('\0') {
        return Err("contains a NUL byte".into());
    }
    Ok(out)
}

/// Percent-encodes everything but unreserved characters and '/'.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> NbdUri {
        NbdUri { endpoint: Endpoint::Tcp { host: host.into(), port }, export: export.into(), tls: false, tls_hostname: None }
    }

    #[test]
    fn tcp_forms() {
        assert_eq!(NbdUri::parse("nbd://localhost/disk").unwrap(), tcp("localhost", 10809, "disk"));
        assert_eq!(NbdUri::parse("nbd://127.0.0.1:1234/a/b").unwrap(), tcp("127.0.0.1", 1234, "a/b"));
        assert_eq!(NbdUri::parse("nbd://Host.Example").unwrap(), tcp("host.example", 10809, ""));
        assert_eq!(NbdUri::parse("nbd://h/").unwrap(), tcp("h", 10809, ""));
        assert_eq!(NbdUri::parse("NBD://h:1/x%20y").unwrap(), tcp("h", 1, "x y"));
        assert_eq!(NbdUri::parse("nbd://[::1]:99/e").unwrap(), tcp("::1", 99, "e"));
        assert_eq!(NbdUri::parse("nbd://[fe80::1]/").unwrap(), tcp("fe80::1", 10809, ""));
    }

    #[test]
    fn unix_forms() {
        let u = NbdUri::parse("nbd+unix:///exp?socket=/run/nbd.sock").unwrap();
        assert_eq!(u.endpoint, Endpoint::Unix("/run/nbd.sock".into()));
        assert_eq!(u.export, "exp");
        let u = NbdUri::parse("nbd+unix://?socket=/a%20b").unwrap();
        assert_eq!(u.endpoint, Endpoint::Unix("/a b".into()));
        assert_eq!(u.export, "");
        let u = NbdUri::parse("nbd+unix:///?socket=rel.sock").unwrap();
        match u.endpoint {
            Endpoint::Unix(p) => assert!(p.is_absolute() && p.ends_with("rel.sock")),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn normalized_is_canonical() {
        let a = NbdUri::parse("nbd://LOCALHOST/x y").unwrap().normalized();
        let b = NbdUri::parse("nbd://localhost:10809/x%20y").unwrap().normalized();
        assert_eq!(a, b);
        assert_eq!(a, "nbd://localhost:10809/x%20y");
        assert_eq!(NbdUri::parse("nbd://[::1]/").unwrap().normalized(), "nbd://[::1]:10809/");
        assert_eq!(
            NbdUri::parse("nbd+unix:///e?socket=/s%3Fq").unwrap().normalized(),
            "nbd+unix:///e?socket=/s%3Fq"
        );
        // The normalized form parses back to the same thing.
        for s in ["nbd://h:5/a%25b", "nbd+unix:///x?socket=/t%26u"] {
            let u = NbdUri::parse(s).unwrap();
            assert_eq!(NbdUri::parse(&u.normalized()).unwrap(), u);
        }
    }

    #[test]
    fn tls_forms() {
        let u = NbdUri::parse("nbds://Host:1234/e").unwrap();
        assert!(u.tls && u.tls_hostname.is_none());
        assert_eq!(u.tls_name(), Some("host"));
        assert_eq!(u.normalized(), "nbds://host:1234/e");
        assert_eq!(u.identity(), "nbd://host:1234/e");
        assert_eq!(u.identity(), NbdUri::parse("nbd://host:1234/e").unwrap().normalized());
        let u = NbdUri::parse("nbds://127.0.0.1/e?tls-hostname=Server.Example&tls-type=x509&tls-verify-peer=1").unwrap();
        assert_eq!(u.tls_name(), Some("server.example"));
        assert_eq!(u.normalized(), "nbds://127.0.0.1:10809/e?tls-hostname=server.example");
        let u = NbdUri::parse("NBDS+UNIX:///e?socket=/s&tls-hostname=srv").unwrap();
        assert_eq!(u.normalized(), "nbds+unix:///e?socket=/s&tls-hostname=srv");
        assert_eq!(u.identity(), "nbd+unix:///e?socket=/s");
        for s in ["nbds://h:5/a", "nbds://h:5/a?tls-hostname=x.y", "nbds+unix:///x?socket=/t&tls-hostname=n"] {
            let u = NbdUri::parse(s).unwrap();
            assert_eq!(NbdUri::parse(&u.normalized()).unwrap(), u);
        }
        assert!(!NbdUri::parse("nbd://h/e").unwrap().tls);
    }

    #[test]
    fn bad_uris_say_why() {
        for (uri, why) in [
            ("nbd:/x", "no scheme"),
            ("http://h/x", "unsupported scheme"),
            ("nbds+unix:///x?socket=/s", "tls-hostname=NAME"),
            ("nbd://h/x?tls-hostname=a", "use the nbds"),
            ("nbds://h/x?tls-type=psk", "pre-shared keys are not supported"),
            ("nbds://h/x?tls-type=anon", "authenticates nobody"),
            ("nbds://h/x?tls-verify-peer=0", "always verified"),
            ("nbds://h/x?tls-hostname=a&tls-hostname=b", "twice"),
            ("nbds://h/x?tls-hostname=a%20b", "not a host name"),
            ("nbd:///x", "no host"),
            ("nbd://h:0/x", "bad port"),
            ("nbd://h:70000/x", "bad port"),
            ("nbd://h:+1/x", "bad port"),
            ("nbd://h:/x", "bad port"),
            ("nbd://::1/x", "brackets"),
            ("nbd://[::1/x", "closing"),
            ("nbd://[zz]/x", "not an IPv6"),
            ("nbd://[::1]x/", "unexpected"),
            ("nbd://h/x?socket=/s", "only allowed with nbd+unix"),
            ("nbd://h/x?sock=/s", "unknown query"),
            ("nbd://u@h/x", "user information"),
            ("nbd://h/x#f", "fragment"),
            ("nbd://h/%zz", "percent-escape"),
            ("nbd://h/%+f", "percent-escape"),
            ("nbd://h/%00", "NUL"),
            ("nbd://h w/x", "not a host"),
            ("nbd+unix://h/x?socket=/s", "takes no host"),
            ("nbd+unix:///x", "no socket"),
            ("nbd+unix:///x?socket=", "empty socket"),
            ("nbd+unix:///x?sock=/s", "unknown query"),
            ("nbd+unix:///x?socket=/a&socket=/b", "twice"),
        ] {
            let e = NbdUri::parse(uri).expect_err(uri);
            let msg = e.to_string();
            assert!(msg.contains(why), "{uri}: {msg}");
            assert!(msg.contains("nbd[s]+unix:///EXPORT?socket=PATH"), "{uri}: {msg}");
        }
        let long = format!("nbd+unix:///x?socket=/{}", "a".repeat(200));
        assert!(NbdUri::parse(&long).unwrap_err().to_string().contains("at most 107"));
    }
}
