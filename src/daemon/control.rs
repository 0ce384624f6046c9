//! The control socket: each device's daemon answers JSON requests on
//! `/run/ublk-mirror/ID.sock` (mode 0600, root only; the peer's uid is checked too). One
//! request per connection, one line each way, each connection on its own thread (at most
//! MAX_CLIENTS). A malformed, oversized or slow request gets an error reply (or the connection
//! is dropped after a timeout): the device's I/O never waits for it.
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"set", "speed":N, "mode":"background"|"write-blocking",
//! "max_lag_secs":S, "max_retries":N}` (any subset), `{"cmd":"pause"}`, `{"cmd":"resume"}`.
//! Replies: `{"ok":true, ...}` or `{"ok":false, "error":"..."}`.

use crate::engine::{CopyMode, Engine, Settings};
use crate::error::{Error, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Largest request accepted.
pub const MAX_REQUEST: usize = 64 << 10;
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Requests served at once.
const MAX_CLIENTS: usize = 16;

pub fn socket_path(id: u32) -> PathBuf {
    PathBuf::from(super::RUN_DIR).join(format!("{id}.sock"))
}

/// Binds the socket and serves it on a thread until `stop` is set.
pub fn spawn_server(
    id: u32,
    engine: Arc<Engine>,
    info: Value,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = PathBuf::from(super::RUN_DIR);
    let _ = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir);
    spawn_server_at(socket_path(id), engine, info, stop)
}

/// [`spawn_server`] on a given socket path (tests use a private directory).
pub fn spawn_server_at(
    path: PathBuf,
    engine: Arc<Engine>,
    info: Value,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>> {
    use std::os::unix::fs::PermissionsExt;
    // A socket left by a killed daemon of this device: this process now owns the id.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|e| Error::io(format!("control socket {}", path.display()), e))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(format!("chmod {}", path.display()), e))?;
    listener.set_nonblocking(true).map_err(|e| Error::io("control socket", e))?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            // One thread per connection (a switchover waits for the target for up to its
            // timeout; status requests meanwhile must still be answered), at most MAX_CLIENTS.
            let clients = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        if clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
                            clients.fetch_sub(1, Ordering::SeqCst);
                            let _ = conn.set_write_timeout(Some(IO_TIMEOUT));
                            let _ = writeln!(conn, "{}", json!({ "ok": false, "error": "too many requests at once; try again" }));
                            continue;
                        }
                        let (engine, info, count) = (engine.clone(), info.clone(), clients.clone());
                        let spawned = std::thread::Builder::new().name("control-client".into()).spawn(move || {
                            serve_one(conn, &engine, &info);
                            count.fetch_sub(1, Ordering::SeqCst);
                        });
                        if let Err(e) = spawned {
                            clients.fetch_sub(1, Ordering::SeqCst);
                            log::warn!("control socket: no thread for a client: {e}");
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        // Wait for the next connection, not for a fixed tick: a client is
                        // answered as soon as it connects. The timeout only bounds how late
                        // `stop` is seen.
                        wait_readable(&listener, ACCEPT_STOP_CHECK);
                    }
                    Err(e) => {
                        log::warn!("control socket: accept: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
            let _ = std::fs::remove_file(&path);
        })
        .map_err(|e| Error::io("control thread", e))
}

/// How often the accept loop looks at its stop flag while no client connects.
const ACCEPT_STOP_CHECK: Duration = Duration::from_millis(100);

/// Blocks until `fd` is readable (a listener: a connection is waiting) or `limit` passes.
fn wait_readable(fd: &impl std::os::fd::AsFd, limit: Duration) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    let ms = PollTimeout::try_from(limit).unwrap_or(PollTimeout::MAX);
    // EINTR or an error: the caller's accept finds out what happened, and loops.
    let _ = poll(&mut fds, ms);
}

