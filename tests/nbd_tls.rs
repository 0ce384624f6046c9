//! The NBD target over TLS (`nbds://`): against qemu-nbd (tls-creds-x509) and nbdkit
//! (`--tls=require`) on loopback, with certificates this test makes (a CA, server and client
//! certificates, and bad ones: another CA, an expired certificate, a wrong name), and against a
//! server written here that refuses TLS. Every wait is bounded; qemu-nbd and nbdkit must be
//! installed (scripts/deps.sh): these tests fail, never skip, without them.

mod common;
mod nbd_support;
use common::*;
use nbd_support::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use ublk_mirror::engine::mirror::{Mirror, RunUntil, TestHooks};
use ublk_mirror::engine::queue::{EngineQueue, Op};
use ublk_mirror::engine::{CopyConfig, Engine, PairOptions};
use ublk_mirror::io::backing::AlignedBuf;
use ublk_mirror::io::nbd::{tls::TlsFiles, NbdTarget};
use ublk_mirror::io::target::{Target, TargetOp};
use ublk_mirror::offline::{self, VerifyOptions};

// ---------------------------------------------------------------------------------------------
// Certificates

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ca { cert: p.self_signed(&key).expect("CA"), key }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Validity {
    Now,
    Expired,
}

/// A certificate for `names` (host names or addresses) signed by `ca`: PEM of the certificate
/// and of its key.
fn leaf(ca: &Ca, names: &[&str], server: bool, validity: Validity) -> (String, String) {
    let key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("params");
    p.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or("client"));
    p.extended_key_usages =
        vec![if server { ExtendedKeyUsagePurpose::ServerAuth } else { ExtendedKeyUsagePurpose::ClientAuth }];
    if validity == Validity::Expired {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let cert = p.signed_by(&key, &ca.cert, &ca.key).expect("sign");
    (cert.pem(), key.serialize_pem())
}

fn write_file(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A server's certificate directory as qemu-nbd (`tls-creds-x509,dir=`) and nbdkit
/// (`--tls-certificates`) read it: `ca-cert.pem` (the CA that signs clients' certificates),
/// `server-cert.pem`, `server-key.pem`.
fn server_dir(dir: &Path, ca: &Ca, signer: &Ca, names: &[&str], validity: Validity) -> PathBuf {
    std::fs::create_dir_all(dir).expect("mkdir");
    let (cert, key) = leaf(signer, names, true, validity);
    write_file(&dir.join("ca-cert.pem"), &ca.cert.pem(), 0o644);
    write_file(&dir.join("server-cert.pem"), &cert, 0o644);
    write_file(&dir.join("server-key.pem"), &key, 0o600);
    dir.to_path_buf()
}

/// Everything a test needs: the CA, a good server directory, a client certificate and key, and
/// the client side's files.
struct Pki {
    ca: Ca,
    good: PathBuf,
    ca_file: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        let ca = ca("ublk-mirror test CA");
        let good = server_dir(&dir.join("good"), &ca, &ca, &["localhost", "127.0.0.1"], Validity::Now);
        let ca_file = dir.join("ca.pem");
        write_file(&ca_file, &ca.cert.pem(), 0o644);
        let (cert, key) = leaf(&ca, &["client"], false, Validity::Now);
        let client_cert = dir.join("client-cert.pem");
        let client_key = dir.join("client-key.pem");
        write_file(&client_cert, &cert, 0o644);
        write_file(&client_key, &key, 0o600);
        Pki { ca, good, ca_file, client_cert, client_key }
    }

    /// Trusts the CA; no client certificate.
    fn files(&self) -> TlsFiles {
        TlsFiles { ca: Some(self.ca_file.clone()), cert: None, key: None }
    }

    /// Trusts the CA, and identifies the client (mutual TLS).
    fn mutual(&self) -> TlsFiles {
        TlsFiles { cert: Some(self.client_cert.clone()), key: Some(self.client_key.clone()), ..self.files() }
    }
}

// ---------------------------------------------------------------------------------------------
// Servers over TLS

