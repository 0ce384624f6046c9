//! An NBD client target: the mirror's target operations become NBD requests on one connection,
//! driven by the mirror's own io_uring.
//!
//! Connection and handshake are blocking with deadlines ([`handshake`]). In the transmission
//! phase, everything goes through the ring:
//!
//! - **Sending.** Requests (a 28-byte header, plus the payload of a write) wait in a queue and
//!   are sent in batches, one `sendmsg` SQE at a time, with up to [`MAX_IOV`] pieces. A short
//!   send is continued from where it stopped before anything else is sent, so requests never
//!   interleave on the wire. The headers live in boxed requests and the iovecs in a boxed
//!   batch: their addresses do not change while the kernel holds them.
//! - **Receiving.** One `recv` SQE is kept posted. Reply headers (16 bytes, simple replies
//!   only) are parsed as a stream from a small buffer; the data of a read goes straight into
//!   the caller's buffer (the part that arrived with a header is copied from the small buffer,
//!   the rest is received in place with `MSG_WAITALL`). Replies are matched to requests by
//!   cookie: the request's slot in the low 32 bits and a per-slot sequence number in the high
//!   32, so a reply to a request that was already answered (its slot free or reused) matches
//!   nothing.
//! - **Completion.** An operation may be split into several requests (size constraints); it
//!   completes when all of them have been answered *and* sent: until its last byte has left,
//!   the kernel may still read the caller's buffer, so the caller must not get it back.
//! - **Errors.** A server error on one request fails that operation only. A protocol
//!   violation, EOF or socket error breaks the connection: the socket is shut down (which
//!   makes the SQEs in flight on it complete), every operation fails with an error naming the
//!   server, except those whose buffers an SQE still holds, which fail when that SQE completes.
//!   Operations submitted while broken fail through a NOP SQE (the mirror only hears from the
//!   target through completions). A one-second timer SQE runs while requests are in flight and
//!   breaks the connection when nothing moved for [`NbdTarget::set_request_timeout`].
//! - **TLS** ([`tls`], `nbds://`): the handshake runs blocking, like the rest of the
//!   negotiation; in the transmission phase the rustls connection is driven from the ring: a
//!   batch's pieces are encrypted into one ciphertext buffer, sent by the same one-SQE-at-a-time
//!   logic, and its requests count as sent when all of it has left; every receive goes into a
//!   ciphertext buffer, whose decrypted bytes feed the same reply parser (read data is decrypted
//!   straight into the caller's buffer when no reply header is pending).
//! - **Reconnecting.** [`Target::reset`] on a broken connection connects and negotiates again
//!   (one second at most; over TLS with a full handshake and certificate check). The old connection's SQEs may still be in flight: the connection is
//!   kept, with its buffers, until they complete. SQEs carry a connection generation, so their
//!   completions are never taken for the new connection's.

mod handshake;
mod proto;
pub mod tls;
pub mod uri;

pub use handshake::Export;
pub use uri::{NbdUri, UriError};

use crate::error::Error;
use slab::Slab;
use crate::io::target::{Target, TargetDone, TargetOp};
use crate::io::uring::{push, Owner, Ring};
use handshake::Stream;
use rustls::ClientConnection;
use tls::{TlsClient, TlsFiles};
use io_uring::{opcode, types};
use proto::*;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Deadline of connecting and negotiating at open.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of a reconnect ([`Target::reset`] must not block the mirror for long).
pub const RESET_TIMEOUT: Duration = Duration::from_secs(1);
/// Default time without progress, with requests in flight, before the connection is declared
/// dead. Generous: a server may take long to flush a large cache.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Receive buffer for reply headers (and the start of read data that comes with them).
const RX_SIZE: usize = 16 << 10;
/// Pieces in one sendmsg: a header, or a header and a payload, per request.
const MAX_IOV: usize = 64;
/// Largest WRITE_ZEROES request (the protocol's length field is 32 bits).
const MAX_ZERO_REQUEST: u32 = 1 << 30;
/// Zero buffer for servers without WRITE_ZEROES.
const ZERO_BUF: u32 = 1 << 20;
/// TLS: ciphertext receive buffer (a few TLS records).
const CRX_SIZE: usize = 256 << 10;
/// TLS: a send batch stops taking requests once it holds this many bytes (its ciphertext is
/// one buffer).
const TLS_BATCH: usize = 4 << 20;
/// TLS: the most plaintext one record carries.
const TLS_RECORD: usize = 16 << 10;

// Kinds of SQE, in the high bits of `sub`; the low 32 bits carry the connection generation.
const K_RECV: u64 = 1;
const K_SEND: u64 = 2;
const K_NOP: u64 = 3;
const K_TIMER: u64 = 4;

fn sub(kind: u64, gen: u32) -> u64 {
    (kind << 32) | gen as u64
}

/// The timer's period. A static: a timeout SQE refers to its timespec until it completes, and
/// a static outlives any ring.
static TICK: types::Timespec = types::Timespec::new().sec(1);

/// One target operation, maybe split into several requests.
struct Op {
    token: u64,
    /// Requests not finished yet.
    parts: u32,
    /// What the operation returns on success (bytes for reads and writes).
    result: u32,
    err: Option<io::Error>,
}

/// One NBD request.
struct Req {
    op: usize,
    seq: u32,
    cmd: u16,
    off: u64,
    len: u32,
    /// A write's payload or a read's destination (the caller's buffer, or the zero buffer);
    /// null for other commands.
    buf: *mut u8,
    hdr: [u8; REQUEST_LEN],
    /// Every byte of the request has been sent.
    sent: bool,
    /// Read data received so far.
    got: u32,
    /// The reply, complete with its data: the NBD error value (0: success).
    reply: Option<u32>,
}

#[derive(Clone, Copy, Debug)]
enum RxState {
    /// Expecting a reply header.
    Header,
    /// Receiving the data of the read in this request slot.
    Payload(usize),
}

#[derive(Clone, Copy, Debug)]
enum RecvInto {
    /// The receive buffer.
    Rx,
    /// TLS: the ciphertext buffer.
    Cipher,
    /// The data buffer of the read in this request slot.
    Payload(usize),
}

/// The requests of one sendmsg, and how far it got.
struct SendBatch {
    iov: [libc::iovec; MAX_IOV],
    /// First iovec with bytes left, and the number of iovecs.
    first: usize,
    n: usize,
    msg: libc::msghdr,
    /// Request slots in the batch with their bytes not yet sent; `rfirst` is the first with
    /// bytes left.
    reqs: Vec<(usize, usize)>,
    rfirst: usize,
    /// TLS: the batch's ciphertext (the one piece sent), not touched while a send is posted.
    cipher: Vec<u8>,
}

