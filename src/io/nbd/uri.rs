//! NBD URIs, in the form qemu and nbdkit use:
//!
//! - `nbd://HOST[:PORT]/EXPORT` (TCP; the port defaults to 10809, an IPv6 address is written
//!   `[addr]`, the export may be empty: `nbd://HOST` or `nbd://HOST/`);
//! - `nbd+unix:///EXPORT?socket=PATH` (a Unix domain socket; the authority must be empty).
//!
//! The export and the socket path may be percent-encoded. [`NbdUri::normalized`] is the
//! canonical spelling (explicit port, absolute socket path), used to name the target and as
//! its identity in the bitmap.

use std::fmt;
use std::path::PathBuf;

pub const DEFAULT_PORT: u16 = 10809;

const FORMS: &str = "expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH";

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
        let unix = match scheme.to_ascii_lowercase().as_str() {
            "nbd" => false,
            "nbd+unix" => true,
            "nbds" | "nbds+unix" => return Err(bad("TLS (nbds) is not supported".into())),
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
        let endpoint = if unix {
            if !authority.is_empty() {
                return Err(bad(format!(
                    "nbd+unix takes no host ({authority:?}): write three slashes, nbd+unix:///EXPORT?socket=PATH"
                )));
            }
            let query = query.ok_or_else(|| bad("no socket: add ?socket=PATH".into()))?;
            let mut socket = None;
            for kv in query.split('&').filter(|s| !s.is_empty()) {
                match kv.split_once('=') {
                    Some(("socket", v)) => {
                        if socket.is_some() {
                            return Err(bad("socket given twice".into()));
                        }
                        socket = Some(decode(v).map_err(|p| bad(format!("socket path: {p}")))?);
                    }
                    _ => return Err(bad(format!("unknown query parameter {kv:?} (only socket=PATH)"))),
                }
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
            if query.is_some() {
                return Err(bad("a query (?...) is only allowed with nbd+unix".into()));
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
        Ok(NbdUri { endpoint, export })
    }

    /// The canonical spelling: same server and export <=> same string.
    pub fn normalized(&self) -> String {
        let export = encode(&self.export);
        match &self.endpoint {
            Endpoint::Tcp { host, port } if host.contains(':') => format!("nbd://[{host}]:{port}/{export}"),
            Endpoint::Tcp { host, port } => format!("nbd://{host}:{port}/{export}"),
            Endpoint::Unix(p) => {
                format!("nbd+unix:///{export}?socket={}", encode(&p.to_string_lossy()))
            }
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
            let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
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
        NbdUri { endpoint: Endpoint::Tcp { host: host.into(), port }, export: export.into() }
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
    fn bad_uris_say_why() {
        for (uri, why) in [
            ("nbd:/x", "no scheme"),
            ("http://h/x", "unsupported scheme"),
            ("nbds://h/x", "TLS"),
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
            ("nbd://u@h/x", "user information"),
            ("nbd://h/x#f", "fragment"),
            ("nbd://h/%zz", "percent-escape"),
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
            assert!(msg.contains("nbd+unix:///EXPORT?socket=PATH"), "{uri}: {msg}");
        }
        let long = format!("nbd+unix:///x?socket=/{}", "a".repeat(200));
        assert!(NbdUri::parse(&long).unwrap_err().to_string().contains("at most 107"));
    }
}