/// qemu-nbd over TLS with the certificates in `dir`; `verify_peer`: it requires a client
/// certificate signed by its CA.
fn qemu_tls(f: &Files, t: Transport, dir: &Path, verify_peer: bool) -> Server {
    let creds = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer={}",
        dir.display(),
        if verify_peer { "yes" } else { "no" }
    );
    let mut s = Server::qemu(f.dir.path(), &f.target, t, &["--object", &creds, "--tls-creds", "tls0"]);
    s.uri = tls_uri(&s.uri);
    s
}

/// The server's URI with TLS: `nbds://`, or `nbds+unix://` naming the certificate's host.
fn tls_uri(plain: &str) -> String {
    if let Some(rest) = plain.strip_prefix("nbd+unix://") {
        format!("nbds+unix://{rest}&tls-hostname=localhost")
    } else {
        plain.replacen("nbd://", "nbds://", 1)
    }
}

/// Points a stopped server at another certificate directory (qemu-nbd's `dir=` or nbdkit's
/// `--tls-certificates=`).
fn use_certs(srv: &mut Server, from: &Path, to: &Path) {
    let (from, to) = (from.display().to_string(), to.display().to_string());
    for a in srv.args.iter_mut() {
        *a = a.replace(&from, &to);
    }
}

fn pair_tls(f: &Files, uri: &str, tls: TlsFiles) -> PairOptions {
    PairOptions { target: PathBuf::from(uri), bitmap: f.bitmap.clone(), tls, ..f.pair(None, None) }
}

fn verify_tls(f: &Files, uri: &str, tls: TlsFiles) -> offline::VerifyReport {
    offline::verify(&VerifyOptions {
        source: f.source.clone(),
        target: PathBuf::from(uri),
        bitmap: Some(f.bitmap.clone()),
        granularity: None,
        direct: ublk_mirror::io::backing::DirectMode::Auto,
        tls,
    })
    .expect("verify")
}

/// A full sync over TLS, then a verify over TLS: identical.
fn sync_tls_and_check(f: &Files, uri: &str, tls: &TlsFiles, size: u64) {
    let r = sync_bounded(&pair_tls(f, uri, tls.clone()), &CopyConfig::default(), TestHooks::default(), LIMIT)
        .expect("sync over TLS");
    assert_eq!(r.bytes_copied + r.bytes_zeroed, size, "every byte is copied or zeroed");
    let v = verify_tls(f, uri, tls.clone());
    assert!(v.identical(), "verify: {:?}", v.differing);
    assert_eq!(v.bytes_compared, size);
}