impl SendBatch {
    fn boxed() -> Box<SendBatch> {
        Box::new(SendBatch {
            iov: [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_IOV],
            first: 0,
            n: 0,
            // SAFETY: msghdr is a plain C struct (pointers, lengths, flags, padding) for which
            // all zeroes is a valid value: no name, no iovecs, no control data.
            msg: unsafe { std::mem::zeroed() },
            reqs: Vec::with_capacity(MAX_IOV),
            rfirst: 0,
            cipher: Vec::new(),
        })
    }
}

/// One connection in the transmission phase.
struct Conn {
    gen: u32,
    stream: Stream,
    rx: Box<[u8]>,
    rx_start: usize,
    rx_end: usize,
    rx_state: RxState,
    recv_posted: Option<RecvInto>,
    send: Box<SendBatch>,
    send_posted: bool,
    /// Request slots waiting to be sent, in order.
    sendq: VecDeque<usize>,
    /// TLS: the session, and the ciphertext receive buffer (empty without TLS).
    tls: Option<Box<ClientConnection>>,
    crx: Box<[u8]>,
}

impl Conn {
    fn new(stream: Stream, gen: u32, tls: Option<ClientConnection>) -> Conn {
        let crx = if tls.is_some() { vec![0u8; CRX_SIZE].into_boxed_slice() } else { Box::default() };
        Conn {
            tls: tls.map(Box::new),
            crx,
            gen,
            stream,
            rx: vec![0u8; RX_SIZE].into_boxed_slice(),
            rx_start: 0,
            rx_end: 0,
            rx_state: RxState::Header,
            recv_posted: None,
            send: SendBatch::boxed(),
            send_posted: false,
            sendq: VecDeque::new(),
        }
    }
    /// SQEs of this connection are in flight.
    fn busy(&self) -> bool {
        self.recv_posted.is_some() || self.send_posted
    }
}

/// A target behind an NBD server.
pub struct NbdTarget {
    uri: NbdUri,
    /// TLS (`nbds`): the client every (re)connection negotiates with.
    tls: Option<TlsClient>,
    /// The normalized URI: the target's name in messages and its identity.
    name: String,
    addrs: Vec<SocketAddr>,
    export: Export,
    /// The block size at open ([`Target::block_size`]), which Engine::open and the mirror laid
    /// the copies out for: a reconnect must not raise it.
    open_block: u32,
    conn: Option<Conn>,
    gen: u32,
    /// Old connections whose SQEs are still in flight.
    retired: Vec<Conn>,
    /// Why the connection is unusable (None: it works).
    broken: Option<String>,
    ops: Slab<Op>,
    reqs: Slab<Box<Req>>,
    /// Sequence number of each request slot's latest request (the cookie's high half).
    seqs: Vec<u32>,
    /// Completions to hand out at the next NOP completion.
    ready: Vec<TargetDone>,
    nop_posted: bool,
    timer_posted: bool,
    request_timeout: Duration,
    /// Last time bytes moved (or the first request went in flight after an idle time).
    last_progress: Instant,
    zero: Option<Box<[u8]>>,
    /// Tests: the next encryption of a send batch fails (see [`NbdTarget::fail_next_encryption`]).
    fail_encryption: bool,
    /// The TLS version and cipher suite of the connection (see [`NbdTarget::tls_info`]).
    tls_info: Option<String>,
}

/// The TLS version and cipher suite a session negotiated, for messages.
fn session_info(c: &ClientConnection) -> String {
    let version = c.protocol_version().map_or("?".to_string(), |v| format!("{v:?}"));
    let suite = c.negotiated_cipher_suite().map_or("?".to_string(), |s| format!("{:?}", s.suite()));
    format!("{version}, {suite}")
}

// SAFETY: the raw pointers inside (request buffers, iovecs, msghdr) point into buffers the
// target owns or that the caller lent for an operation in flight; they are dereferenced only
// by the kernel for SQEs of this target and by this target's methods, which take `&mut self`.
// Moving the target to another thread together with its ring (the mirror thread owns both)
// changes none of that.
unsafe impl Send for NbdTarget {}

fn check_usable(e: &Export) -> Result<(), (io::Error, &'static str)> {
    if e.has(TFLAG_READ_ONLY) {
        return Err((
            io::Error::new(io::ErrorKind::PermissionDenied, "the export is read-only (NBD_FLAG_READ_ONLY)"),
            "a mirror target must be writable: export it read-write (without qemu-nbd -r / nbdkit -r)",
        ));
    }
    if !e.has(TFLAG_SEND_FLUSH) {
        return Err((
            io::Error::new(io::ErrorKind::Unsupported, "the export does not support FLUSH (no NBD_FLAG_SEND_FLUSH)"),
            "the mirror must make its copies durable: use a server or plugin that supports flush",
        ));
    }
    Ok(())
}

impl NbdTarget {
    /// Connects to the export named by `uri` and negotiates (at most [`OPEN_TIMEOUT`]), over
    /// TLS with `tls`'s files if the URI asks for it (`nbds`).
    pub fn open(uri: &str, tls: &TlsFiles) -> crate::Result<NbdTarget> {
        let parsed = NbdUri::parse(uri).map_err(|e| Error::config(format!("target: {e}")))?;
        let name = parsed.normalized();
        let tls = match (parsed.tls, parsed.tls_name()) {
            (true, Some(host)) => Some(TlsClient::new(tls, host).map_err(|e| Error::config(format!("target {name}: {e}")))?),
            (true, None) => return Err(Error::config(format!("target {name}: no name to check the certificate for: add &tls-hostname=NAME"))),
            (false, _) if !tls.is_empty() => {
                return Err(Error::config(format!(
                    "target {name}: TLS files given (--tls-ca, --tls-cert, --tls-key) but the URI \
                     does not ask for TLS: write nbds://... (or nbds+unix://...)"
                )))
            }
            (false, _) => None,
        };
        let fail = |what: &str, fix: String, source: io::Error| Error::Open {
            role: "target",
            path: PathBuf::from(&name),
            what: what.into(),
            fix,
            source,
        };
        let addrs = handshake::resolve(&parsed)
            .map_err(|e| fail("cannot resolve the NBD server's address", "check the host name".into(), e))?;
        let deadline = Instant::now() + OPEN_TIMEOUT;
        let mut stream = handshake::connect(&parsed, &addrs, deadline).map_err(|e| {
            fail(
                &format!("cannot connect to the NBD server at {}", parsed.server()),
                "start the NBD server (qemu-nbd, nbdkit...), or correct the URI".into(),
                e,
            )
        })?;
        let (export, session) = handshake::handshake(&mut stream, &parsed.export, deadline, tls.as_ref()).map_err(|e| {
            let what = format!("NBD handshake with {} failed", parsed.server());
            match tls::TlsProblem::of(&e) {
                Some(p) => fail(&what, p.fix.clone(), io::Error::new(e.kind(), p.problem.clone())),
                None => fail(&what, "check that the URI names an NBD server (fixed newstyle) and an export it has".into(), e),
            }
        })?;
        check_usable(&export).map_err(|(e, fix)| fail("cannot use this export", fix.into(), e))?;
        // Transmission goes through the ring, which never blocks on the socket; the handshake
        // timeouts must not linger on it.
        stream.set_read_timeout(None).map_err(|e| fail("socket setup", String::new(), e))?;
        stream.set_write_timeout(None).map_err(|e| fail("socket setup", String::new(), e))?;
        log::debug!(
            "NBD target {name}: {} bytes, flags {:#x}, block sizes {}/{}/{}",
            export.size,
            export.flags,
            export.min_block,
            export.preferred_block,
            export.max_payload
        );
        let tls_info = session.as_ref().map(session_info);
        if let Some(t) = &tls_info {
            log::info!("NBD target {name}: TLS ({t})");
        }
        Ok(NbdTarget {
            uri: parsed,
            tls,
            name,
            addrs,
            open_block: export.min_block.max(512),
            export,
            gen: 1,
            retired: Vec::new(),
            broken: None,
            ops: Slab::new(),
            reqs: Slab::new(),
            seqs: Vec::new(),
            ready: Vec::new(),
            nop_posted: false,
            timer_posted: false,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            last_progress: Instant::now(),
            zero: None,
            fail_encryption: false,
            tls_info,
            conn: Some(Conn::new(stream, 1, session)),
        })
    }