fn serve_one(mut conn: UnixStream, engine: &Arc<Engine>, info: &Value) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
    let _ = conn.set_write_timeout(Some(IO_TIMEOUT));
    let reply = match peer_allowed(&conn) {
        Err(e) => json!({ "ok": false, "error": e }),
        Ok(()) => match read_request(&mut conn) {
            Ok(req) => handle(&req, engine, info),
            Err(e) => json!({ "ok": false, "error": e }),
        },
    };
    let _ = writeln!(conn, "{reply}");
}

fn peer_allowed(conn: &UnixStream) -> std::result::Result<(), String> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let cred = getsockopt(conn, PeerCredentials).map_err(|e| format!("peer credentials: {e}"))?;
    let me = nix::unistd::geteuid().as_raw();
    if cred.uid() == 0 || cred.uid() == me {
        Ok(())
    } else {
        Err(format!("uid {} may not control this device", cred.uid()))
    }
}

fn read_request(conn: &mut UnixStream) -> std::result::Result<Value, String> {
    let mut line = Vec::new();
    let mut r = BufReader::new(conn.take(MAX_REQUEST as u64 + 1));
    r.read_until(b'\n', &mut line).map_err(|e| format!("reading the request: {e}"))?;
    if line.len() > MAX_REQUEST {
        return Err(format!("request larger than {MAX_REQUEST} bytes"));
    }
    serde_json::from_slice(&line).map_err(|e| format!("request is not JSON: {e}"))
}

/// Answers one request (also used by tests, without a socket).
pub fn handle(req: &Value, engine: &Arc<Engine>, info: &Value) -> Value {
    let cmd = req.get("cmd").and_then(Value::as_str).unwrap_or("");
    let r = match cmd {
        "status" => Ok(status_value(engine, info)),
        "set" => set(req, engine),
        "pause" | "resume" => {
            let mut s = engine.settings();
            let want = cmd == "pause";
            if s.paused != want {
                s.paused = want;
                engine.apply_settings(&s);
                engine.events().emit(if want { "paused" } else { "resumed" }, json!({}));
            }
            Ok(json!({ "settings": engine.settings() }))
        }
        "verify" => crate::engine::online_verify::start(engine).map(|_| json!({})).map_err(|e| e.to_string()),
        "switchover" => {
            let secs = req.get("timeout_secs").and_then(Value::as_u64).unwrap_or(60).clamp(1, SWITCHOVER_MAX_SECS);
            let reverse = req.get("reverse").and_then(Value::as_bool).unwrap_or(false);
            engine.switchover(Duration::from_secs(secs), reverse).map(|_| json!({})).map_err(|e| e.to_string())
        }
        "" => Err("no \"cmd\" in the request (status, set, pause, resume, switchover, verify)".to_string()),
        other => Err(format!("unknown command {other:?} (status, set, pause, resume, switchover, verify)")),
    };
    match r {
        Ok(mut v) => {
            // Every command above answers with a JSON object (IndexMut panics on anything else).
            v["ok"] = json!(true);
            v
        }
        Err(e) => json!({ "ok": false, "error": e }),
    }
}

pub fn status_value(engine: &Engine, info: &Value) -> Value {
    // `info` is the object start::serve builds (IndexMut panics on anything else).
    let mut v = info.clone();
    v["pid"] = json!(std::process::id());
    // The pair as it is now (a reverse switchover swaps it).
    let pair = engine.pair();
    v["source"] = json!(pair.source);
    v["target"] = json!(pair.target);
    v["status"] = json!(engine.status());
    v["settings"] = json!(engine.settings());
    v["events"] = json!(engine.events().recent());
    v["verify"] = json!(engine.verifier().report());
    v
}