fn open_err(uri: &str, tls: &TlsFiles) -> String {
    match NbdTarget::open(uri, tls) {
        Ok(_) => panic!("{uri}: opened, but it must not"),
        Err(e) => e.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

/// qemu-nbd with tls-creds-x509, over TCP (the name checked is the address in the URI) and a
/// Unix socket (the name is `tls-hostname`): a full sync and a verify through TLS, and the file
/// behind the server ends equal to the source.
#[test]
fn sync_and_verify_through_qemu_nbd_over_tls() {
    const SIZE: u64 = 32 * MIB;
    for t in [Transport::Tcp, Transport::Unix] {
        let f = sparse_pair(SIZE, 3);
        let pki = Pki::new(&f.dir.path().join("pki"));
        let srv = qemu_tls(&f, t, &pki.good, false);
        sync_tls_and_check(&f, &srv.uri, &pki.files(), SIZE);
        drop(srv);
        assert_same_files(&f.source, &f.target);
    }
}

/// TLS 1.2 (qemu-nbd limited to it by a GnuTLS priority string): negotiated as such, and the
/// same sync and verify through it. (The other tests get TLS 1.3.)
#[test]
fn sync_over_tls_1_2() {
    const SIZE: u64 = 16 * MIB;
    let f = sparse_pair(SIZE, 6);
    let pki = Pki::new(&f.dir.path().join("pki"));
    let creds = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=no,priority=NORMAL:-VERS-TLS1.3",
        pki.good.display()
    );
    let mut srv = Server::qemu(f.dir.path(), &f.target, Transport::Tcp, &["--object", &creds, "--tls-creds", "tls0"]);
    srv.uri = tls_uri(&srv.uri);
    let t = NbdTarget::open(&srv.uri, &pki.files()).expect("open");
    assert!(t.tls_info().is_some_and(|i| i.contains("TLSv1_2")), "{:?}", t.tls_info());
    drop(t);
    sync_tls_and_check(&f, &srv.uri, &pki.files(), SIZE);
    drop(srv);
    assert_same_files(&f.source, &f.target);
    // Without the priority string: TLS 1.3.
    let srv = qemu_tls(&f, Transport::Unix, &pki.good, false);
    let t = NbdTarget::open(&srv.uri, &pki.files()).expect("open");
    assert!(t.tls_info().is_some_and(|i| i.contains("TLSv1_3")), "{:?}", t.tls_info());
}

/// nbdkit with `--tls=require`: the same through TLS; and plain `nbd://` to it is refused with
/// the fix (use nbds).
#[test]
fn nbdkit_requiring_tls() {
    const SIZE: u64 = 16 * MIB;
    let f = sparse_pair(SIZE, 4);
    let pki = Pki::new(&f.dir.path().join("pki"));
    let certs = format!("--tls-certificates={}", pki.good.display());
    let tgt = f.target.display().to_string();
    let mut srv = Server::nbdkit(f.dir.path(), Transport::Tcp, &["--tls=require", &certs, "file", &tgt]);
    let plain = srv.uri.clone();
    srv.uri = tls_uri(&plain);
    let e = open_err(&plain, &TlsFiles::default());
    assert!(e.contains("requires TLS") && e.contains("nbds://"), "{e}");
    sync_tls_and_check(&f, &srv.uri, &pki.files(), SIZE);
    drop(srv);
    assert_same_files(&f.source, &f.target);
}

/// Mutual TLS: a server that verifies its peers refuses a client without a certificate (the
/// error says to give one), and takes one signed by its CA.
#[test]
fn mutual_tls_with_qemu_nbd_and_nbdkit() {
    const SIZE: u64 = 8 * MIB;
    let f = sparse_pair(SIZE, 5);
    let pki = Pki::new(&f.dir.path().join("pki"));
    let srv = qemu_tls(&f, Transport::Tcp, &pki.good, true);
    let e = open_err(&srv.uri, &pki.files());
    assert!(e.contains("--tls-cert"), "no client certificate: {e}");
    sync_tls_and_check(&f, &srv.uri, &pki.mutual(), SIZE);
    drop(srv);

    let certs = format!("--tls-certificates={}", pki.good.display());
    let tgt = f.target.display().to_string();
    let mut srv =
        Server::nbdkit(f.dir.path(), Transport::Unix, &["--tls=require", "--tls-verify-peer", &certs, "file", &tgt]);
    srv.uri = tls_uri(&srv.uri);
    let e = open_err(&srv.uri, &pki.files());
    assert!(e.contains("--tls-cert"), "no client certificate: {e}");
    let mut d = Driver::new(NbdTarget::open(&srv.uri, &pki.mutual()).expect("mutual TLS"));
    let r = d.run(&[TargetOp::Flush], LIMIT);
    assert!(r[0].is_ok(), "{r:?}");
}

/// Each way TLS can fail fails at open, with an error naming the problem and its fix, and
/// nothing created: a server without TLS, a certificate from another CA, a name the
/// certificate does not carry, an expired certificate, a private key open to others, a
/// certificate without its key, TLS files with a plain URI.
#[test]
fn bad_tls_fails_clearly_and_creates_nothing() {
    let f = files(8 * MIB);
    let root = f.dir.path().join("pki");
    let pki = Pki::new(&root);

    // A server that does not offer TLS.
    let plain = Server::qemu(f.dir.path(), &f.target, Transport::Tcp, &[]);
    let e = open_err(&tls_uri(&plain.uri), &pki.files());
    assert!(e.contains("does not offer TLS") && e.contains("nothing was sent in clear"), "{e}");
    drop(plain);

    let srv = qemu_tls(&f, Transport::Tcp, &pki.good, false);
    // Another CA.
    let other = ca("another CA");
    let other_file = root.join("other-ca.pem");
    write_file(&other_file, &other.cert.pem(), 0o644);
    let e = open_err(&srv.uri, &TlsFiles { ca: Some(other_file), ..Default::default() });
    assert!(e.contains("not signed by a trusted CA") && e.contains("--tls-ca"), "{e}");
    // A name the certificate does not carry.
    let e = open_err(&format!("{}?tls-hostname=elsewhere.example", srv.uri), &pki.files());
    assert!(e.contains("not valid for the name") && e.contains("tls-hostname"), "{e}");
    // The key open to other users: refused before connecting.
    let loose = root.join("loose-key.pem");
    std::fs::copy(&pki.client_key, &loose).expect("copy");
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let e = open_err(&srv.uri, &TlsFiles { key: Some(loose.clone()), ..pki.mutual() });
    assert!(e.contains("open to other users") && e.contains("chmod o-rwx"), "{e}");
    let e = open_err(&srv.uri, &TlsFiles { key: None, ..pki.mutual() });
    assert!(e.contains("add --tls-key"), "{e}");
    // TLS files with a URI that does not ask for TLS.
    let e = open_err(&srv.uri.replacen("nbds://", "nbd://", 1), &pki.files());
    assert!(e.contains("does not ask for TLS") && e.contains("nbds://"), "{e}");
    // A sync that fails on TLS leaves no bitmap behind.
    let p = pair_tls(&f, &format!("{}?tls-hostname=elsewhere.example", srv.uri), pki.files());
    let e = sync_bounded(&p, &CopyConfig::default(), TestHooks::default(), LIMIT).expect_err("bad name").to_string();
    assert!(e.contains("not valid for the name"), "{e}");
    assert!(!f.bitmap.exists(), "a failed open created the bitmap");
    drop(srv);

    // An expired server certificate (nbdkit serves it; qemu-nbd refuses to load one).
    let expired = server_dir(&root.join("expired"), &pki.ca, &pki.ca, &["localhost", "127.0.0.1"], Validity::Expired);
    let certs = format!("--tls-certificates={}", expired.display());
    let srv = Server::nbdkit(f.dir.path(), Transport::Tcp, &["--tls=require", &certs, "memory", "8M"]);
    let e = open_err(&tls_uri(&srv.uri), &pki.files());
    assert!(e.contains("expired") && e.contains("renew"), "{e}");
}

/// A fake server's side of the negotiation up to the client's first option, which must be
/// NBD_OPT_STARTTLS; it answers with reply type `reply` (NBD_REP_ACK, or an error).
fn fake_starttls(s: &mut std::net::TcpStream, reply: u32) {
    let mut greeting = b"NBDMAGICIHAVEOPT".to_vec();
    greeting.extend_from_slice(&1u16.to_be_bytes()); // fixed newstyle
    s.write_all(&greeting).expect("greeting");
    let mut head = [0u8; 4 + 16];
    s.read_exact(&mut head).expect("client flags and an option");
    assert_eq!(&head[4..12], b"IHAVEOPT");
    assert_eq!(u32::from_be_bytes([head[12], head[13], head[14], head[15]]), 5, "STARTTLS comes first");
    let mut r = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
    r.extend_from_slice(&5u32.to_be_bytes());
    r.extend_from_slice(&reply.to_be_bytes());
    r.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&r).expect("option reply");
}