    /// The TLS version and cipher suite of the current connection (None: no TLS).
    pub fn tls_info(&self) -> Option<&str> {
        self.tls_info.as_deref()
    }

    /// Tests: makes the next encryption of a send batch fail, as a TLS session that reached
    /// its record limit does.
    #[doc(hidden)]
    pub fn fail_next_encryption(&mut self) {
        self.fail_encryption = true;
    }

    /// What the server told about the export at the last handshake.
    pub fn export(&self) -> &Export {
        &self.export
    }

    /// Time without progress, with requests in flight, before the connection is declared dead
    /// (checked about every second).
    pub fn set_request_timeout(&mut self, t: Duration) {
        self.request_timeout = t;
    }

    /// Why the connection is unusable, if it is.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    fn error(&self, kind: io::ErrorKind, msg: &str) -> io::Error {
        io::Error::new(kind, format!("NBD server {}: {msg}", self.name))
    }

    /// Completes `token` with `r` through a NOP completion (the caller hears from the target
    /// only through completions on the ring).
    fn complete_later(&mut self, ring: &mut Ring, token: u64, r: io::Result<u32>) -> io::Result<()> {
        self.ready.push((token, r));
        if !self.nop_posted {
            // SAFETY: a NOP refers to no memory and no descriptor.
            unsafe { push(ring, opcode::Nop::new().build(), Owner::Target, sub(K_NOP, 0)) }?;
            self.nop_posted = true;
        }
        Ok(())
    }

    fn add_req(&mut self, op: usize, cmd: u16, flags: u16, off: u64, len: u32, buf: *mut u8) {
        let Some(conn) = self.conn.as_mut() else { return };
        if self.reqs.is_empty() {
            // Idle time does not count against the request timeout.
            self.last_progress = Instant::now();
        }
        let slot = self.reqs.insert(Box::new(Req {
            op,
            seq: 0,
            cmd,
            off,
            len,
            buf,
            hdr: [0; REQUEST_LEN],
            sent: false,
            got: 0,
            reply: None,
        }));
        if self.seqs.len() <= slot {
            self.seqs.resize(slot + 1, 0);
        }
        self.seqs[slot] = self.seqs[slot].wrapping_add(1);
        let seq = self.seqs[slot];
        let cookie = ((seq as u64) << 32) | slot as u64;
        if let Some(r) = self.reqs.get_mut(slot) {
            r.seq = seq;
            r.hdr = request(cmd, flags, cookie, off, len);
        }
        conn.sendq.push_back(slot);
        if let Some(o) = self.ops.get_mut(op) {
            o.parts += 1;
        }
    }

    /// Starts sending, keeps the receive and the timer posted.
    fn kick(&mut self, ring: &mut Ring) -> io::Result<()> {
        if self.broken.is_some() {
            return Ok(());
        }
        let fault = std::mem::take(&mut self.fail_encryption);
        let NbdTarget { conn, reqs, .. } = self;
        let Some(conn) = conn.as_mut() else { return Ok(()) };
        let tls_wants = conn.tls.as_ref().is_some_and(|t| t.wants_write());
        if !conn.send_posted && (!conn.sendq.is_empty() || tls_wants) {
            fill_batch(conn, reqs);
            if let Some(t) = conn.tls.as_mut() {
                // SAFETY: the batch's pieces were just filled from live requests (headers in
                // boxed requests, payloads lent until the reply), and nothing posted uses the
                // batch (send_posted is false).
                let r = if fault { Err(io::Error::other("injected")) } else { unsafe { encrypt_batch(&mut conn.send, t) } };
                if let Err(e) = r {
                    // The session is done for (rustls keeps the error; TLS 1.2's record limit,
                    // say): the connection is, not the ring. Its requests fail through
                    // completions, and the next reset connects a new session.
                    let mut failed = Vec::new();
                    self.break_conn(format!("TLS: encrypting requests failed: {e}"), &mut failed);
                    for (token, r) in failed {
                        self.complete_later(ring, token, r)?;
                    }
                    return Ok(());
                }
            }
            if conn.send.n > 0 {
                post_send(conn, ring)?;
            }
        }
        if conn.recv_posted.is_none() {
            post_recv(conn, reqs, ring)?;
        }
        if !self.timer_posted && !self.reqs.is_empty() {
            // SAFETY: the timeout's timespec is a static.
            unsafe { push(ring, opcode::Timeout::new(&TICK).build(), Owner::Target, sub(K_TIMER, 0)) }?;
            self.timer_posted = true;
        }
        Ok(())
    }

    /// The request in `slot` got its reply (with its data).
    fn replied(&mut self, slot: usize, error: u32, done: &mut Vec<TargetDone>) {
        let Some(r) = self.reqs.get_mut(slot) else { return };
        r.reply = Some(error);
        if r.sent {
            self.finish_req(slot, done);
        }
    }

    fn sent(&mut self, slot: usize, done: &mut Vec<TargetDone>) {
        let Some(r) = self.reqs.get_mut(slot) else { return };
        r.sent = true;
        if r.reply.is_some() {
            self.finish_req(slot, done);
        }
    }

    fn finish_req(&mut self, slot: usize, done: &mut Vec<TargetDone>) {
        let Some(r) = self.reqs.try_remove(slot) else { return };
        let err = match r.reply {
            Some(code) if code != 0 => {
                let os = io::Error::from_raw_os_error(errno(code));
                Some(self.error(
                    os.kind(),
                    &format!("{} of {} bytes at byte {} failed: {os} (NBD error {code})", cmd_name(r.cmd), r.len, r.off),
                ))
            }
            _ => None,
        };
        let Some(op) = self.ops.get_mut(r.op) else { return };
        if let Some(e) = err {
            op.err.get_or_insert(e);
        }
        // Each request is counted in its operation once and finished once (it is removed here).
        op.parts = op.parts.saturating_sub(1);
        if op.parts == 0 {
            if let Some(op) = self.ops.try_remove(r.op) {
                done.push((op.token, op.err.map_or(Ok(op.result), Err)));
            }
        }
    }

    /// Declares the connection broken: shuts the socket down and fails what can be failed.
    fn break_conn(&mut self, msg: String, done: &mut Vec<TargetDone>) {
        if self.broken.is_some() {
            return;
        }
        log::warn!("NBD server {}: {msg}; the connection is dropped", self.name);
        self.broken = Some(msg);
        if let Some(c) = self.conn.as_mut() {
            // Wakes up the recv and send in flight: they complete (EOF, EPIPE) soon.
            c.stream.shutdown();
            c.sendq.clear();
        }
        self.fail_unpinned(done);
    }

    /// On a broken connection: fails every operation whose buffers no SQE holds any more.
    fn fail_unpinned(&mut self, done: &mut Vec<TargetDone>) {
        let Some(msg) = self.broken.clone() else { return };
        if self.ops.is_empty() {
            return;
        }
        let mut pinned = vec![false; self.ops.capacity()];
        if let Some(c) = self.conn.as_ref() {
            let mut pin = |slot: usize| {
                if let Some(r) = self.reqs.get(slot) {
                    if let Some(p) = pinned.get_mut(r.op) {
                        *p = true;
                    }
                }
            };
            if c.send_posted {
                for &(slot, _) in &c.send.reqs[c.send.rfirst..] {
                    pin(slot);
                }
            }
            if let Some(RecvInto::Payload(slot)) = c.recv_posted {
                pin(slot);
            }
        }
        let victims: Vec<usize> = self.ops.iter().map(|(i, _)| i).filter(|&i| !pinned[i]).collect();
        if victims.is_empty() {
            return;
        }
        let mut dead = vec![false; self.ops.capacity()];
        for &i in &victims {
            dead[i] = true;
        }
        let doomed: Vec<usize> = self
            .reqs
            .iter()
            .map(|(s, _)| s)
            .filter(|&s| self.reqs.get(s).is_some_and(|r| dead.get(r.op).copied().unwrap_or(false)))
            .collect();
        for s in doomed {
            self.reqs.try_remove(s);
        }
        for i in victims {
            if let Some(op) = self.ops.try_remove(i) {
                done.push((op.token, Err(self.error(io::ErrorKind::ConnectionAborted, &msg))));
            }
        }
    }

    fn on_send(&mut self, ring: &mut Ring, res: i32, done: &mut Vec<TargetDone>) -> Result<(), String> {
        let Some(conn) = self.conn.as_mut() else { return Ok(()) };
        conn.send_posted = false;
        if self.broken.is_some() {
            return Ok(());
        }
        if res == -libc::EINTR || res == -libc::EAGAIN {
            return post_send(conn, ring).map_err(|e| format!("submitting a send: {e}"));
        }
        if res < 0 {
            return Err(format!("sending to the server failed: {}", io::Error::from_raw_os_error(-res)));
        }
        if res == 0 {
            return Err("sending to the server failed: it accepts no more data".into());
        }
        self.last_progress = Instant::now();
        let b = &mut *conn.send;
        let mut n = res as usize;
        while n > 0 && b.first < b.n {
            let v = &mut b.iov[b.first];
            if n >= v.iov_len {
                n -= v.iov_len;
                b.first += 1;
            } else {
                // Inside the piece: n < iov_len.
                v.iov_base = (v.iov_base as *mut u8).wrapping_add(n) as *mut libc::c_void;
                v.iov_len -= n;
                n = 0;
            }
        }
        let more = b.first < b.n;
        let mut n = res as usize;
        let mut finished = Vec::new();
        if conn.tls.is_some() {
            // The bytes sent are ciphertext: the batch's requests are sent with its last byte.
            if !more {
                finished.extend(b.reqs[b.rfirst..].iter().map(|&(slot, _)| slot));
                b.rfirst = b.reqs.len();
            }
            n = 0;
        }
        while n > 0 && b.rfirst < b.reqs.len() {
            let (slot, left) = &mut b.reqs[b.rfirst];
            let k = n.min(*left);
            *left -= k;
            n -= k;
            if *left == 0 {
                finished.push(*slot);
                b.rfirst += 1;
            }
        }
        if more {
            post_send(conn, ring).map_err(|e| format!("submitting a send: {e}"))?;
        }
        for slot in finished {
            self.sent(slot, done);
        }
        if !more {
            self.kick(ring).map_err(|e| format!("submitting to the ring: {e}"))?;
        }
        Ok(())
    }

    fn on_recv(&mut self, ring: &mut Ring, res: i32, done: &mut Vec<TargetDone>) -> Result<(), String> {
        let Some(conn) = self.conn.as_mut() else { return Ok(()) };
        let into = conn.recv_posted.take();
        if self.broken.is_some() {
            return Ok(());
        }
        if res == -libc::EINTR || res == -libc::EAGAIN || res == -libc::ENOBUFS {
            return post_recv(conn, &mut self.reqs, ring).map_err(|e| format!("submitting a receive: {e}"));
        }
        let mid_reply = matches!(conn.rx_state, RxState::Payload(_)) || conn.rx_end > conn.rx_start;
        if res < 0 {
            let e = io::Error::from_raw_os_error(-res);
            let mid = if mid_reply { " in the middle of a reply" } else { "" };
            return Err(format!("receiving from the server failed{mid}: {e}"));
        }
        if res == 0 {
            let waiting = self.reqs.len();
            return Err(if mid_reply {
                "the server closed the connection in the middle of a reply (short read)".into()
            } else if waiting > 0 {
                format!("the server closed the connection with {waiting} requests waiting for a reply")
            } else {
                "the server closed the connection".into()
            });
        }
        self.last_progress = Instant::now();
        let n = res as usize;
        match into {
            Some(RecvInto::Cipher) => {
                self.on_cipher(n.min(CRX_SIZE), done)?;
                // (kick: TLS may have something of its own to send, e.g. a refusal of a TLS 1.2
                // renegotiation; a TLS 1.3 key update's answer goes with the next data.)
                return self.kick(ring).map_err(|e| format!("submitting to the ring: {e}"));
            }
            Some(RecvInto::Rx) => conn.rx_end = (conn.rx_end + n).min(conn.rx.len()),
            Some(RecvInto::Payload(slot)) => {
                let r = self.reqs.get_mut(slot).ok_or("internal: read data for a request that is gone")?;
                r.got = (r.got as usize + n).min(r.len as usize) as u32;
                if r.got == r.len {
                    conn.rx_state = RxState::Header;
                    self.replied(slot, 0, done);
                }
            }
            None => return Err("internal: a receive completed that was not posted".into()),
        }
        self.process_rx(done)?;
        let NbdTarget { conn, reqs, .. } = self;
        if let Some(conn) = conn.as_mut() {
            post_recv(conn, reqs, ring).map_err(|e| format!("submitting a receive: {e}"))?;
        }
        Ok(())
    }

    /// TLS: `n` bytes of ciphertext arrived in the connection's `crx`: decrypts them and parses
    /// what they carry.
    fn on_cipher(&mut self, n: usize, done: &mut Vec<TargetDone>) -> Result<(), String> {
        let mut off = 0;
        let mut stalls = 0;
        loop {
            let conn = self.conn.as_mut().ok_or("internal: no connection")?;
            let tls = conn.tls.as_mut().ok_or("internal: ciphertext without TLS")?;
            if off < n {
                let k = tls.read_tls(&mut &conn.crx[off..n]).map_err(|e| format!("TLS: {e}"))?;
                off += k;
                stalls = if k == 0 { stalls + 1 } else { 0 };
                if stalls > 2 {
                    return Err("internal: TLS takes no more ciphertext".into());
                }
            }
            let state = tls.process_new_packets().map_err(|e| tls::explain(&e).to_string())?;
            let closed = state.peer_has_closed();
            self.drain_plaintext(done)?;
            if closed {
                let waiting = self.reqs.len();
                return Err(format!("the server ended the TLS session (close_notify) with {waiting} requests waiting"));
            }
            if off >= n {
                return Ok(());
            }
        }
    }

    /// TLS: hands the decrypted bytes to the reply parser: read data straight into the
    /// caller's buffer when no header is pending, everything else through the receive buffer.
    fn drain_plaintext(&mut self, done: &mut Vec<TargetDone>) -> Result<(), String> {
        loop {
            let NbdTarget { conn, reqs, .. } = self;
            let conn = conn.as_mut().ok_or("internal: no connection")?;
            let tls = conn.tls.as_mut().ok_or("internal: plaintext without TLS")?;
            let got = match conn.rx_state {
                RxState::Payload(slot) if conn.rx_start == conn.rx_end => {
                    let r = reqs.get_mut(slot).ok_or("internal: read data for a request that is gone")?;
                    // SAFETY: `r.buf` is the destination of a read in flight, valid for `r.len`
                    // bytes until the operation completes (TargetOp::Read's contract), and
                    // `r.got < r.len` in this state; no SQE writes there (TLS receives go to
                    // `crx`).
                    let dst = unsafe { std::slice::from_raw_parts_mut(r.buf.add(r.got as usize), (r.len - r.got) as usize) };
                    match tls.reader().read(dst) {
                        Ok(k) if k > 0 => {
                            r.got += k as u32;
                            if r.got == r.len {
                                conn.rx_state = RxState::Header;
                                self.replied(slot, 0, done);
                            }
                            continue;
                        }
                        r => r,
                    }
                }
                _ => {
                    if conn.rx_start > 0 {
                        conn.rx.copy_within(conn.rx_start..conn.rx_end, 0);
                        conn.rx_end -= conn.rx_start;
                        conn.rx_start = 0;
                    }
                    match tls.reader().read(&mut conn.rx[conn.rx_end..]) {
                        Ok(k) if k > 0 => {
                            conn.rx_end += k;
                            self.process_rx(done)?;
                            continue;
                        }
                        r => r,
                    }
                }
            };
            return match got {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
                // Ok(0): the session ended (close_notify): on_cipher reports it.
                Ok(_) => Ok(()),
                Err(e) => Err(format!("TLS: {e}")),
            };
        }
    }

    /// Parses what the receive buffer holds: reply headers and the read data after them.
    fn process_rx(&mut self, done: &mut Vec<TargetDone>) -> Result<(), String> {
        loop {
            let Some(conn) = self.conn.as_mut() else { return Ok(()) };
            let avail = conn.rx_end - conn.rx_start;
            match conn.rx_state {
                RxState::Payload(slot) => {
                    if avail == 0 {
                        break;
                    }
                    let r = self.reqs.get_mut(slot).ok_or("internal: read data for a request that is gone")?;
                    let n = avail.min((r.len - r.got) as usize);
                    // SAFETY: `r.buf` is the destination of a read in flight, valid for `r.len`
                    // bytes until the operation completes (the contract of TargetOp::Read), and
                    // `r.got + n <= r.len`; the source is our own receive buffer, another
                    // allocation, with `n <= avail` bytes from `rx_start`.
                    unsafe {
                        std::ptr::copy_nonoverlapping(conn.rx.as_ptr().add(conn.rx_start), r.buf.add(r.got as usize), n)
                    };
                    r.got += n as u32;
                    conn.rx_start += n;
                    if r.got == r.len {
                        conn.rx_state = RxState::Header;
                        self.replied(slot, 0, done);
                    }
                }
                RxState::Header => {
                    if avail < REPLY_LEN {
                        break;
                    }
                    let mut h = [0u8; REPLY_LEN];
                    h.copy_from_slice(&conn.rx[conn.rx_start..conn.rx_start + REPLY_LEN]);
                    conn.rx_start += REPLY_LEN;
                    let (magic, error, cookie) = reply(&h);
                    if magic == STRUCTURED_REPLY_MAGIC {
                        return Err("the server sent a structured reply, which was not negotiated".into());
                    }
                    if magic != SIMPLE_REPLY_MAGIC {
                        return Err(format!(
                            "bad reply magic {magic:#010x} (expected {SIMPLE_REPLY_MAGIC:#010x}): the reply stream is corrupt"
                        ));
                    }
                    let (slot, seq) = ((cookie & 0xffff_ffff) as usize, (cookie >> 32) as u32);
                    let r = match self.reqs.get(slot) {
                        Some(r) if r.seq == seq && r.reply.is_none() => r,
                        Some(r) if r.seq == seq => {
                            return Err(format!("second reply for the request with cookie {cookie:#x}"))
                        }
                        _ => {
                            return Err(format!(
                                "reply with cookie {cookie:#x}, which matches no request in flight \
                                 (unknown or already answered)"
                            ))
                        }
                    };
                    if r.cmd == CMD_READ && error == 0 && r.len > 0 {
                        conn.rx_state = RxState::Payload(slot);
                    } else {
                        self.replied(slot, error, done);
                    }
                }
            }
        }
        Ok(())
    }

    fn on_timer(&mut self, ring: &mut Ring, done: &mut Vec<TargetDone>) {
        self.timer_posted = false;
        if self.broken.is_some() || self.reqs.is_empty() {
            return;
        }
        let idle = self.last_progress.elapsed();
        if idle >= self.request_timeout {
            let msg = format!(
                "no reply from the server for {:.0} s with {} requests in flight",
                idle.as_secs_f64(),
                self.reqs.len()
            );
            self.break_conn(msg, done);
            return;
        }
        // SAFETY: the timeout's timespec is a static.
        if let Err(e) = unsafe { push(ring, opcode::Timeout::new(&TICK).build(), Owner::Target, sub(K_TIMER, 0)) } {
            self.break_conn(format!("submitting a timer: {e}"), done);
        } else {
            self.timer_posted = true;
        }
    }
}

