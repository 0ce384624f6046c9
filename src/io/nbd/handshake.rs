//! Connecting and the handshake: blocking, every step bounded by one deadline.
//!
//! Fixed newstyle negotiation only (oldstyle servers are refused), `NBD_OPT_GO` asking for
//! `NBD_INFO_EXPORT` and `NBD_INFO_BLOCK_SIZE`, with a fallback to `NBD_OPT_EXPORT_NAME` for
//! servers that do not know `NBD_OPT_GO`. Simple replies only: structured replies are not
//! negotiated, so the server answers every request with one 16-byte header (plus the data of
//! a successful read).
//!
//! With TLS, `NBD_OPT_STARTTLS` is the first option: a server that does not acknowledge it
//! ends the attempt (no fall back to clear text: nothing but the greeting and that option has
//! crossed the wire), and the rest, `NBD_OPT_GO` included, goes through TLS. There is no
//! `NBD_OPT_EXPORT_NAME` fallback over TLS (the protocol's advice: its zero padding depends on
//! a flag sent in clear, which a man in the middle could change).

use super::proto::*;
use super::tls::{explain_io, TlsClient, TlsProblem};
use super::uri::{Endpoint, NbdUri};
use rustls::ClientConnection;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// The largest option reply accepted during the handshake. The replies we ask for are a few
/// bytes; strings (errors, descriptions) are limited to 4096 bytes by the protocol.
pub const MAX_OPTION_REPLY: u32 = 64 << 10;
/// How many option replies one option may get before the server is deemed hostile.
const MAX_OPTION_REPLIES: usize = 256;
/// The largest export accepted: what a Linux offset (off_t) can address.
pub const MAX_EXPORT_SIZE: u64 = i64::MAX as u64;
/// Payload size limit used when the server gives none, or a larger one (the protocol's
/// default, and what every server accepts).
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;

pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }
    pub fn shutdown(&self) {
        // Errors (not connected any more) do not matter: the point is waking up I/O in flight.
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the server told about the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Export {
    pub size: u64,
    pub flags: u16,
    /// Size constraints: offsets and lengths are multiples of `min_block`; no read or write
    /// carries more than `max_payload` bytes (already capped to [`DEFAULT_MAX_PAYLOAD`] and
    /// rounded down to a multiple of `min_block`).
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_payload: u32,
}

impl Export {
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

fn proto_err(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Resolves the server's addresses (TCP); done once at open, so that a reconnect does not
/// wait for a name server.
pub fn resolve(uri: &NbdUri) -> io::Result<Vec<SocketAddr>> {
    match &uri.endpoint {
        Endpoint::Tcp { host, port } => {
            let addrs: Vec<SocketAddr> = (host.as_str(), *port).to_socket_addrs()?.collect();
            if addrs.is_empty() {
                return Err(io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address")));
            }
            Ok(addrs)
        }
        Endpoint::Unix(_) => Ok(Vec::new()),
    }
}

fn left(deadline: Instant) -> io::Result<Duration> {
    let d = deadline.saturating_duration_since(Instant::now());
    if d.is_zero() {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
    }
    Ok(d)
}

/// Connects before `deadline`.
pub fn connect(uri: &NbdUri, addrs: &[SocketAddr], deadline: Instant) -> io::Result<Stream> {
    match &uri.endpoint {
        Endpoint::Tcp { .. } => {
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address to connect to");
            for a in addrs {
                match TcpStream::connect_timeout(a, left(deadline)?) {
                    Ok(s) => {
                        // Requests are written whole; replies to small requests should not
                        // wait for Nagle's algorithm.
                        s.set_nodelay(true)?;
                        set_keepalive(s.as_raw_fd());
                        return Ok(Stream::Tcp(s));
                    }
                    Err(e) => last = e,
                }
            }
            Err(last)
        }
        Endpoint::Unix(p) => Ok(Stream::Unix(unix_connect(p, left(deadline)?)?)),
    }
}

/// Connects to a Unix socket, waiting at most `limit`. A Unix connect fails at once on a socket
/// nobody listens on, but blocks while the listener's backlog is full: a server that is frozen
/// (stopped, deadlocked) accepts nothing, and each retry leaves one more connection queued, so
/// without a bound the mirror's reset would block for ever. AF_UNIX connect honours
/// SO_SNDTIMEO (then fails with EAGAIN); the option is cleared again for the connection's I/O.
fn unix_connect(path: &std::path::Path, limit: Duration) -> io::Result<UnixStream> {
    use nix::sys::socket::{connect, setsockopt, socket, sockopt::SendTimeout, AddressFamily, SockFlag, SockType, UnixAddr};
    use nix::sys::time::TimeVal;
    let fd = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    let addr = UnixAddr::new(path)?;
    let tv = |d: Duration| TimeVal::new(d.as_secs() as libc::time_t, d.subsec_micros() as libc::suseconds_t);
    // At least 1 ms: a zero timeout means "no timeout".
    setsockopt(&fd, SendTimeout, &tv(limit.max(Duration::from_millis(1))))?;
    match connect(fd.as_raw_fd(), &addr) {
        Ok(()) => {}
        Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINPROGRESS) => {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "connecting: the server accepts no connection"));
        }
        Err(e) => return Err(e.into()),
    }
    setsockopt(&fd, SendTimeout, &tv(Duration::ZERO))?;
    Ok(UnixStream::from(fd))
}

/// TCP keepalive, so that a vanished host (no FIN, no RST) ends the connection in about a
/// minute instead of never. Best effort: a failure leaves the defaults.
fn set_keepalive(fd: RawFd) {
    let set = |level: libc::c_int, opt: libc::c_int, v: libc::c_int| {
        // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live local; `fd` is an
        // open socket owned by the caller.
        unsafe {
            libc::setsockopt(fd, level, opt, &v as *const libc::c_int as *const libc::c_void, std::mem::size_of::<libc::c_int>() as libc::socklen_t)
        }
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 30);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3);
}