/// A server that answers NBD_OPT_STARTTLS with an error: the client gives up and sends nothing
/// more (the export's name, the first thing the negotiation would reveal, never crosses).
#[test]
fn nothing_is_sent_in_clear_when_the_server_refuses_tls() {
    let l = TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = l.local_addr().expect("addr").port();
    let server = std::thread::spawn(move || -> Vec<u8> {
        let (mut s, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        fake_starttls(&mut s, (1 << 31) | 2); // NBD_REP_ERR_POLICY
        // Whatever comes now, until the client closes (or the timeout, which fails below).
        let mut rest = Vec::new();
        match s.read_to_end(&mut rest) {
            Ok(_) => rest,
            Err(e) => panic!("the client neither closed nor sent anything more: {e}"),
        }
    });
    let dir = tempfile::tempdir().expect("dir");
    let e = open_err(&format!("nbds://127.0.0.1:{port}/secret-export"), &Pki::new(dir.path()).files());
    assert!(e.contains("does not offer TLS") && e.contains("refused by the server's policy"), "{e}");
    let after = server.join().expect("server");
    assert!(after.is_empty(), "sent in clear after the refusal: {:?}", String::from_utf8_lossy(&after));
}

/// A peer that trickles its TLS handshake (a record header announcing 16 KiB, then a byte every
/// 100 ms) cannot hold the negotiation past its deadline (10 s at open): every socket read is
/// checked against it.
#[test]
fn a_trickling_handshake_times_out() {
    let l = TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        fake_starttls(&mut s, 1); // NBD_REP_ACK
        // A handshake record of 16 KiB, sent a byte at a time, until the client hangs up.
        if s.write_all(&[0x16, 0x03, 0x03, 0x40, 0x00]).is_err() {
            return;
        }
        for _ in 0..16384 {
            std::thread::sleep(Duration::from_millis(100));
            if s.write_all(&[0]).is_err() {
                return;
            }
        }
    });
    let dir = tempfile::tempdir().expect("dir");
    let pki = Pki::new(dir.path());
    let t0 = Instant::now();
    let e = open_err(&format!("nbds://127.0.0.1:{port}/x"), &pki.files());
    assert!(t0.elapsed() < Duration::from_secs(15), "the handshake took {:?}", t0.elapsed());
    assert!(e.contains("in time") && e.contains("TLS handshake"), "{e}");
}