/// Moves requests from the send queue into a new batch (over TLS, up to [`TLS_BATCH`] bytes).
fn fill_batch(conn: &mut Conn, reqs: &Slab<Box<Req>>) {
    let cap = if conn.tls.is_some() { TLS_BATCH } else { usize::MAX };
    let mut total = 0;
    let b = &mut *conn.send;
    b.first = 0;
    b.n = 0;
    b.reqs.clear();
    b.rfirst = 0;
    while let Some(&slot) = conn.sendq.front() {
        if total >= cap {
            break;
        }
        let Some(r) = reqs.get(slot) else {
            conn.sendq.pop_front();
            continue;
        };
        let with_data = r.cmd == CMD_WRITE && r.len > 0;
        if b.n + 1 + with_data as usize > MAX_IOV {
            break;
        }
        conn.sendq.pop_front();
        b.iov[b.n] = libc::iovec { iov_base: r.hdr.as_ptr() as *mut libc::c_void, iov_len: REQUEST_LEN };
        b.n += 1;
        let mut bytes = REQUEST_LEN;
        if with_data {
            b.iov[b.n] = libc::iovec { iov_base: r.buf as *mut libc::c_void, iov_len: r.len as usize };
            b.n += 1;
            bytes += r.len as usize;
        }
        total += bytes;
        b.reqs.push((slot, bytes));
    }
}