/// What the handshake talks through: the socket, or TLS over it.
pub trait Chan: Read + Write {
    fn sock(&self) -> &Stream;
    fn is_tls(&self) -> bool {
        false
    }
}

impl Chan for Stream {
    fn sock(&self) -> &Stream {
        self
    }
}

/// TLS over the socket, for the blocking negotiation. Every socket read or write waits at
/// most the time left before `deadline`, checked before each one: rustls's own `Stream` loops
/// over socket reads without a clock, so a peer that trickles bytes could hold it past any
/// deadline (and a reset of the mirror's target must not block for more than about a second).
pub struct TlsChan<'a> {
    conn: &'a mut ClientConnection,
    sock: &'a mut Stream,
    deadline: Instant,
}

impl<'a> TlsChan<'a> {
    pub fn new(conn: &'a mut ClientConnection, sock: &'a mut Stream, deadline: Instant) -> Self {
        TlsChan { conn, sock, deadline }
    }

    /// Sends what the session has to send.
    ///
    /// A socket call with a timeout fails with EINTR instead of restarting when the thread is
    /// interrupted, by a signal or by io_uring's task work for a ring this thread owns (the
    /// mirror thread reconnects with its ring live): such a call is made again, and the deadline
    /// still bounds the whole.
    fn flush_tls(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            self.sock.set_write_timeout(Some(left(self.deadline)?))?;
            match self.conn.write_tls(self.sock) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => {
                    r?;
                }
            }
        }
        Ok(())
    }

    /// One step of the session: what it has to send, then one socket read, processed (an
    /// interrupted read is a step that read nothing: the caller steps again).
    fn step(&mut self) -> io::Result<()> {
        self.flush_tls()?;
        self.sock.set_read_timeout(Some(left(self.deadline)?))?;
        let n = match self.conn.read_tls(self.sock) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            r => r?,
        };
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the server closed the connection"));
        }
        // The rustls error stays inside (explain_io finds it).
        self.conn.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok(())
    }

    /// Runs the handshake to its end.
    fn handshake(&mut self) -> io::Result<()> {
        while self.conn.is_handshaking() {
            self.step()?;
        }
        self.flush_tls()
    }
}

impl Read for TlsChan<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.step()?,
                r => return r,
            }
        }
    }
}

impl Write for TlsChan<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.conn.writer().write(buf)?;
        self.flush_tls()?;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.flush_tls()
    }
}

impl Chan for TlsChan<'_> {
    fn sock(&self) -> &Stream {
        self.sock
    }
    fn is_tls(&self) -> bool {
        true
    }
}