/// The data path through TLS: writes split by the batch limit, many reads in flight whose data
/// crosses TLS records and reply headers, read back equal.
#[test]
fn target_operations_through_tls() {
    let f = files(64 * MIB);
    let pki = Pki::new(&f.dir.path().join("pki"));
    let srv = qemu_tls(&f, Transport::Unix, &pki.good, false);
    let mut d = Driver::new(NbdTarget::open(&srv.uri, &pki.files()).expect("open"));
    let data: Vec<u8> = (0..16 * MIB as usize).map(|i| (i * 7 + i / 4099) as u8).collect();
    let writes: Vec<TargetOp> = data.chunks(MIB as usize).enumerate().map(|(i, c)| write(i as u64 * MIB, c)).collect();
    let r = d.run(&writes, LIMIT);
    assert!(r.iter().all(|x| x.as_ref().ok() == Some(&(MIB as u32))), "{r:?}");
    assert!(d.run(&[TargetOp::Flush], LIMIT)[0].is_ok());
    let mut back = vec![0u8; data.len()];
    // 128 reads of 128 KiB at once, and a few small ones.
    let reads: Vec<TargetOp> = back.chunks_mut(128 << 10).enumerate().map(|(i, c)| read(i as u64 * (128 << 10), c)).collect();
    let r = d.run(&reads, LIMIT);
    assert!(r.iter().all(|x| x.is_ok()), "{r:?}");
    assert!(back == data, "read back differs from what was written");
    let mut small = vec![[0u8; 512]; 8];
    let ops: Vec<TargetOp> = small.iter_mut().enumerate().map(|(i, b)| read(i as u64 * 4099 * 512 % (15 * MIB), b)).collect();
    let r = d.run(&ops, LIMIT);
    assert!(r.iter().all(|x| x.is_ok()), "{r:?}");
    for (i, b) in small.iter().enumerate() {
        let off = (i as u64 * 4099 * 512 % (15 * MIB)) as usize;
        assert_eq!(&b[..], &data[off..off + 512], "small read {i}");
    }
}