/// TLS: encrypts the batch's pieces into its ciphertext buffer, which becomes its one piece
/// (with whatever else the session has to send). The requests stay listed in the batch: they
/// are sent when the ciphertext is. The pieces are taken a record's worth at a time across
/// their boundaries (a request's header and the start of its payload share a record), each
/// record drained at once: rustls then holds one record, whose memory the allocator reuses.
///
/// # Safety
/// The batch's iovecs must point at live memory of their lengths, and no posted SQE may use the
/// batch.
unsafe fn encrypt_batch(b: &mut SendBatch, tls: &mut ClientConnection) -> io::Result<()> {
    b.cipher.clear();
    let mut window: Vec<io::IoSlice<'_>> = Vec::with_capacity(4);
    let mut in_window = 0;
    for v in &b.iov[b.first..b.n] {
        // SAFETY: the caller's contract: the piece is live for its length.
        let mut piece = unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) };
        while !piece.is_empty() {
            let take = piece.len().min(TLS_RECORD - in_window);
            window.push(io::IoSlice::new(&piece[..take]));
            in_window += take;
            piece = &piece[take..];
            if in_window == TLS_RECORD {
                seal(tls, &window, &mut b.cipher)?;
                window.clear();
                in_window = 0;
            }
        }
    }
    if in_window > 0 {
        seal(tls, &window, &mut b.cipher)?;
    }
    while tls.wants_write() {
        tls.write_tls(&mut b.cipher)?;
    }
    b.first = 0;
    b.n = 0;
    if !b.cipher.is_empty() {
        b.iov[0] = libc::iovec { iov_base: b.cipher.as_mut_ptr() as *mut libc::c_void, iov_len: b.cipher.len() };
        b.n = 1;
    }
    Ok(())
}