fn set(req: &Value, engine: &Engine) -> std::result::Result<Value, String> {
    let mut s: Settings = engine.settings();
    let Some(obj) = req.as_object() else { return Err("request must be an object".into()) };
    for (k, v) in obj {
        match k.as_str() {
            "cmd" => {}
            "speed" => s.speed = v.as_u64().ok_or("speed: bytes per second, a whole number (0 = unlimited)")?,
            "busy_speed" => {
                s.busy_speed = v.as_u64().ok_or("busy_speed: bytes per second, a whole number (0 = no limit)")?
            }
            "mode" => {
                s.mode = Some(serde_json::from_value::<CopyMode>(v.clone()).map_err(|_| {
                    "mode: \"background\", \"write-blocking\" or \"async\"".to_string()
                })?)
            }
            "async_buffer" => {
                s.async_buffer = v
                    .as_u64()
                    .filter(|n| (4 << 20..=16 << 30).contains(n))
                    .ok_or("async_buffer: bytes, from 4 MiB to 16 GiB")?
            }
            "max_lag_secs" => {
                let secs = v.as_f64().filter(|x| x.is_finite() && *x >= 0.0).ok_or("max_lag_secs: seconds >= 0 (0 = off)")?;
                s.max_lag_ms = (secs * 1000.0).round() as u64;
            }
            "max_retries" => {
                s.max_retries = v
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or("max_retries: a whole number (0 = retry for ever)")?
            }
            other => return Err(format!("set: unknown setting {other:?} (speed, busy_speed, mode, async_buffer, max_lag_secs, max_retries)")),
        }
    }
    let before = engine.settings();
    engine.apply_settings(&s);
    let after = engine.settings();
    if before != after {
        engine.events().emit("settings", json!({ "settings": after }));
    }
    Ok(json!({ "settings": after }))
}

/// Sends `req` to device `id`'s daemon and returns its reply (an error if `ok` is false).
pub fn request(id: u32, req: &Value) -> Result<Value> {
    request_within(id, req, Duration::from_secs(5))
}

/// The longest a switchover holds writes while the target catches up, in seconds: a larger
/// `--timeout` is taken as this.
pub const SWITCHOVER_MAX_SECS: u64 = 3600;

/// How long `switchover` waits for the daemon's reply to a switchover given `timeout_secs`.
pub fn switchover_reply_limit(timeout_secs: u64) -> Duration {
    // The daemon waits as long as it would hold writes (clamped as the daemon clamps it), then
    // replies; 10 s more cover the reply itself.
    Duration::from_secs(timeout_secs.clamp(1, SWITCHOVER_MAX_SECS) + 10)
}

/// [`request`] waiting at most `limit` for the reply.
pub fn request_within(id: u32, req: &Value, limit: Duration) -> Result<Value> {
    request_at(&socket_path(id), id, req, limit)
}

/// [`request_within`] on a given socket path.
pub fn request_at(path: &std::path::Path, id: u32, req: &Value, limit: Duration) -> Result<Value> {
    let mut conn = UnixStream::connect(path).map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => format!(
                "no daemon is serving device {id} (see `ublk-mirror list`; if it shows the device \
                 QUIESCED, run `ublk-mirror recover -n {id}`)"
            ),
            std::io::ErrorKind::PermissionDenied => "permission denied: run as root".to_string(),
            _ => format!("cannot reach the daemon of device {id}"),
        };
        Error::config(format!("{hint} ({}: {e})", path.display()))
    })?;
    let t = Some(limit);
    let _ = conn.set_read_timeout(t);
    let _ = conn.set_write_timeout(t);
    let io = |e: std::io::Error| Error::config(format!("talking to the daemon of device {id}: {e}"));
    writeln!(conn, "{req}").map_err(io)?;
    let mut buf = String::new();
    conn.take(16 << 20).read_to_string(&mut buf).map_err(io)?;
    let v: Value = serde_json::from_str(buf.trim())
        .map_err(|e| Error::config(format!("the daemon of device {id} sent a bad reply ({e})")))?;
    if v["ok"] == json!(true) {
        Ok(v)
    } else {
        Err(Error::config(format!(
            "device {id}: {}",
            v["error"].as_str().unwrap_or("the daemon refused the request")
        )))
    }
}