/// A thread interrupted again and again while it connects (a signal whose handler does not ask
/// for restarts; io_uring's task work for a ring the thread owns does the same to a socket call
/// with a timeout, which then fails with EINTR instead of restarting) still connects, over TCP
/// and over a Unix socket: an interrupted socket call is made again.
#[test]
fn an_interrupted_handshake_goes_on() {
    extern "C" fn nothing(_: libc::c_int) {}
    // SAFETY: a handler that does nothing, for SIGUSR1, which nothing else in this test process
    // uses; sa_flags 0: no SA_RESTART, so blocking calls return EINTR.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = nothing as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0, "sigaction");
    }
    let f = files(4 * MIB);
    let pki = Pki::new(&f.dir.path().join("pki"));
    for t in [Transport::Tcp, Transport::Unix] {
        let srv = qemu_tls(&f, t, &pki.good, false);
        let mut signals = 0u64;
        for _ in 0..10 {
            let (uri, tls) = (srv.uri.clone(), pki.files());
            let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (tx, rx) = std::sync::mpsc::channel();
            let d = done.clone();
            let h = std::thread::spawn(move || {
                // SAFETY: pthread_self has no preconditions.
                let _ = tx.send(unsafe { libc::pthread_self() });
                let r = NbdTarget::open(&uri, &tls).map(drop).map_err(|e| e.to_string());
                d.store(true, std::sync::atomic::Ordering::SeqCst);
                r
            });
            let thread = rx.recv_timeout(LIMIT).expect("the connecting thread's id");
            let t0 = Instant::now();
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                assert!(t0.elapsed() < LIMIT, "the connection did not end within {LIMIT:?}");
                // SAFETY: the thread is not joined yet (join comes after this loop), so its id
                // is valid even if it has just returned.
                unsafe { libc::pthread_kill(thread, libc::SIGUSR1) };
                signals += 1;
                std::thread::sleep(Duration::from_micros(20));
            }
            h.join().expect("thread").expect("connecting while interrupted");
        }
        assert!(signals > 100, "too few signals to interrupt anything: {signals}");
    }
}

/// A session that can encrypt no more (TLS 1.2's record limit, say) breaks the connection, not
/// the ring: the operations fail through their completions, and a reset connects a new session
/// that works.
#[test]
fn an_encryption_failure_breaks_the_connection_only() {
    let f = files(8 * MIB);
    let pki = Pki::new(&f.dir.path().join("pki"));
    let srv = qemu_tls(&f, Transport::Unix, &pki.good, false);
    let mut d = Driver::new(NbdTarget::open(&srv.uri, &pki.files()).expect("open"));
    let data = vec![0x3cu8; 64 << 10];
    d.t.fail_next_encryption();
    let r = d.run(&[write(0, &data), TargetOp::Flush], LIMIT);
    assert!(r.iter().all(|x| x.is_err()), "{r:?}");
    assert!(err_text(&r[0]).contains("encrypting requests failed"), "{}", err_text(&r[0]));
    assert!(d.t.broken().is_some());
    d.t.reset().expect("a new session");
    let r = d.run(&[write(0, &data), TargetOp::Flush], LIMIT);
    assert!(r.iter().all(|x| x.is_ok()), "{r:?}");
    let mut back = vec![0u8; 64 << 10];
    let r = d.run(&[read(0, &mut back)], LIMIT);
    assert!(r[0].is_ok() && back == data, "{r:?}");
}