/// Encrypts `window` (at most a record's worth) and appends the records to `out`.
fn seal(tls: &mut ClientConnection, window: &[io::IoSlice<'_>], out: &mut Vec<u8>) -> io::Result<()> {
    let want: usize = window.iter().map(|w| w.len()).sum();
    // The buffer limit is off (TlsClient::connection): rustls takes all of it, or fails.
    let n = tls.writer().write_vectored(window)?;
    if n != want {
        return Err(io::Error::other(format!("TLS took {n} of {want} bytes")));
    }
    while tls.wants_write() {
        tls.write_tls(out)?;
    }
    Ok(())
}

/// Posts a sendmsg of the current batch's remaining pieces.
fn post_send(conn: &mut Conn, ring: &mut Ring) -> io::Result<()> {
    let b = &mut *conn.send;
    b.msg.msg_iov = b.iov[b.first..].as_mut_ptr();
    b.msg.msg_iovlen = (b.n - b.first) as _;
    // MSG_NOSIGNAL: a server gone away is an error on this request, not a SIGPIPE.
    let e = opcode::SendMsg::new(types::Fd(conn.stream.as_raw_fd()), &b.msg).flags(libc::MSG_NOSIGNAL as u32).build();
    // SAFETY: the message and its iovecs live in the boxed batch, which is not touched again
    // until this send completes (send_posted) and is leaked by Drop if it never does; the
    // iovecs point at request headers in boxed requests and at the caller's write buffers,
    // which stay until the request's reply (Target::submit's contract), or, over TLS, at the
    // batch's own ciphertext buffer (changed only by encrypt_batch, never while a send is
    // posted); the socket belongs to `conn`, whose descriptor is kept open while a send or
    // receive is posted.
    unsafe { push(ring, e, Owner::Target, sub(K_SEND, conn.gen)) }?;
    conn.send_posted = true;
    Ok(())
}

/// Posts the receive: into the caller's buffer when read data is due and the receive buffer
/// is empty, into the receive buffer otherwise.
fn post_recv(conn: &mut Conn, reqs: &mut Slab<Box<Req>>, ring: &mut Ring) -> io::Result<()> {
    let fd = types::Fd(conn.stream.as_raw_fd());
    let (e, into) = match conn.rx_state {
        _ if conn.tls.is_some() => {
            let e = opcode::Recv::new(fd, conn.crx.as_mut_ptr(), conn.crx.len() as u32).build();
            (e, RecvInto::Cipher)
        }
        RxState::Payload(slot) if conn.rx_start == conn.rx_end => {
            let r = reqs
                .get_mut(slot)
                .ok_or_else(|| io::Error::other("internal: read data for a request that is gone"))?;
            let ptr = r.buf.wrapping_add(r.got as usize);
            let e = opcode::Recv::new(fd, ptr, r.len - r.got).flags(libc::MSG_WAITALL).build();
            (e, RecvInto::Payload(slot))
        }
        _ => {
            // Less than a header is left after parsing: move it to the front.
            if conn.rx_start > 0 {
                conn.rx.copy_within(conn.rx_start..conn.rx_end, 0);
                conn.rx_end -= conn.rx_start;
                conn.rx_start = 0;
            }
            let ptr = conn.rx[conn.rx_end..].as_mut_ptr();
            let e = opcode::Recv::new(fd, ptr, (conn.rx.len() - conn.rx_end) as u32).build();
            (e, RecvInto::Rx)
        }
    };
    // SAFETY: the receive writes into `conn.rx` or `conn.crx` (boxed, leaked by Drop while a
    // receive is posted) or into the caller's read buffer, valid until the request completes (Target::
    // submit's contract); recv_posted keeps a second receive off both until this one completes.
    unsafe { push(ring, e, Owner::Target, sub(K_RECV, conn.gen)) }?;
    conn.recv_posted = Some(into);
    Ok(())
}

impl Target for NbdTarget {
    /// The export's size, rounded down to the minimum block size (the tail beyond cannot be
    /// addressed).
    fn size(&self) -> u64 {
        self.export.size / self.export.min_block as u64 * self.export.min_block as u64
    }
    fn describe(&self) -> String {
        self.name.clone()
    }
    fn block_size(&self) -> u32 {
        self.export.min_block.max(512)
    }
    /// The normalized URI (without TLS: the same export over TLS or not is the same data) and
    /// the export size: a bitmap made for another export (or this one after a resize) is
    /// refused.
    fn identity(&self) -> (String, u64) {
        (self.uri.identity(), self.export.size)
    }
    /// The server may take a snapshot at each flush.
    fn flush_publishes(&self) -> bool {
        true
    }

    unsafe fn submit(&mut self, ring: &mut Ring, op: TargetOp, token: u64) -> io::Result<()> {
        if let Some(msg) = self.broken.clone() {
            let e = self.error(io::ErrorKind::NotConnected, &msg);
            return self.complete_later(ring, token, Err(e));
        }
        if self.conn.is_none() {
            let e = self.error(io::ErrorKind::NotConnected, "not connected");
            return self.complete_later(ring, token, Err(e));
        }
        let (what, off, len) = match op {
            TargetOp::Write { off, len, .. } => ("write", off, len as u64),
            TargetOp::Read { off, len, .. } => ("read", off, len as u64),
            TargetOp::Zero { off, len } => ("zeroing", off, len),
            TargetOp::Flush => ("flush", 0, 0),
        };
        let min = self.export.min_block as u64;
        if off % min != 0 || len % min != 0 {
            let e = self.error(
                io::ErrorKind::InvalidInput,
                &format!("{what} of {len} bytes at byte {off} is not aligned to the export's minimum block size {min}"),
            );
            return self.complete_later(ring, token, Err(e));
        }
        if off.checked_add(len).is_none_or(|end| end > self.export.size) {
            let e = self.error(
                io::ErrorKind::InvalidInput,
                &format!("{what} of {len} bytes at byte {off} goes beyond the export's end ({} bytes)", self.export.size),
            );
            return self.complete_later(ring, token, Err(e));
        }
        if len == 0 && !matches!(op, TargetOp::Flush) {
            return self.complete_later(ring, token, Ok(0));
        }
        let result = match op {
            TargetOp::Write { len, .. } | TargetOp::Read { len, .. } => len,
            _ => 0,
        };
        let idx = self.ops.insert(Op { token, parts: 0, result, err: None });
        let max = self.export.max_payload as u64;
        match op {
            TargetOp::Write { off, buf, len } => {
                let mut pos = 0u64;
                while pos < len as u64 {
                    let n = (len as u64 - pos).min(max);
                    let p = buf.wrapping_add(pos as usize) as *mut u8;
                    self.add_req(idx, CMD_WRITE, 0, off + pos, n as u32, p);
                    pos += n;
                }
            }
            TargetOp::Read { off, buf, len } => {
                let mut pos = 0u64;
                while pos < len as u64 {
                    let n = (len as u64 - pos).min(max);
                    self.add_req(idx, CMD_READ, 0, off + pos, n as u32, buf.wrapping_add(pos as usize));
                    pos += n;
                }
            }
            TargetOp::Zero { off, len } => {
                // NBD_CMD_FLAG_NO_HOLE stays clear: the server may punch holes, as the file
                // target does.
                let zeroes = self.export.has(TFLAG_SEND_WRITE_ZEROES);
                let chunk = if zeroes {
                    (MAX_ZERO_REQUEST as u64 / min * min).max(min)
                } else {
                    ZERO_BUF.min(self.export.max_payload) as u64
                };
                let zbuf = if zeroes {
                    std::ptr::null_mut()
                } else {
                    if self.zero.is_none() {
                        log::info!(
                            "NBD server {}: no WRITE_ZEROES; zeroing by writing zeroes",
                            self.name
                        );
                    }
                    // Never written to: the kernel only reads it as the payload of writes.
                    self.zero.get_or_insert_with(|| vec![0u8; ZERO_BUF as usize].into_boxed_slice()).as_mut_ptr()
                };
                let mut pos = 0u64;
                while pos < len {
                    let n = (len - pos).min(chunk);
                    let cmd = if zeroes { CMD_WRITE_ZEROES } else { CMD_WRITE };
                    self.add_req(idx, cmd, 0, off + pos, n as u32, zbuf);
                    pos += n;
                }
            }
            TargetOp::Flush => self.add_req(idx, CMD_FLUSH, 0, 0, 0, std::ptr::null_mut()),
        }
        self.kick(ring)
    }

    fn complete(&mut self, ring: &mut Ring, sub: u64, res: i32, done: &mut Vec<TargetDone>) {
        let (kind, gen) = (sub >> 32, sub as u32);
        match kind {
            K_NOP => {
                self.nop_posted = false;
                done.append(&mut self.ready);
            }
            K_TIMER => self.on_timer(ring, done),
            K_RECV | K_SEND if self.conn.as_ref().is_some_and(|c| c.gen == gen) => {
                let r = if kind == K_RECV { self.on_recv(ring, res, done) } else { self.on_send(ring, res, done) };
                if let Err(msg) = r {
                    self.break_conn(msg, done);
                }
                if self.broken.is_some() {
                    self.fail_unpinned(done);
                }
            }
            K_RECV | K_SEND => {
                // An old connection's SQE: it only held the connection's own buffers.
                if let Some(i) = self.retired.iter().position(|c| c.gen == gen) {
                    let c = &mut self.retired[i];
                    if kind == K_RECV {
                        c.recv_posted = None;
                    } else {
                        c.send_posted = false;
                    }
                    if !c.busy() {
                        self.retired.swap_remove(i);
                    }
                }
            }
            _ => log::error!("NBD target: completion of unknown kind {sub:#x}"),
        }
    }

    /// Everything posted on the earlier ring (the receive, a send, the timer, a NOP) is lost
    /// with it: the operations were the old loop's (it waited for them or leaked their
    /// buffers), and the connection, its stream position unknown, is dropped (its buffers
    /// leaked: the old ring's teardown may still be cancelling SQEs that use them). The next
    /// reset connects anew. A target on whose ring nothing was ever posted keeps its connection.
    fn ring_changed(&mut self) -> bool {
        // (Completions waiting for a NOP count: one whose NOP could not be posted would
        // otherwise be handed to the new loop, whose tokens mean other operations.)
        let posted = self.nop_posted || self.timer_posted || self.conn.as_ref().is_some_and(|c| c.busy());
        if !posted && self.ops.is_empty() && self.retired.is_empty() && self.ready.is_empty() {
            return false;
        }
        self.ops.clear();
        self.ready.clear();
        self.nop_posted = false;
        self.timer_posted = false;
        let mut leak_zero = false;
        for mut c in self.conn.take().into_iter().chain(self.retired.drain(..)) {
            c.stream.shutdown();
            leak_zero |= leak_if_busy(&mut c);
        }
        if leak_zero {
            // A send in flight may still read the request headers its iovecs point at.
            std::mem::forget(std::mem::take(&mut self.reqs));
        }
        self.reqs.clear();
        if leak_zero {
            if let Some(z) = self.zero.take() {
                Box::leak(z);
            }
        }
        self.broken = Some("the mirror loop restarted on a new ring: reconnecting".into());
        true
    }

    fn reset(&mut self) -> io::Result<()> {
        if self.broken.is_none() && self.conn.is_some() {
            return Ok(());
        }
        if !self.ops.is_empty() {
            return Err(self.error(io::ErrorKind::Other, "cannot reconnect with operations in flight"));
        }
        if let Some(c) = self.conn.take() {
            c.stream.shutdown();
            if c.busy() {
                self.retired.push(c);
            }
        }
        let deadline = Instant::now() + RESET_TIMEOUT;
        let mut s = handshake::connect(&self.uri, &self.addrs, deadline)
            .map_err(|e| self.error(e.kind(), &format!("reconnecting: {e}")))?;
        let (export, session) = handshake::handshake(&mut s, &self.uri.export, deadline, self.tls.as_ref())
            .map_err(|e| self.error(e.kind(), &format!("handshake after reconnecting: {e}")))?;
        if export.size != self.export.size {
            return Err(self.error(
                io::ErrorKind::InvalidData,
                &format!(
                    "the export's size changed from {} to {} bytes across a reconnect: it is not the \
                     same export any more; restore it, or start a new mirror with a full sync",
                    self.export.size, export.size
                ),
            ));
        }
        // The copies were laid out for the block size at open (Engine::open checks granularity
        // and size against it, the mirror its buffers): a smaller one (a power of two, so a
        // divisor) still fits them, a larger one would fail them for ever.
        if export.min_block.max(512) > self.open_block {
            return Err(self.error(
                io::ErrorKind::InvalidData,
                &format!(
                    "the export's minimum block size grew from {} to {} bytes across a reconnect: \
                     the mirror's copies were laid out for the old one; restore the server's \
                     block size, or stop the mirror and start it again",
                    self.open_block, export.min_block
                ),
            ));
        }
        check_usable(&export).map_err(|(e, fix)| self.error(e.kind(), &format!("after reconnecting: {e}; {fix}")))?;
        s.set_read_timeout(None)?;
        s.set_write_timeout(None)?;
        self.gen = self.gen.wrapping_add(1);
        self.tls_info = session.as_ref().map(session_info);
        self.conn = Some(Conn::new(s, self.gen, session));
        self.export = export;
        self.broken = None;
        log::info!("NBD server {}: reconnected", self.name);
        Ok(())
    }
}

/// Leaks the buffers of a connection with SQEs in flight (they may still use them); returns
/// whether a send was in flight (which may use the shared zero buffer too).
fn leak_if_busy(c: &mut Conn) -> bool {
    if !c.busy() {
        return false;
    }
    Box::leak(std::mem::take(&mut c.rx));
    Box::leak(std::mem::take(&mut c.crx));
    Box::leak(std::mem::replace(&mut c.send, SendBatch::boxed()));
    c.send_posted
}

impl Drop for NbdTarget {
    fn drop(&mut self) {
        if let Some(c) = self.conn.as_mut() {
            // A polite goodbye, when no request is half sent. Best effort, bounded.
            if self.broken.is_none() && !c.send_posted {
                let _ = c.stream.set_write_timeout(Some(Duration::from_secs(1)));
                let disc = request(CMD_DISC, 0, 0, 0, 0);
                match c.tls.as_mut() {
                    Some(t) => {
                        let _ = t.writer().write_all(&disc);
                        t.send_close_notify();
                        while t.wants_write() {
                            if t.write_tls(&mut c.stream).is_err() {
                                break;
                            }
                        }
                    }
                    None => {
                        let _ = c.stream.write_all(&disc);
                    }
                }
            }
            c.stream.shutdown();
        }
        // The ring may be gone already, with SQEs of ours that the kernel cancels on its own
        // schedule: buffers such an SQE may still use are leaked rather than freed under it
        // (a few KiB, once per target). The caller's buffers are not ours to keep; the mirror
        // waits for its operations before it goes.
        let mut leak_zero = false;
        for c in self.conn.iter_mut().chain(self.retired.iter_mut()) {
            leak_zero |= leak_if_busy(c);
        }
        if leak_zero {
            if let Some(z) = self.zero.take() {
                Box::leak(z);
            }
            // The send's iovecs point at request headers too.
            std::mem::forget(std::mem::take(&mut self.reqs));
        }
    }
}
