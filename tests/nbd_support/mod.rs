//! What the NBD tests share: real servers (qemu-nbd, nbdkit) on loopback, a driver for a
//! target on its own ring, bounded syncs.
#![allow(dead_code)]

use crate::common::*;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use ublk_mirror::engine::mirror::TestHooks;
use ublk_mirror::engine::{CopyConfig, PairOptions};
use ublk_mirror::io::backing::DirectMode;
use ublk_mirror::io::nbd::NbdTarget;
use ublk_mirror::io::target::{Target, TargetOp};
use ublk_mirror::io::uring::{self, Owner, Ring};
use ublk_mirror::offline::{self, VerifyOptions};

pub const MIB: u64 = 1 << 20;
pub const G: u64 = 64 << 10;

// ---------------------------------------------------------------------------------------------
// Servers

pub fn require(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is not installed: these tests need it (Debian package {package}); run scripts/deps.sh as root"
    );
}

/// A free TCP port on 127.0.0.1 (bound and released: another process could take it in
/// between, which is unlikely on a test machine).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Transport {
    Tcp,
    Unix,
}

/// An NBD server process, killed when dropped.
pub struct Server {
    pub program: &'static str,
    pub args: Vec<String>,
    pub child: Option<Child>,
    pub uri: String,
    /// Where it listens: a socket path or a port.
    pub socket: Option<PathBuf>,
    pub port: Option<u16>,
    pub log: PathBuf,
}

impl Server {
    /// qemu-nbd serving `file` (raw) as export `export`. `extra`: more options (-r...).
    pub fn qemu(dir: &Path, file: &Path, t: Transport, extra: &[&str]) -> Server {
        require("qemu-nbd", "qemu-utils");
        let mut args: Vec<String> =
            ["-f", "raw", "-x", "exp", "--persistent", "--shared=8"].iter().map(|s| s.to_string()).collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let (uri, socket, port) = listen(dir, t, &mut args, |a, s| {
            a.push(format!("--socket={}", s.display()));
        }, |a, p| {
            a.extend(["-p".into(), p.to_string(), "-b".into(), "127.0.0.1".into()]);
        });
        args.push(file.display().to_string());
        Server::start_new("qemu-nbd", args, uri, socket, port, dir)
    }

    /// nbdkit with `plugin_args` (plugin, its parameters, filters...).
    pub fn nbdkit(dir: &Path, t: Transport, plugin_args: &[&str]) -> Server {
        require("nbdkit", "nbdkit");
        let mut args: Vec<String> = vec!["-f".into()];
        let (uri, socket, port) = listen(dir, t, &mut args, |a, s| {
            a.extend(["-U".into(), s.display().to_string()]);
        }, |a, p| {
            a.extend(["-p".into(), p.to_string(), "-i".into(), "127.0.0.1".into()]);
        });
        args.extend(plugin_args.iter().map(|s| s.to_string()));
        Server::start_new("nbdkit", args, uri, socket, port, dir)
    }

    pub fn start_new(
        program: &'static str,
        args: Vec<String>,
        uri: String,
        socket: Option<PathBuf>,
        port: Option<u16>,
        dir: &Path,
    ) -> Server {
        let log = dir.join(format!("{program}.log"));
        let mut s = Server { program, args, child: None, uri, socket, port, log };
        s.start();
        s
    }