/// A reconnect runs the whole handshake again and checks the certificate again: the server
/// restarted with a certificate from another CA is refused (the target stays broken), and once
/// it serves the right one again the target reconnects and the data is there.
#[test]
fn reconnect_redoes_the_handshake() {
    let f = files(8 * MIB);
    let root = f.dir.path().join("pki");
    let pki = Pki::new(&root);
    let mut srv = qemu_tls(&f, Transport::Unix, &pki.good, false);
    let mut d = Driver::new(NbdTarget::open(&srv.uri, &pki.files()).expect("open"));
    let data = vec![0x5au8; 256 << 10];
    let r = d.run(&[write(MIB, &data), TargetOp::Flush], LIMIT);
    assert!(r.iter().all(|x| x.is_ok()), "{r:?}");

    srv.kill();
    let r = d.run(&[TargetOp::Flush], LIMIT);
    assert!(r[0].is_err() && d.t.broken().is_some());
    let rogue_ca = ca("rogue CA");
    let rogue = server_dir(&root.join("rogue"), &rogue_ca, &rogue_ca, &["localhost"], Validity::Now);
    use_certs(&mut srv, &pki.good, &rogue);
    srv.start();
    let e = d.t.reset().expect_err("a certificate from another CA").to_string();
    assert!(e.contains("not signed by a trusted CA"), "{e}");
    srv.kill();
    use_certs(&mut srv, &rogue, &pki.good);
    srv.start();
    d.t.reset().expect("reconnect over TLS");
    let mut back = vec![0u8; 256 << 10];
    let r = d.run(&[read(MIB, &mut back)], LIMIT);
    assert!(r[0].is_ok(), "{r:?}");
    assert!(back == data);
}

/// A live mirror over TLS whose server comes back with a bad certificate: the application's
/// writes go on, the mirror is degraded with the TLS problem as its error, and it converges by
/// itself once the server has its certificate again.
#[test]
fn mirror_stays_degraded_while_the_certificate_is_bad() {
    const SIZE: u64 = 8 * MIB;
    let f = files(SIZE);
    fill_random(&f.source, 0, SIZE as usize, 41);
    let root = f.dir.path().join("pki");
    let pki = Pki::new(&root);
    let mut srv = qemu_tls(&f, Transport::Unix, &pki.good, false);
    let p = pair_tls(&f, &srv.uri, pki.files());
    sync_bounded(&p, &CopyConfig::default(), TestHooks::default(), LIMIT).expect("full sync");
    let (engine, mut target, _) = Engine::open(&p).expect("reopen");
    let engine = Arc::new(engine);
    let e2 = engine.clone();
    let mirror = std::thread::spawn(move || {
        let cfg = CopyConfig { max_copies: 8, buf_size: 64 << 10, clear_delay: Duration::from_millis(200), ..Default::default() };
        let mut m = Mirror::new(e2, target.as_mut(), cfg).expect("mirror");
        m.run(RunUntil::Stopped, None).expect("run");
    });
    let mut q = EngineQueue::new(engine.clone(), 8).expect("queue");
    let put = |q: &mut EngineQueue, i: u64| {
        let mut data = AlignedBuf::new(4096);
        data.fill(i as u8);
        q.execute(Op::Write { off: (i * 37 % 2048) * 4096, data, len: 4096, fua: false }).expect("write");
    };
    srv.kill();
    let rogue_ca = ca("rogue CA");
    let rogue = server_dir(&root.join("rogue"), &rogue_ca, &rogue_ca, &["localhost"], Validity::Now);
    use_certs(&mut srv, &pki.good, &rogue);
    srv.start();
    for i in 0..32 {
        put(&mut q, i);
    }
    // (The first retries may find the server still starting.)
    wait_for("degraded, with the TLS problem as its error", LIMIT, || {
        let st = engine.status();
        st.state == "degraded" && st.last_error.is_some_and(|e| e.contains("not signed by a trusted CA"))
    });
    // The device's writes still complete.
    let t0 = Instant::now();
    for i in 32..64 {
        put(&mut q, i);
    }
    assert!(t0.elapsed() < Duration::from_secs(10), "writes waited for the target");
    srv.kill();
    use_certs(&mut srv, &rogue, &pki.good);
    srv.start();
    wait_for("synced once the certificate is right", LIMIT, || engine.status().state == "synced");
    drop(q);
    engine.request_stop();
    mirror.join().expect("mirror");
    engine.close().expect("close");
    drop(engine);
    assert!(verify_tls(&f, &srv.uri, pki.files()).identical());
}
