//! The command line: clap definitions, shared by the binary, the man page and the completions.

pub mod manpage;

use crate::io::backing::DirectMode;
use crate::engine::{CopyMode, SyncMode};
use crate::units::{parse_duration, parse_size};

/// An async replication buffer size: at least 4 MiB (a few of the largest requests), at most
/// 16 GiB (it is memory).
fn parse_async_buffer(s: &str) -> Result<u64, String> {
    let n = parse_size(s)?;
    if !(4 << 20..=16 << 30).contains(&n) {
        return Err(format!("{s}: the async buffer must be between 4M and 16G"));
    }
    Ok(n)
}
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// A Linux block device in user space that keeps a live, crash-safe mirror of a disk.
#[derive(Parser)]
#[command(
    name = "ublk-mirror",
    version,
    about,
    long_about = "ublk-mirror exposes a block device /dev/ublkbN (a ublk device, served from user \
space) over a SOURCE file or block device and keeps a live, crash-safe mirror of it on a TARGET. \
Every write first marks its region in a persistent dirty bitmap, made durable before the write \
reaches the source; a mirror loop copies dirty regions to the target through io_uring. After a \
crash of the machine or of the daemon, only the regions marked in the bitmap are copied again. \
Offline commands (sync, verify, bitmap show) work without the ublk driver."
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Print shell completions (bash, zsh, fish, elvish, powershell) to standard output.
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff) to standard output; --conf: the config file's page.
    #[command(hide = true)]
    Man {
        #[arg(long)]
        conf: bool,
        /// The example config file instead.
        #[arg(long)]
        conf_example: bool,
    },
    /// Bring TARGET in step with SOURCE offline, copying what the bitmap marks dirty
    /// (everything, for a new bitmap).
    Sync(SyncArgs),
    /// Compare SOURCE and TARGET region by region (offline; with --bitmap, also check that
    /// every differing region is marked dirty), or a live device's pair with -n ID (online:
    /// dirty and busy regions are skipped).
    Verify(VerifyArgs),
    /// Inspect a bitmap file.
    #[command(subcommand)]
    Bitmap(BitmapCmd),
    /// Create /dev/ublkbN over SOURCE, mirrored to TARGET; prints the device as JSON once live.
    Add(AddArgs),
    /// Make the device named by --name serve: recover it if its daemon died, nothing if it is
    /// live, add it otherwise (for service managers: see the systemd unit).
    Up(AddArgs),
    /// Delete the device with this name, if it exists.
    Down {
        /// The device's name.
        #[arg(long)]
        name: String,
        /// First wait (at most --timeout seconds) for a consistent point.
        #[arg(long)]
        wait_synced: bool,
        /// Seconds to wait for --wait-synced.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// For udev: print the name of the device with kernel name KERNEL (ublkbN).
    #[command(hide = true)]
    UdevName { kernel: String },
    /// For udev: print the configured mirror whose SOURCE is the block device KERNEL (or one of
    /// its LINKS, relative to /dev); exit 1 if none.
    #[command(hide = true)]
    UdevSource {
        kernel: String,
        links: Vec<String>,
        #[arg(long, default_value = "/etc/ublk-mirror")]
        config_dir: PathBuf,
    },
    /// Stop and delete a device (the bitmap keeps what is still dirty).
    Del {
        /// Device id (N of /dev/ublkbN).
        #[arg(short = 'n', long = "number", value_parser = parse_device_id)]
        id: u32,
        /// First wait (at most --timeout seconds) for a consistent point.
        #[arg(long)]
        wait_synced: bool,
        /// Seconds to wait for --wait-synced.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// List the ublk-mirror devices.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Start a new daemon for a device whose daemon died (the device waits for it, QUIESCED).
    Recover {
        /// Device id.
        #[arg(short = 'n', long = "number", value_parser = parse_device_id)]
        id: u32,
        /// Serve in this process instead of a daemon.
        #[arg(long)]
        foreground: bool,
    },
    /// State of a device's mirror: syncing or synced, dirty bytes, copy progress, consistent points.
    Status {
        /// Device id.
        #[arg(short = 'n', long = "number", value_parser = parse_device_id)]
        id: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Wait (at most --timeout seconds) for a consistent point; exit 0 once synced.
        #[arg(long)]
        wait_synced: bool,
        /// Seconds to wait for --wait-synced.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Keep showing the status (a progress bar on a terminal, a line a second otherwise)
        /// until interrupted, or until synced with --wait-synced.
        #[arg(long)]
        watch: bool,
        /// Seconds between two looks with --watch (0.1 to 3600; fractions allowed).
        #[arg(long, value_name = "SECS", default_value = "1", value_parser = parse_interval, requires = "watch")]
        interval: std::time::Duration,
    },
    /// Print every device's state in the Prometheus text format (for node_exporter's textfile
    /// collector): state, dirty bytes, lag, copy rate, consistent points, target failures,
    /// bytes copied. A device whose daemon does not answer is ublk_mirror_up 0 (and named on
    /// standard error); the exit status is 0 unless the devices cannot be listed at all.
    Metrics,
    /// Change a running mirror's settings: copy speed, copy mode, max lag, retries.
    Set {
        /// Device id.
        #[arg(short = 'n', long = "number", value_parser = parse_device_id)]
        id: u32,
        /// Copy bandwidth limit in bytes per second (K/M/G suffixes; 0 = unlimited).
        #[arg(long, value_parser = parse_size)]
        speed: Option<u64>,
        /// Copy bandwidth limit while the device serves I/O (0 = none: the copy competes with
        /// applications).
        #[arg(long, value_parser = parse_size)]
        busy_speed: Option<u64>,
        /// background; write-blocking (writes complete once on source and target); async
        /// (writes complete once on the source and in the replication buffer, shipped to the
        /// target in order).
        #[arg(long, value_enum)]
        mode: Option<CopyMode>,
        /// Async mode's replication buffer (K/M/G suffixes, 4M to 16G).
        #[arg(long, value_parser = parse_async_buffer)]
        async_buffer: Option<u64>,
        /// Switch to write-blocking while the target has been behind for longer than this
        /// (e.g. 30s, 5m; 0 = never).
        #[arg(long, value_parser = parse_duration)]
        max_lag: Option<std::time::Duration>,
        /// Stop mirroring after this many failed retries in a row (0 = retry for ever).
        #[arg(long)]
        max_retries: Option<u32>,
    },
    /// Move the device onto its target for good (live storage migration): once synced, hold
    /// writes for a moment, copy the last dirty regions, make them durable, and serve the
    /// target from then on. The bitmap records it, so the old pair cannot be served again.
    Switchover {
        /// Device id.
        #[arg(short = 'n', long = "number", value_parser = parse_device_id)]
        id: u32,
        /// Give up (and let writes resume on the source) if the target has not caught up
        /// within this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Keep mirroring the other way: the old source becomes the target (it must have the
        /// target's size). Without it the old source is released.
        #[arg(long)]
        reverse: bool,
    },
    /// Stop copying (the device keeps serving I/O; writes are tracked in the bitmap).
    Pause {
        /// Device id.
        #[arg(short = 'n', long = "number", value_parser = parse_device_id)]
        id: u32,
    },
    /// Resume copying after `pause`.
    Resume {
        /// Device id.
        #[arg(short = 'n', long = "number", value_parser = parse_device_id)]
        id: u32,
    },
}

/// The largest ublk device id: the driver and libublk number devices with an i32.
const MAX_DEVICE_ID: u32 = i32::MAX as u32;

/// A device id (`-n`): 0 to [`MAX_DEVICE_ID`].
/// A --watch interval: seconds, 0.1 to 3600 (a status request costs the daemon a lock held for
/// a few counters, but a client asking in a busy loop would still cost a core).
fn parse_interval(s: &str) -> Result<std::time::Duration, String> {
    let secs: f64 = s.trim().parse().map_err(|_| format!("'{s}' is not a number of seconds (e.g. 0.5)"))?;
    if !(0.1..=3600.0).contains(&secs) {
        return Err(format!("{s} s is out of range: give 0.1 to 3600 seconds"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

fn parse_device_id(s: &str) -> Result<u32, String> {
    s.trim()
        .parse::<u32>()
        .ok()
        .filter(|&id| id <= MAX_DEVICE_ID)
        .ok_or_else(|| format!("{s:?} is not a device id: ublk device ids are 0 to {MAX_DEVICE_ID} (see `ublk-mirror list`)"))
}

/// `add -n`: a device id, or -1 for the first free one.
fn parse_new_device_id(s: &str) -> Result<i32, String> {
    if s.trim() == "-1" {
        return Ok(-1);
    }
    parse_device_id(s)
        .and_then(|id| i32::try_from(id).map_err(|e| e.to_string()))
        .map_err(|e| format!("{e}, or -1 for the first free one"))
}

#[derive(Args)]
pub struct AddArgs {
    /// Source file or block device: the device's data lives here.
    #[arg(long, short = 's')]
    pub source: PathBuf,
    /// Target, at least as large as the source: a file, a block device, or an NBD export
    /// (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH; nbds:// and nbds+unix:// over
    /// TLS, see --tls-ca).
    #[arg(long, short = 't')]
    pub target: PathBuf,
    /// Dirty bitmap file (created if absent).
    #[arg(long, short = 'b')]
    pub bitmap: PathBuf,
    /// Initial sync: full (default for a new bitmap), none (declare the pair identical), resume
    /// (default for an existing bitmap: copy only what it marks dirty).
    #[arg(long, value_enum)]
    pub sync: Option<SyncMode>,
    /// Region size for a new bitmap [default: 64K up to 4 TiB, doubled above until the bitmap has
    /// at most 64 Mi regions].
    #[arg(long, short = 'g', value_parser = parse_size)]
    pub granularity: Option<u64>,
    /// Stable name: /dev/disk/by-ublk-mirror/NAME (with the udev rules), and what `up` and
    /// `down` take [default: the source's file name].
    #[arg(long)]
    pub name: Option<String>,
    /// Device id (N of /dev/ublkbN); default: the first free one.
    #[arg(
        short = 'n',
        long = "number",
        default_value_t = -1,
        hide_default_value = true,
        allow_negative_numbers = true,
        value_parser = parse_new_device_id
    )]
    pub id: i32,
    /// Queues.
    #[arg(short = 'q', long = "queues", default_value_t = 1)]
    pub queues: u16,
    /// Queue depth.
    #[arg(short = 'd', long = "depth", default_value_t = 128)]
    pub depth: u16,
    /// single: each queue thread runs on one CPU of its queue's set, with the io_uring
    /// workers that do its file I/O (rublk's and ublksrv's default); all: they float over the
    /// set, which lets a write-blocking mirror's two writes use two CPUs at once.
    #[arg(long, value_enum, default_value = "single")]
    pub affinity: crate::daemon::saved::QueueAffinity,
    /// Serve in this process instead of a daemon.
    #[arg(long)]
    pub foreground: bool,
    #[command(flatten)]
    pub copy: CopyArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Copy bandwidth limit in bytes per second (K/M/G suffixes; 0 = unlimited); `set` changes it.
    #[arg(long, value_parser = parse_size, default_value = "0")]
    pub speed: u64,
    /// While applications use the device (at least 128 requests/s) the background copy yields:
    /// it runs at most this fast (K/M/G suffixes), like md's speed_limit_min or DRBD's
    /// c-min-rate; at full --speed otherwise. 0 = never yield (the copy competes with
    /// applications for CPU and disk). `set` changes it.
    #[arg(long, value_parser = parse_size, default_value = "4M")]
    pub busy_speed: u64,
    /// background: writes complete on the source and the mirror copies behind them;
    /// write-blocking: writes complete once on source and target (file and block device targets);
    /// async: writes complete once on the source and in a replication buffer, and are shipped
    /// to the target in order of the device's flushes, so the target is a crash image of the
    /// source at every consistent point (DRBD's protocol A); behind (buffer full, target
    /// failing) it falls back to background and resumes once caught up.
    #[arg(long, value_enum, default_value = "background")]
    pub mode: CopyMode,
    /// Async mode's replication buffer: memory for the writes not yet on the target (K/M/G
    /// suffixes, 4M to 16G). `set` changes it.
    #[arg(long, value_parser = parse_async_buffer, default_value = "64M")]
    pub async_buffer: u64,
    /// Switch to write-blocking while the target has been behind for longer than this (e.g.
    /// 30s, 5m), back to background once synced.
    #[arg(long, value_parser = parse_duration)]
    pub max_lag: Option<std::time::Duration>,
    /// Stop mirroring after this many failed retries in a row (0 = retry for ever, with backoff).
    #[arg(long, default_value_t = 0)]
    pub max_retries: u32,
    /// Event log (JSON lines) [default: /run/ublk-mirror/ID.events].
    #[arg(long)]
    pub event_log: Option<PathBuf>,
    /// Run this shell command after a consistent point (at most once per
    /// --on-consistent-interval), with the target left untouched until it exits: to snapshot
    /// the replica. Environment: UBLK_MIRROR_CONSISTENT_SEQ, UBLK_MIRROR_CONSISTENT_TIME_MS,
    /// UBLK_MIRROR_DEVICE, UBLK_MIRROR_SOURCE, UBLK_MIRROR_TARGET.
    #[arg(long)]
    pub on_consistent: Option<String>,
    /// Least time between two --on-consistent runs.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub on_consistent_interval: std::time::Duration,
    /// Kill an --on-consistent command still running after this long.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub on_consistent_timeout: std::time::Duration,
}

#[derive(Args)]
pub struct SyncArgs {
    /// Source file or block device (read only).
    #[arg(long, short = 's')]
    pub source: PathBuf,
    /// Target, at least as large as the source: a file, a block device or an NBD URI (as for add).
    #[arg(long, short = 't')]
    pub target: PathBuf,
    /// Dirty bitmap file; created (with a full sync) if absent.
    #[arg(long, short = 'b')]
    pub bitmap: PathBuf,
    /// Copy everything, rebuilding the bitmap (whatever it held).
    #[arg(long, conflicts_with = "assume_synced")]
    pub full: bool,
    /// Declare source and target identical: clear the bitmap, copy nothing.
    #[arg(long)]
    pub assume_synced: bool,
    /// Region size for a new bitmap: a power of two from 4K to 64M [default: 64K up to 4 TiB,
    /// doubled above until the bitmap has at most 64 Mi regions].
    #[arg(long, short = 'g', value_parser = parse_size)]
    pub granularity: Option<u64>,
    #[command(flatten)]
    pub copy: CopyArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// TLS for an `nbds://` (or `nbds+unix://`) target.
#[derive(Args, Clone, Debug, Default)]
pub struct TlsArgs {
    /// nbds target: the CA certificate(s), PEM, that signed the server's certificate [default:
    /// the system's trust store].
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// nbds target: this client's certificate, PEM, for a server that asks for one (mutual TLS).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// nbds target: the private key of --tls-cert, PEM; refused if other users may read it.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl TlsArgs {
    /// The files, as absolute paths (the daemon does not keep the caller's directory).
    pub fn files(&self) -> crate::io::nbd::tls::TlsFiles {
        let abs = |p: &Option<PathBuf>| p.as_ref().map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()));
        crate::io::nbd::tls::TlsFiles { ca: abs(&self.tls_ca), cert: abs(&self.tls_cert), key: abs(&self.tls_key) }
    }
}

#[derive(Args)]
pub struct CopyArgs {
    /// O_DIRECT use: auto falls back to buffered I/O where the filesystem refuses it (tmpfs).
    #[arg(long, value_enum, default_value = "auto")]
    pub direct: DirectMode,
    /// Copies in flight.
    #[arg(long, default_value_t = 32)]
    pub copies: usize,
    /// Size of each copy buffer (memory used: copies x buffer).
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    pub buffer: u64,
    /// Make progress durable (target flush, bitmap update) after this much data...
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub checkpoint_bytes: u64,
    /// ...or this many seconds, so an interrupted sync resumes near where it stopped.
    #[arg(long, default_value_t = 10)]
    pub checkpoint_secs: u64,
}

#[derive(Args)]
pub struct VerifyArgs {
    /// Verify a live device instead (online: dirty and busy regions are skipped; throttled like
    /// the copy).
    #[arg(short = 'n', long = "number", value_parser = parse_device_id, conflicts_with_all = ["source", "target", "bitmap"])]
    pub id: Option<u32>,
    /// Source file or block device.
    #[arg(long, short = 's', required_unless_present = "id")]
    pub source: Option<PathBuf>,
    /// Target: a file, a block device or an NBD URI (as for add).
    #[arg(long, short = 't', required_unless_present = "id")]
    pub target: Option<PathBuf>,
    /// The pair's bitmap: differing regions whose bit is clear are reported as a bug.
    #[arg(long, short = 'b')]
    pub bitmap: Option<PathBuf>,
    /// Region size for the report without a bitmap [default: 64K].
    #[arg(long, short = 'g', value_parser = parse_size)]
    pub granularity: Option<u64>,
    /// O_DIRECT use, as for sync.
    #[arg(long, value_enum, default_value = "auto")]
    pub direct: DirectMode,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum BitmapCmd {
    /// Header fields, dirty regions and bytes.
    Show {
        /// The bitmap file.
        bitmap: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}


#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ublk-mirror").chain(args.iter().copied()))
    }

    /// A device id beyond what ublk can number (i32) is a usage error naming the range, not a
    /// panic in libublk; `add -n -1` (the first free id) is the only negative one.
    #[test]
    fn device_ids_out_of_range_are_refused() {
        for cmd in ["recover", "del", "status", "pause", "resume", "switchover", "verify"] {
            for id in ["2147483648", "4294967295"] {
                let e = match parse(&[cmd, "-n", id]) {
                    Ok(_) => panic!("{cmd} -n {id} accepted"),
                    Err(e) => e.to_string(),
                };
                assert!(e.contains("0 to 2147483647"), "{cmd} -n {id}: {e}");
            }
            assert!(parse(&[cmd, "-n", "2147483647"]).is_ok(), "{cmd} -n 2147483647");
        }
        let add = |id: &str| parse(&["add", "-s", "/s", "-t", "/t", "-b", "/b", "-n", id]);
        for id in ["-2", "2147483648", "-2147483648"] {
            assert!(add(id).is_err(), "add -n {id} accepted");
        }
        for id in ["-1", "0", "2147483647"] {
            assert!(add(id).is_ok(), "add -n {id} refused");
        }
    }

    /// A huge switchover timeout waits as long as the daemon holds writes at most, plus the
    /// margin for its reply; it does not overflow.
    #[test]
    fn switchover_wait_is_bounded() {
        use crate::daemon::control::switchover_reply_limit;
        assert_eq!(switchover_reply_limit(60), std::time::Duration::from_secs(70));
        assert_eq!(switchover_reply_limit(u64::MAX), std::time::Duration::from_secs(3610));
        assert_eq!(switchover_reply_limit(0), std::time::Duration::from_secs(11));
    }
}