    /// Starts the process and waits (at most 10 s) until it accepts connections.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        if let Some(s) = &self.socket {
            // A killed server leaves its socket behind.
            let _ = std::fs::remove_file(s);
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("server log");
        let child = Command::new(self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.program));
        self.child = Some(child);
        let t0 = Instant::now();
        loop {
            let up = match (&self.socket, self.port) {
                (Some(s), _) => std::os::unix::net::UnixStream::connect(s).is_ok(),
                (None, Some(p)) => TcpStream::connect(("127.0.0.1", p)).is_ok(),
                _ => unreachable!("a server listens somewhere"),
            };
            if up {
                return;
            }
            if let Some(Some(st)) = self.child.as_mut().map(|c| c.try_wait().ok().flatten()) {
                panic!("{} {:?} exited ({st}): {}", self.program, self.args, std::fs::read_to_string(&self.log).unwrap_or_default());
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "{} did not start listening within 10 s", self.program);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, and wait for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn listen(
    dir: &Path,
    t: Transport,
    args: &mut Vec<String>,
    unix: impl FnOnce(&mut Vec<String>, &Path),
    tcp: impl FnOnce(&mut Vec<String>, u16),
) -> (String, Option<PathBuf>, Option<u16>) {
    match t {
        Transport::Unix => {
            let s = dir.join("nbd.sock");
            unix(args, &s);
            (format!("nbd+unix:///exp?socket={}", s.display()), Some(s), None)
        }
        Transport::Tcp => {
            let p = free_port();
            tcp(args, p);
            (format!("nbd://127.0.0.1:{p}/exp"), None, Some(p))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

pub fn pair(f: &Files, uri: &str) -> PairOptions {
    PairOptions {
        source: f.source.clone(),
        target: PathBuf::from(uri),
        bitmap: f.bitmap.clone(),
        mode: None,
        granularity: None,
        direct: DirectMode::Auto,
        source_writable: true,
        tls: Default::default(),
    }
}

pub fn verify(f: &Files, uri: &str) -> offline::VerifyReport {
    offline::verify(&VerifyOptions {
        source: f.source.clone(),
        target: PathBuf::from(uri),
        bitmap: Some(f.bitmap.clone()),
        granularity: None,
        direct: DirectMode::Auto,
        tls: Default::default(),
    })
    .expect("verify")
}

/// A source with data in scattered places and holes elsewhere; the target file full of
/// garbage, which the holes must erase.
pub fn sparse_pair(size: u64, seed: u64) -> Files {
    let f = files(size);
    fill_random(&f.target, 0, size as usize, seed + 100);
    fill_random(&f.source, 0, MIB as usize, seed);
    fill_random(&f.source, 3 * MIB + 4096, (2 * MIB) as usize, seed + 1);
    fill_random(&f.source, size - 512 * 1024, 256 * 1024, seed + 2);
    f
}

pub fn assert_same_files(a: &Path, b: &Path) {
    assert_eq!(first_difference(&read_all(a), &read_all(b)), None, "{} and {} differ", a.display(), b.display());
}

/// Runs `sync` in a thread and fails the test if it takes longer than `limit`.
#[allow(clippy::result_large_err)] // the crate's error type, as returned by sync
pub fn sync_bounded(p: &PairOptions, cfg: &CopyConfig, hooks: TestHooks, limit: Duration) -> ublk_mirror::Result<offline::SyncReport> {
    // TestHooks are not Send; they are built by the caller on this thread, so the sync runs here and
    // a watchdog thread aborts the process on a hang (a panic there would not stop this thread).
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = done.clone();
    std::thread::spawn(move || {
        let t0 = Instant::now();
        while !d.load(std::sync::atomic::Ordering::SeqCst) {
            if t0.elapsed() > limit {
                eprintln!("sync hung for more than {limit:?}");
                std::process::abort();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let r = offline::sync(p, cfg, hooks, None);
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    r
}

pub const LIMIT: Duration = Duration::from_secs(120);

/// Drives a target on its own ring: submit operations, collect their results.
pub struct Driver {
    // Dropped first: the ring goes before the target its SQEs refer to.
    pub ring: Ring,
    pub t: NbdTarget,
}

impl Driver {
    pub fn new(t: NbdTarget) -> Driver {
        Driver { ring: uring::new_ring(64).expect("ring"), t }
    }

    /// Submits `ops` (tokens 0..n) and waits for all their completions, at most `limit`. The
    /// buffers in `ops` are the caller's, borrowed for this call: it returns only once every
    /// operation completed, and a target that hangs ends the process (its buffers may still be
    /// written; unwinding would free them).
    pub fn run(&mut self, ops: &[TargetOp], limit: Duration) -> Vec<io::Result<u32>> {
        let mut out: Vec<Option<io::Result<u32>>> = (0..ops.len()).map(|_| None).collect();
        for (i, op) in ops.iter().enumerate() {
            // SAFETY: see above.
            if let Err(e) = unsafe { self.t.submit(&mut self.ring, *op, i as u64) } {
                eprintln!("submitting operation {i}: {e}");
                std::process::abort();
            }
        }
        let t0 = Instant::now();
        let mut done = Vec::new();
        while out.iter().any(|o| o.is_none()) {
            if t0.elapsed() > limit {
                eprintln!("operations still pending after {limit:?}: the target hangs");
                std::process::abort();
            }
            self.poll(Duration::from_millis(50), &mut done);
            for (tok, r) in done.drain(..) {
                let slot = &mut out[tok as usize];
                assert!(slot.is_none(), "token {tok} completed twice");
                *slot = Some(r);
            }
        }
        out.into_iter().map(|o| o.expect("all done")).collect()
    }

    /// One pass of the ring: submits what is queued, waits up to `wait` for a completion, and
    /// hands every completion to the target; the operations that completed go to `done`
    /// (token, result).
    pub fn poll(&mut self, wait: Duration, done: &mut Vec<(u64, io::Result<u32>)>) {
        let ts = io_uring::types::Timespec::from(wait);
        let args = io_uring::types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR)) => {}
            Err(e) => {
                eprintln!("ring: {e}");
                std::process::abort();
            }
        }
        let mut cqes = Vec::new();
        uring::reap(&mut self.ring, &mut cqes);
        for (ud, res) in cqes {
            let (owner, sub) = uring::decode(ud);
            assert_eq!(owner, Some(Owner::Target), "only the target uses this ring");
            self.t.complete(&mut self.ring, sub, res, done);
        }
    }
}

pub fn write(off: u64, buf: &[u8]) -> TargetOp {
    TargetOp::Write { off, buf: buf.as_ptr(), len: buf.len() as u32 }
}
pub fn read(off: u64, buf: &mut [u8]) -> TargetOp {
    TargetOp::Read { off, buf: buf.as_mut_ptr(), len: buf.len() as u32 }
}

pub fn err_text(r: &io::Result<u32>) -> String {
    match r {
        Ok(n) => panic!("expected an error, got Ok({n})"),
        Err(e) => e.to_string(),
    }
}