/// An I/O error of the handshake, with what it was doing; a TLS error explained.
fn io_context(s: &impl Chan, e: io::Error, what: &str) -> io::Error {
    if let Some(e) = s.is_tls().then(|| explain_io(&e)).flatten() {
        return e;
    }
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Reads exactly `buf.len()` bytes before `deadline` (each read waits at most the time left).
fn read_by(s: &mut impl Chan, buf: &mut [u8], deadline: Instant, what: &str) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        let t = left(deadline).map_err(|_| timeout(what))?;
        s.sock().set_read_timeout(Some(t))?;
        match s.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the server closed the connection while sending {what}"),
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(timeout(what))
            }
            Err(e) => return Err(io_context(s, e, &format!("reading {what}"))),
        }
    }
    Ok(())
}

fn timeout(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("no answer from the server in time (waiting for {what})"))
}

fn write_by(s: &mut impl Chan, buf: &[u8], deadline: Instant, what: &str) -> io::Result<()> {
    s.sock().set_write_timeout(Some(left(deadline).map_err(|_| timeout(what))?))?;
    // (Over TLS, flush sends what the write encrypted.)
    let r = s.write_all(buf).and_then(|_| s.flush());
    r.map_err(|e| io_context(s, e, &format!("sending {what}")))
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}
fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}
fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[i..i + 8]);
    u64::from_be_bytes(a)
}

/// A server-provided string, made safe to print: at most 200 characters, no control bytes.
fn printable(b: &[u8]) -> String {
    let s: String = String::from_utf8_lossy(b)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect();
    s.trim().to_string()
}

/// Negotiates `export` on a fresh connection, over TLS if `tls` is given; on success the
/// stream is in the transmission phase with simple replies, and the TLS connection, if any, is
/// returned for it.
pub fn handshake(
    s: &mut Stream,
    export: &str,
    deadline: Instant,
    tls: Option<&TlsClient>,
) -> io::Result<(Export, Option<ClientConnection>)> {
    let mut b = [0u8; 18];
    read_by(s, &mut b, deadline, "the greeting")?;
    if u64_at(&b, 0) != NBDMAGIC {
        return Err(proto_err(format!(
            "bad greeting magic {:#018x} (expected NBDMAGIC): this is not an NBD server",
            u64_at(&b, 0)
        )));
    }
    match u64_at(&b, 8) {
        IHAVEOPT => {}
        CLISERV_MAGIC => {
            return Err(proto_err("the server speaks oldstyle negotiation, which is not supported (it cannot name exports)"))
        }
        m => return Err(proto_err(format!("bad negotiation magic {m:#018x} (expected IHAVEOPT)"))),
    }
    let hflags = u16_at(&b, 16);
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(proto_err("the server does not support fixed newstyle negotiation"));
    }
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let cflags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
    write_by(s, &cflags.to_be_bytes(), deadline, "the client flags")?;
    let Some(tls) = tls else {
        return go(s, export, Some(no_zeroes), deadline).map(|e| (e, None));
    };
    send_option(s, OPT_STARTTLS, &[], deadline)?;
    let (rtype, payload) = read_option_reply(s, OPT_STARTTLS, deadline)?;
    if rtype != REP_ACK {
        let msg = printable(&payload);
        let extra = if msg.is_empty() { String::new() } else { format!(": {msg}") };
        let why = if rtype & REP_ERR_BIT != 0 { rep_err_name(rtype).to_string() } else { format!("reply type {rtype:#x}") };
        return Err(TlsProblem::io(
            format!("the server does not offer TLS ({why}{extra}); nothing was sent in clear"),
            "enable TLS on the server (qemu-nbd --tls-creds, nbdkit --tls=require), or use nbd:// to connect without it",
        ));
    }
    let mut conn = tls.connection()?;
    let mut chan = TlsChan::new(&mut conn, s, deadline);
    chan.handshake().map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => timeout("the TLS handshake"),
        _ => explain_io(&e).unwrap_or_else(|| io::Error::new(e.kind(), format!("the TLS handshake: {e}"))),
    })?;
    let e = go(&mut chan, export, None, deadline)?;
    Ok((e, Some(conn)))
}

/// `NBD_OPT_GO` for `export`; `fallback`: `NBD_OPT_EXPORT_NAME` may replace it, the server
/// having offered (`Some(true)`) or not `NBD_FLAG_NO_ZEROES`.
fn go(s: &mut impl Chan, export: &str, fallback: Option<bool>, deadline: Instant) -> io::Result<Export> {
    // NBD_OPT_GO: name length, name, 2 information requests.
    let name = export.as_bytes();
    let mut data = Vec::with_capacity(name.len() + 10);
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name);
    data.extend_from_slice(&2u16.to_be_bytes());
    data.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &data, deadline)?;

    let mut info: Option<(u64, u16)> = None;
    let mut sizes: Option<(u32, u32, u32)> = None;
    for _ in 0..MAX_OPTION_REPLIES {
        let (rtype, payload) = read_option_reply(s, OPT_GO, deadline)?;
        match rtype {
            REP_ACK => {
                let (size, flags) =
                    info.ok_or_else(|| proto_err("the server accepted the export without describing it (no NBD_INFO_EXPORT)"))?;
                return check_export(size, flags, sizes);
            }
            REP_INFO => {
                if payload.len() < 2 {
                    return Err(proto_err("empty NBD_REP_INFO reply"));
                }
                match u16_at(&payload, 0) {
                    INFO_EXPORT if payload.len() == 12 => info = Some((u64_at(&payload, 2), u16_at(&payload, 10))),
                    INFO_BLOCK_SIZE if payload.len() == 14 => {
                        sizes = Some((u32_at(&payload, 2), u32_at(&payload, 6), u32_at(&payload, 10)))
                    }
                    t @ (INFO_EXPORT | INFO_BLOCK_SIZE) => {
                        return Err(proto_err(format!("NBD_REP_INFO type {t} with a wrong length ({} bytes)", payload.len())))
                    }
                    // Other information (names, descriptions) is not needed.
                    _ => {}
                }
            }
            REP_ERR_UNSUP if fallback.is_some() => {
                return export_name(s, export, fallback == Some(true), deadline)
            }
            REP_ERR_TLS_REQD => {
                return Err(TlsProblem::io(
                    format!("the server requires TLS for export {export:?}"),
                    "connect with nbds://... (and --tls-ca FILE, the CA that signed the server's certificate)",
                ))
            }
            t if t & REP_ERR_BIT != 0 => {
                let msg = printable(&payload);
                let extra = if msg.is_empty() { String::new() } else { format!(": {msg}") };
                return Err(io::Error::new(
                    if t == REP_ERR_UNKNOWN { io::ErrorKind::NotFound } else { io::ErrorKind::Other },
                    format!("the server refused export {export:?}: {}{extra}", rep_err_name(t)),
                ));
            }
            t => return Err(proto_err(format!("unexpected option reply type {t:#x} to NBD_OPT_GO"))),
        }
    }
    Err(proto_err(format!("more than {MAX_OPTION_REPLIES} replies to one option")))
}

fn send_option(s: &mut impl Chan, opt: u32, data: &[u8], deadline: Instant) -> io::Result<()> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    write_by(s, &m, deadline, "an option")
}

fn read_option_reply(s: &mut impl Chan, opt: u32, deadline: Instant) -> io::Result<(u32, Vec<u8>)> {
    let mut h = [0u8; 20];
    read_by(s, &mut h, deadline, "an option reply")?;
    if u64_at(&h, 0) != OPT_REPLY_MAGIC {
        return Err(proto_err(format!("bad option reply magic {:#018x}", u64_at(&h, 0))));
    }
    if u32_at(&h, 8) != opt {
        return Err(proto_err(format!("reply to option {} while option {opt} was sent", u32_at(&h, 8))));
    }
    let (rtype, len) = (u32_at(&h, 12), u32_at(&h, 16));
    if len > MAX_OPTION_REPLY {
        return Err(proto_err(format!("oversized option reply ({len} bytes; at most {MAX_OPTION_REPLY} accepted)")));
    }
    let mut payload = vec![0u8; len as usize];
    read_by(s, &mut payload, deadline, "an option reply")?;
    Ok((rtype, payload))
}

/// The old way in, for servers without NBD_OPT_GO: no error replies, no size constraints.
fn export_name(s: &mut impl Chan, export: &str, no_zeroes: bool, deadline: Instant) -> io::Result<Export> {
    send_option(s, OPT_EXPORT_NAME, export.as_bytes(), deadline)?;
    let mut b = [0u8; 10 + 124];
    let n = if no_zeroes { 10 } else { b.len() };
    read_by(s, &mut b[..n], deadline, "the export description").map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::new(io::ErrorKind::NotFound, format!("the server refused export {export:?} (closed the connection)"))
        } else {
            e
        }
    })?;
    check_export(u64_at(&b, 0), u16_at(&b, 8), None)
}

/// Checks the export size, flags and size constraints the server sent.
pub fn check_export(size: u64, flags: u16, sizes: Option<(u32, u32, u32)>) -> io::Result<Export> {
    if size > MAX_EXPORT_SIZE {
        return Err(proto_err(format!("absurd export size {size} bytes (more than a Linux offset can address)")));
    }
    if flags & TFLAG_HAS_FLAGS == 0 {
        return Err(proto_err(format!("transmission flags {flags:#06x} without NBD_FLAG_HAS_FLAGS")));
    }
    let (min, pref, max) = sizes.unwrap_or((1, 4096, DEFAULT_MAX_PAYLOAD));
    if !min.is_power_of_two() || min > 65536 {
        return Err(proto_err(format!("bad minimum block size {min} (a power of two up to 65536)")));
    }
    if !pref.is_power_of_two() || pref < min.max(512) {
        return Err(proto_err(format!("bad preferred block size {pref} (a power of two, at least 512 and the minimum {min})")));
    }
    if max < pref {
        return Err(proto_err(format!("bad maximum payload {max} (smaller than the preferred block size {pref})")));
    }
    // Never more than the protocol default per request, even if the server allows more: the
    // default is what every server handles well, and copies are at most that large anyway.
    let max = max.min(DEFAULT_MAX_PAYLOAD) / min * min;
    Ok(Export { size, flags, min_block: min, preferred_block: pref, max_payload: max })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener that accepts nothing, its backlog full: the connect gives up at its limit
    /// (a plain UnixStream::connect blocks for ever here), and one to a live listener works.
    #[test]
    fn unix_connect_to_a_full_backlog_times_out() {
        use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sock");
        let l = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
        bind(l.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
        listen(&l, Backlog::new(0).unwrap()).unwrap();
        // Fill the backlog (Linux queues backlog + 1); nobody accepts. In a thread, so that a
        // connect that blocks fails the test instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || {
            let mut queued = Vec::new();
            let t0 = Instant::now();
            let r = loop {
                match unix_connect(&p, Duration::from_millis(300)) {
                    Ok(s) => queued.push(s),
                    Err(e) => break Ok((e, t0.elapsed())),
                }
                if queued.len() >= 16 {
                    break Err("the backlog never filled");
                }
            };
            let _ = tx.send(r);
        });
        let (e, took) = rx.recv_timeout(Duration::from_secs(20)).expect("the connect blocked").unwrap();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(took >= Duration::from_millis(250), "gave up before its limit: {took:?}");
        let ok = std::os::unix::net::UnixListener::bind(dir.path().join("live")).unwrap();
        let s = unix_connect(&dir.path().join("live"), Duration::from_secs(5)).expect("connect to a listener");
        drop((s, ok));
    }

    #[test]
    fn export_checks() {
        let e = check_export(1 << 30, TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH, None).unwrap();
        assert_eq!((e.min_block, e.preferred_block, e.max_payload), (1, 4096, 32 << 20));
        let e = check_export(1 << 30, 1, Some((512, 4096, u32::MAX))).unwrap();
        assert_eq!(e.max_payload, 32 << 20);
        let e = check_export(1 << 30, 1, Some((4096, 4096, 1_000_000))).unwrap();
        assert_eq!(e.max_payload, 1_000_000 / 4096 * 4096);
        assert!(check_export(u64::MAX, 1, None).unwrap_err().to_string().contains("absurd export size"));
        assert!(check_export(1, 0, None).unwrap_err().to_string().contains("HAS_FLAGS"));
        assert!(check_export(1, 1, Some((3, 4096, 1 << 20))).unwrap_err().to_string().contains("minimum block"));
        assert!(check_export(1, 1, Some((1 << 17, 1 << 17, 1 << 20))).is_err());
        assert!(check_export(1, 1, Some((512, 256, 1 << 20))).unwrap_err().to_string().contains("preferred"));
        assert!(check_export(1, 1, Some((512, 4096, 1024))).unwrap_err().to_string().contains("maximum payload"));
    }

    /// A scripted server on a socket pair: sends `script`, reads whatever comes.
    fn scripted(script: Vec<u8>) -> Stream {
        let (a, mut b) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let _ = b.write_all(&script);
            // The script is all the server says: then EOF.
            let _ = b.shutdown(std::net::Shutdown::Write);
            let mut sink = [0u8; 4096];
            b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            while matches!(b.read(&mut sink), Ok(n) if n > 0) {}
        });
        Stream::Unix(a)
    }

    fn greeting(hflags: u16) -> Vec<u8> {
        let mut v = NBDMAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&hflags.to_be_bytes());
        v
    }

    fn opt_reply(opt: u32, t: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&t.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn info_export(size: u64, flags: u16) -> Vec<u8> {
        let mut p = INFO_EXPORT.to_be_bytes().to_vec();
        p.extend_from_slice(&size.to_be_bytes());
        p.extend_from_slice(&flags.to_be_bytes());
        opt_reply(OPT_GO, REP_INFO, &p)
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[test]
    fn go_with_block_sizes() {
        let mut s = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        s.extend(info_export(1 << 20, 0x4d));
        let mut p = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [512u32, 4096, 1 << 20] {
            p.extend_from_slice(&v.to_be_bytes());
        }
        s.extend(opt_reply(OPT_GO, REP_INFO, &p));
        s.extend(opt_reply(OPT_GO, REP_INFO, &[0, 2, b'h', b'i'])); // a description: ignored
        s.extend(opt_reply(OPT_GO, REP_ACK, &[]));
        let e = handshake(&mut scripted(s), "x", soon(), None).unwrap().0;
        assert_eq!(e, Export { size: 1 << 20, flags: 0x4d, min_block: 512, preferred_block: 4096, max_payload: 1 << 20 });
    }

    #[test]
    fn hostile_handshakes_fail_clearly() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec(), "not an NBD server"),
            (
                {
                    let mut v = NBDMAGIC.to_be_bytes().to_vec();
                    v.extend_from_slice(&CLISERV_MAGIC.to_be_bytes());
                    v.extend_from_slice(&[0, 0]);
                    v
                },
                "oldstyle",
            ),
            (greeting(0), "fixed newstyle"),
            (greeting(1)[..10].to_vec(), "closed the connection while sending the greeting"),
            ([greeting(1), opt_reply(OPT_GO, REP_ACK, &[])].concat(), "no NBD_INFO_EXPORT"),
            ([greeting(1), vec![0xde; 20]].concat(), "bad option reply magic"),
            ([greeting(1), opt_reply(3, REP_ACK, &[])].concat(), "reply to option 3"),
            (
                {
                    let mut v = greeting(1);
                    let mut r = opt_reply(OPT_GO, REP_INFO, &[]);
                    r[16..20].copy_from_slice(&(1u32 << 30).to_be_bytes());
                    v.extend(r);
                    v
                },
                "oversized option reply",
            ),
            ([greeting(1), opt_reply(OPT_GO, REP_ERR_UNKNOWN, b"no\x07 such")].concat(), "no such export: no  such"),
            ([greeting(1), opt_reply(OPT_GO, REP_INFO, &[0, 0, 1])].concat(), "wrong length"),
            ([greeting(1), info_export(u64::MAX, 1), opt_reply(OPT_GO, REP_ACK, &[])].concat(), "absurd export size"),
            ([greeting(1), info_export(1 << 20, 1)].concat(), "closed the connection while sending an option reply"),
            ([greeting(1), opt_reply(OPT_GO, 77, &[])].concat(), "unexpected option reply type"),
        ];
        for (script, want) in cases {
            let e = handshake(&mut scripted(script), "x", soon(), None).unwrap_err();
            assert!(e.to_string().contains(want), "want {want:?}, got: {e}");
        }
    }

    #[test]
    fn silent_server_times_out() {
        let (a, _b) = UnixStream::pair().unwrap();
        let t0 = Instant::now();
        let e = handshake(&mut Stream::Unix(a), "x", Instant::now() + Duration::from_millis(200), None).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        // The 200 ms deadline, with room for a loaded machine (without it: for ever).
        assert!(t0.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn export_name_fallback() {
        let mut s = greeting(FLAG_FIXED_NEWSTYLE);
        s.extend(opt_reply(OPT_GO, REP_ERR_UNSUP, &[]));
        s.extend_from_slice(&(1u64 << 20).to_be_bytes());
        s.extend_from_slice(&5u16.to_be_bytes());
        s.extend_from_slice(&[0u8; 124]);
        let e = handshake(&mut scripted(s), "", soon(), None).unwrap().0;
        assert_eq!((e.size, e.flags, e.min_block), (1 << 20, 5, 1));
    }
}
