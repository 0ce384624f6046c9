use clap::Parser;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use ublk_mirror::io::backing::DirectMode;
use ublk_mirror::daemon::admin;
use ublk_mirror::daemon::saved::QueueAffinity;
use ublk_mirror::daemon::start::{self, AddOptions};
use ublk_mirror::cli::{AddArgs, BitmapCmd, Cli, Cmd, CopyArgs, SyncArgs, VerifyArgs};
use ublk_mirror::io::bitmap::Bitmap;
use ublk_mirror::engine::{CopyConfig, PairOptions, Settings, Status, SyncMode};
use ublk_mirror::engine::mirror::TestHooks;
use ublk_mirror::offline::{self, VerifyOptions};
use ublk_mirror::units::human;

/// Exit statuses (documented in the man page).
const EXIT_ERROR: u8 = 1;
const EXIT_DIFFER: u8 = 3;
const EXIT_DIFFER_CLEAN: u8 = 4;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp(None)
        .init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Sync(a) => cmd_sync(a),
        Cmd::Verify(a) => cmd_verify(a),
        Cmd::Bitmap(BitmapCmd::Show { bitmap, json }) => cmd_bitmap_show(bitmap, json),
        Cmd::Add(a) => cmd_add(a, false),
        Cmd::Up(a) => cmd_add(a, true),
        Cmd::Down { name, wait_synced, timeout } => {
            admin::down(&name, wait_synced.then(|| Duration::from_secs(timeout))).map(|_| 0).map_err(Into::into)
        }
        Cmd::UdevSource { kernel, links, config_dir } => {
            // udev passes $links as one space-separated word list.
            let links: Vec<String> = links.iter().flat_map(|l| l.split_whitespace().map(String::from)).collect();
            match ublk_mirror::daemon::udev::udev_source(&config_dir, &kernel, &links).first() {
                Some(n) => {
                    println!("{n}");
                    Ok(0)
                }
                None => Ok(EXIT_ERROR),
            }
        }
        Cmd::UdevName { kernel } => match ublk_mirror::daemon::udev::udev_name(&kernel) {
            Some(n) => {
                println!("{n}");
                Ok(0)
            }
            None => Ok(EXIT_ERROR),
        },
        Cmd::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "ublk-mirror", &mut std::io::stdout());
            Ok(0)
        }
        Cmd::Man { conf, conf_example } => {
            let page = if conf_example {
                ublk_mirror::cli::manpage::render_conf_example()
            } else if conf {
                ublk_mirror::cli::manpage::render_conf()
            } else {
                ublk_mirror::cli::manpage::render()
            };
            print!("{page}");
            Ok(0)
        }
        Cmd::Del { id, wait_synced, timeout } => {
            admin::delete(id, wait_synced.then(|| Duration::from_secs(timeout))).map_err(Into::into).map(|()| {
                println!("deleted /dev/ublkb{id}{}", if wait_synced { " (synced: the target holds every write)" } else { "" });
                0
            })
        }
        Cmd::List { json } => cmd_list(json),
        Cmd::Metrics => cmd_metrics(),
        Cmd::Recover { id, foreground } => cmd_recover(id, foreground),
        Cmd::Status { id, json, wait_synced, timeout, watch: true, interval } => cmd_watch(id, json, wait_synced, timeout, interval),
        Cmd::Set { id, speed, busy_speed, mode, async_buffer, max_lag, max_retries } => {
            cmd_set(id, speed, busy_speed, mode, async_buffer, max_lag, max_retries)
        }
        Cmd::Pause { id } => cmd_simple(id, "pause"),
        Cmd::Switchover { id, timeout, reverse } => {
            let req = serde_json::json!({ "cmd": "switchover", "timeout_secs": timeout, "reverse": reverse });
            ublk_mirror::daemon::control::request_within(id, &req, ublk_mirror::daemon::control::switchover_reply_limit(timeout))
                .map(|_| 0)
                .map_err(Into::into)
        }
        Cmd::Resume { id } => cmd_simple(id, "resume"),
        Cmd::Status { id, json, wait_synced, timeout, watch: false, .. } => {
            if wait_synced {
                if let Err(e) = admin::wait_synced(id, Duration::from_secs(timeout)) {
                    eprintln!("ublk-mirror: error: {e}");
                    return ExitCode::from(EXIT_ERROR);
                }
            }
            cmd_status(id, json)
        }
    };
    match r {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("ublk-mirror: error: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

type CliResult = Result<u8, Box<dyn std::error::Error>>;

/// Progress of a long command on stderr: a bar on a terminal, otherwise a line at most every
/// `LINE_EVERY` (for logs and journals); nothing with --json, whose output is the report.
struct Progress {
    bar: indicatif::ProgressBar,
    tty: bool,
    quiet: bool,
    what: &'static str,
    last_line: Option<std::time::Instant>,
}

const LINE_EVERY: Duration = Duration::from_secs(2);

impl Progress {
    fn new(what: &'static str, json: bool) -> Self {
        Progress {
            bar: indicatif::ProgressBar::hidden(),
            // A bar redraws its line with cursor controls, which a dumb terminal (a serial
            // console captured into a log) shows raw: lines then, as without a terminal.
            tty: std::io::stderr().is_terminal() && !json && std::env::var_os("TERM").is_none_or(|t| t != "dumb"),
            quiet: json,
            what,
            last_line: None,
        }
    }

    /// How often the command should report.
    fn every(&self) -> Duration {
        if self.tty {
            Duration::from_millis(200)
        } else {
            LINE_EVERY
        }
    }

    fn show(&mut self, done: u64, total: u64, line: String) {
        if self.tty {
            if self.bar.is_hidden() {
                self.bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                self.bar.set_style(
                    indicatif::ProgressStyle::with_template("{bar:40} {percent:>3}% {msg}")
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
            }
            self.bar.set_length(total.max(1));
            self.bar.set_position(done);
            self.bar.set_message(line);
        } else if !self.quiet && self.last_line.is_none_or(|t| t.elapsed() >= LINE_EVERY) {
            self.last_line = Some(std::time::Instant::now());
            eprintln!("{}: {line}", self.what);
        }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// "done / total, rate, ETA" for a command that has done `done` of `total` in `secs`.
fn rate_line(done: u64, total: u64, secs: f64) -> String {
    let rate = done as f64 / secs.max(1e-3);
    format!("{} / {}, {}", human(done), human(total), rate_eta(total.saturating_sub(done), rate))
}

/// "R/s, ETA Ns" for `left` bytes at `rate` bytes/s; "done" once nothing is left (a sync of
/// holes copies nothing: its rate says nothing then).
fn rate_eta(left: u64, rate: f64) -> String {
    if left == 0 {
        "done".into()
    } else if rate > 0.0 {
        format!("{}/s, ETA {:.0}s", human(rate as u64), left as f64 / rate)
    } else {
        format!("{}/s, ETA ?", human(rate as u64))
    }
}

fn progress_line(s: &Status, total: u64) -> (u64, String) {
    let left = s.dirty_bytes + s.copying_bytes;
    let done = total.saturating_sub(left);
    let rate = s.bytes_copied as f64 / s.elapsed_secs.max(1e-3);
    (done, format!("{} / {}, {}", human(done), human(total), rate_eta(left, rate)))
}

fn copy_config(a: &CopyArgs) -> CopyConfig {
    CopyConfig {
        max_copies: a.copies,
        buf_size: a.buffer as usize,
        checkpoint_bytes: a.checkpoint_bytes,
        checkpoint_interval: Duration::from_secs(a.checkpoint_secs.max(1)),
        ..CopyConfig::default()
    }
}

fn add_options(a: AddArgs) -> AddOptions {
    let mut copy = copy_config(&a.copy);
    copy.on_consistent = a.on_consistent.map(|command| {
        ublk_mirror::engine::OnConsistentCommand::new(command, a.on_consistent_interval, a.on_consistent_timeout, &a.source, &a.target)
    });
    AddOptions {
        name: a.name,
        pair: PairOptions {
            source: a.source,
            target: a.target,
            bitmap: a.bitmap,
            mode: a.sync,
            granularity: a.granularity,
            direct: a.copy.direct,
            source_writable: true,
            tls: a.tls.files(),
        },
        copy,
        id: a.id,
        queues: a.queues,
        depth: a.depth,
        affinity: a.affinity,
        foreground: a.foreground,
        settings: Settings {
            speed: a.speed,
            busy_speed: a.busy_speed,
            paused: false,
            mode: Some(a.mode),
            async_buffer: a.async_buffer,
            max_lag_ms: a.max_lag.map(|d| d.as_millis() as u64).unwrap_or(0),
            max_retries: a.max_retries,
            hook: None,
        },
        event_log: a.event_log,
    }
}

fn cmd_add(a: AddArgs, up: bool) -> CliResult {
    let opts = add_options(a);
    let v = if up { admin::up(&opts)? } else { start::start(&opts, None)? };
    if let Some(v) = v {
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(0)
}

fn cmd_recover(id: u32, foreground: bool) -> CliResult {
    let number = i32::try_from(id).map_err(|_| format!("{id} is not a device id: ublk device ids are 0 to {}", i32::MAX))?;
    let opts = AddOptions {
        name: None,
        pair: PairOptions {
            source: PathBuf::new(),
            target: PathBuf::new(),
            bitmap: PathBuf::new(),
            mode: None,
            granularity: None,
            direct: DirectMode::Auto,
            source_writable: true,
            // Taken from the device's saved configuration.
            tls: Default::default(),
        },
        copy: CopyConfig::default(),
        id: number,
        queues: 1,
        depth: 128,
        // Taken from the device's saved configuration.
        affinity: QueueAffinity::Single,
        foreground,
        // The device's saved settings are used.
        settings: Settings::default(),
        event_log: None,
    };
    if let Some(v) = start::start(&opts, Some(id))? {
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(0)
}

fn cmd_list(json: bool) -> CliResult {
    start::check_environment()?;
    let devs = ublk_mirror::daemon::saved::list();
    if json {
        println!("{}", serde_json::to_string_pretty(&devs)?);
    } else {
        let path = |p: &Option<PathBuf>| p.as_ref().map_or_else(|| "?".to_string(), |p| p.display().to_string());
        for d in &devs {
            println!(
                "{}  {}  {}  {} -> {}  bitmap {}",
                d.dev_id, d.bdev, d.state,
                path(&d.source), path(&d.target),
                path(&d.bitmap)
            );
        }
    }
    Ok(0)
}

/// `metrics`: nothing reaches standard output unless every device was asked, so that a
/// redirect into a file never leaves half an exposition behind.
fn cmd_metrics() -> CliResult {
    let (devices, problems) = ublk_mirror::daemon::metrics::collect()?;
    for p in &problems {
        eprintln!("ublk-mirror: warning: {p}");
    }
    let text = ublk_mirror::daemon::metrics::render(&devices);
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).and_then(|()| out.flush()).map_err(|e| format!("writing the metrics: {e}"))?;
    Ok(0)
}

fn cmd_status(id: u32, json: bool) -> CliResult {
    let v = admin::read_status(id)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    let s = &v["status"];
    let u = |k: &str| s[k].as_u64().unwrap_or(0);
    let f = |k: &str| s[k].as_f64();
    println!("device       {} ({}, pid {})", v["bdev"].as_str().unwrap_or("?"), v["name"].as_str().unwrap_or("?"), v["pid"]);
    println!("mirror       {} -> {}", v["source"].as_str().unwrap_or("?"), v["target"].as_str().unwrap_or("?"));
    println!("state        {}", s["state"].as_str().unwrap_or("?"));
    println!("mode         {}", s["mode"].as_str().unwrap_or("?"));
    println!("dirty        {}", human(u("dirty_bytes") + u("copying_bytes")));
    if s["state"] == "synced" {
        println!("progress     100% (nothing to copy)");
    } else {
        println!(
            "progress     {:.1}% ({} copied since the target was last in sync), {}/s, ETA {}",
            f("progress").unwrap_or(0.0) * 100.0,
            human(u("episode_bytes")),
            human(f("rate").unwrap_or(0.0) as u64),
            f("eta_secs").map(|e| format!("{e:.0}s")).unwrap_or_else(|| "-".into())
        );
    }
    println!("lag          {:.1}s", f("lag_secs").unwrap_or(0.0));
    println!(
        "copied       {} of data, {} of holes zeroed, since start (a region copied again counts again)",
        human(u("bytes_copied")),
        human(u("bytes_zeroed"))
    );
    println!(
        "consistent   {} points, last {}",
        u("consistent_points"),
        f("last_consistent_age_secs").map(|a| format!("{a:.1}s ago")).unwrap_or_else(|| "never".into())
    );
    let ship = &s["shipping"];
    if ship.is_object() {
        let n = |k: &str| ship[k].as_u64().unwrap_or(0);
        println!(
            "shipping     buffer {} of {} (peak {}), {} writes queued, {} shipped in {} epochs{}",
            human(n("buffer_used_bytes")),
            human(n("buffer_bytes")),
            human(n("buffer_peak_bytes")),
            n("queued_writes"),
            human(n("shipped_bytes")),
            n("epochs"),
            match ship["behind_reason"].as_str() {
                Some(r) => format!("; behind ({r}), fell behind {} times", n("fell_behind")),
                None => String::new(),
            }
        );
    }
    let speed = u("speed");
    let busy = u("busy_speed");
    println!(
        "speed limit  {}; while busy {}{}",
        if speed == 0 { "none".to_string() } else { format!("{}/s", human(speed)) },
        if busy == 0 { "no limit".to_string() } else { format!("{}/s", human(busy)) },
        if s["yielding"].as_bool() == Some(true) { " (yielding to I/O now)" } else { "" }
    );
    if u("copy_errors") + u("target_flush_errors") > 0 || !s["last_error"].is_null() {
        println!(
            "errors       {} copy, {} flush; last: {}",
            u("copy_errors"),
            u("target_flush_errors"),
            s["last_error"].as_str().unwrap_or("-")
        );
    }
    println!("events       {}", v["event_log"].as_str().unwrap_or("?"));
    Ok(0)
}

/// `status --watch`: redraws until interrupted (or synced, with --wait-synced). Every request
/// is bounded by the client's timeouts; a daemon that goes away ends the watch with its error.
fn cmd_watch(id: u32, json: bool, until_synced: bool, timeout: u64, interval: Duration) -> CliResult {
    // The bar goes where the lines would: on a terminal a bar, redirected plain lines.
    let tty = std::io::stdout().is_terminal() && !json;
    let bar = indicatif::ProgressBar::hidden();
    if tty {
        bar.set_draw_target(indicatif::ProgressDrawTarget::stdout());
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {percent:>3}% {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_length(1000);
    }
    let t0 = std::time::Instant::now();
    loop {
        let v = match admin::read_status(id) {
            Ok(v) => v,
            Err(e) => {
                bar.abandon();
                return Err(e.into());
            }
        };
        let s = &v["status"];
        let state = s["state"].as_str().unwrap_or("?");
        let dirty = s["dirty_bytes"].as_u64().unwrap_or(0) + s["copying_bytes"].as_u64().unwrap_or(0);
        let line = format!(
            "{state}, {} dirty, {}/s, ETA {}, lag {:.0}s",
            human(dirty),
            human(s["rate"].as_f64().unwrap_or(0.0) as u64),
            s["eta_secs"].as_f64().map(|e| format!("{e:.0}s")).unwrap_or_else(|| "-".into()),
            s["lag_secs"].as_f64().unwrap_or(0.0)
        );
        if json {
            println!("{}", serde_json::to_string(&v)?);
        } else if tty {
            bar.set_position((s["progress"].as_f64().unwrap_or(0.0) * 1000.0) as u64);
            bar.set_message(line);
        } else {
            println!("{:.1}% {line}", s["progress"].as_f64().unwrap_or(0.0) * 100.0);
        }
        if until_synced && state == "synced" {
            bar.finish();
            return Ok(0);
        }
        // Nothing mirrors (as `del --wait-synced` says too): no point waiting out the timeout.
        if let Some(why) = until_synced.then(|| admin::not_mirroring(id, s)).flatten() {
            bar.abandon();
            return Err(why.into());
        }
        if until_synced && t0.elapsed() > Duration::from_secs(timeout) {
            bar.abandon();
            return Err(format!("device {id} did not reach a consistent point within {timeout}s").into());
        }
        std::thread::sleep(interval);
    }
}

fn cmd_set(
    id: u32,
    speed: Option<u64>,
    busy_speed: Option<u64>,
    mode: Option<ublk_mirror::engine::CopyMode>,
    async_buffer: Option<u64>,
    max_lag: Option<Duration>,
    max_retries: Option<u32>,
) -> CliResult {
    let mut req = serde_json::json!({ "cmd": "set" });
    if let Some(s) = speed {
        req["speed"] = s.into();
    }
    if let Some(s) = busy_speed {
        req["busy_speed"] = s.into();
    }
    if let Some(m) = mode {
        req["mode"] = serde_json::to_value(m)?;
    }
    if let Some(b) = async_buffer {
        req["async_buffer"] = b.into();
    }
    if let Some(l) = max_lag {
        req["max_lag_secs"] = l.as_secs_f64().into();
    }
    if let Some(r) = max_retries {
        req["max_retries"] = r.into();
    }
    if req.as_object().map(|o| o.len()).unwrap_or(0) == 1 {
        return Err("nothing to set: give --speed, --busy-speed, --mode, --async-buffer, --max-lag or --max-retries".into());
    }
    let v = ublk_mirror::daemon::control::request(id, &req)?;
    println!("{}", serde_json::to_string_pretty(&v["settings"])?);
    Ok(0)
}

fn cmd_simple(id: u32, cmd: &str) -> CliResult {
    ublk_mirror::daemon::control::request(id, &serde_json::json!({ "cmd": cmd }))?;
    Ok(0)
}

fn cmd_sync(a: SyncArgs) -> CliResult {
    let mode = if a.full {
        Some(SyncMode::Full)
    } else if a.assume_synced {
        Some(SyncMode::AssumeIdentical)
    } else {
        None
    };
    let pair = PairOptions {
        source: a.source,
        target: a.target,
        bitmap: a.bitmap,
        mode,
        granularity: a.granularity,
        direct: a.copy.direct,
        source_writable: false,
        tls: a.tls.files(),
    };
    let copy = copy_config(&a.copy);
    let mut progress = Progress::new("sync", a.json);
    let every = progress.every();
    let mut total = None;
    let mut show = |s: &Status| {
        // The first report fixes the total: what was dirty when copying began.
        let t = *total.get_or_insert(s.dirty_bytes + s.copying_bytes + s.bytes_copied + s.bytes_zeroed);
        let (done, line) = progress_line(s, t);
        progress.show(done, t, line);
    };
    let r = offline::sync(&pair, &copy, TestHooks::default(), Some((&mut show, every)));
    progress.finish();
    let r = r?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "synced {} ({:?} sync{}): copied {}, zeroed {} of holes, {:.1} s, {:.0} MiB/s",
            human(r.device_size),
            r.open.mode,
            match (r.open.created_bitmap, r.open.replaced_bitmap) {
                (true, false) => format!(", new bitmap, {} regions", human(r.granularity)),
                (true, true) => format!(", bitmap rebuilt, {} regions", human(r.granularity)),
                _ => String::new(),
            },
            human(r.bytes_copied),
            human(r.bytes_zeroed),
            r.seconds,
            r.mib_per_sec
        );
    }
    Ok(0)
}

/// "1 region", "2 regions".
fn regions(n: u64) -> String {
    format!("{n} region{}", if n == 1 { "" } else { "s" })
}

/// Runs of `g`-byte regions as lines of region and byte ranges, the bytes clipped to the
/// device's `size` (the last region may be partial). Saturating: a run past the end of a u64
/// (which no checked header gives) prints as ending at `size`, never as a wrapped number.
fn runs_text(runs: &[(u64, u64)], g: u64, size: u64, limit: usize) -> String {
    let mut s = String::new();
    for (i, &(start, n)) in runs.iter().enumerate() {
        if i == limit {
            s += &format!("  ... and {} more runs\n", runs.len() - limit);
            break;
        }
        let first = start.saturating_mul(g).min(size);
        let end = start.saturating_add(n).saturating_mul(g).min(size);
        s += &format!(
            "  regions {start}..{} (bytes {first}..{end}, {})\n",
            start.saturating_add(n).saturating_sub(1),
            human(end - first)
        );
    }
    s
}

fn cmd_verify(a: VerifyArgs) -> CliResult {
    if let Some(id) = a.id {
        return cmd_verify_online(id, a.json);
    }
    let (Some(source), Some(target)) = (a.source, a.target) else {
        return Err("give --source and --target (or -n ID for a live device)".into());
    };
    let opts = VerifyOptions {
        source,
        target,
        bitmap: a.bitmap.clone(),
        granularity: a.granularity,
        direct: a.direct,
        tls: a.tls.files(),
    };
    let mut progress = Progress::new("verify", a.json);
    let every = progress.every();
    let t0 = std::time::Instant::now();
    let mut show = |r: &offline::VerifyReport| {
        let done = r.bytes_compared + r.bytes_skipped;
        let line = rate_line(done, r.device_size, t0.elapsed().as_secs_f64());
        progress.show(done, r.device_size, format!("{line} ({} read, {} holes)", human(r.bytes_compared), human(r.bytes_skipped)));
    };
    let r = offline::verify_with_progress(&opts, Some((&mut show, every)));
    progress.finish();
    let r = r?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else if r.identical() {
        if r.bytes_skipped > 0 {
            println!(
                "identical: {} compared, {} not read (holes on both sides)",
                human(r.bytes_compared),
                human(r.bytes_skipped)
            );
        } else {
            println!("identical: {} compared", human(r.bytes_compared));
        }
    } else {
        println!(
            "DIFFERENT: {} of {} differ ({}):",
            regions(r.differing_regions()),
            human(r.granularity),
            human(r.differing_regions() * r.granularity)
        );
        print!("{}", runs_text(&r.differing, r.granularity, r.device_size, 50));
        if a.bitmap.is_some() {
            if r.differing_clean.is_empty() {
                println!("every differing region is marked dirty in the bitmap: a sync will fix them");
            } else {
                println!(
                    "BUG: {} differing regions are marked clean in the bitmap, so no sync would \
                     copy them. This is a bug in ublk-mirror (or the target was written behind \
                     its back); please report it. Run `ublk-mirror sync --full` to repair:",
                    r.differing_clean_regions()
                );
                print!("{}", runs_text(&r.differing_clean, r.granularity, r.device_size, 50));
            }
        }
    }
    Ok(if r.identical() {
        0
    } else if r.differing_clean.is_empty() {
        EXIT_DIFFER
    } else {
        EXIT_DIFFER_CLEAN
    })
}

/// `verify -n ID`: starts an online verify in the daemon and waits for its report.
fn cmd_verify_online(id: u32, json: bool) -> CliResult {
    ublk_mirror::daemon::control::request(id, &serde_json::json!({ "cmd": "verify" }))?;
    // Bounded by progress: a verify that advances no region for a minute is reported stuck.
    let mut seen = (0, std::time::Instant::now());
    let mut progress = Progress::new("verify", json);
    let t0 = std::time::Instant::now();
    let v = loop {
        std::thread::sleep(Duration::from_millis(300));
        let st = admin::read_status(id)?;
        let v = st["verify"].clone();
        if v["state"] != "running" {
            break v;
        }
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        let done = n("compared") + n("skipped") + n("holes");
        let g = n("granularity").max(1);
        let size = st["device_size"].as_u64().unwrap_or(n("regions").saturating_mul(g));
        // Regions done, in bytes (the last region may be short).
        let bytes = done.saturating_mul(g).min(size);
        let line = rate_line(bytes, size, t0.elapsed().as_secs_f64());
        progress.show(bytes, size, format!("{line} ({} regions read, {} busy, {} holes)", n("compared"), n("skipped"), n("holes")));
        if done != seen.0 {
            seen = (done, std::time::Instant::now());
        } else if seen.1.elapsed() > Duration::from_secs(60) {
            progress.finish();
            return Err(format!("online verify of device {id} made no progress for 60 s (at region {done})").into());
        }
    };
    progress.finish();
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    if v["state"] == "failed" {
        return Err(format!("online verify failed: {}", v["error"].as_str().unwrap_or("?")).into());
    }
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    if !json {
        println!(
            "compared {} ({}), skipped {} dirty or busy, {} not read (holes on both sides: {}), {} mismatches",
            regions(n("compared")),
            human(n("bytes_compared")),
            n("skipped"),
            n("holes"),
            human(n("bytes_skipped")),
            n("mismatches")
        );
        if n("mismatches") > 0 {
            let g = n("granularity").max(1);
            println!("BUG: these regions are clean but differ (or the target was written behind the mirror's back):");
            for r in v["mismatched"].as_array().into_iter().flatten().filter_map(|r| r.as_u64()).take(50) {
                // The daemon's numbers, not trusted to fit: saturate rather than wrap.
                println!("  region {r}: bytes {}..{}", r.saturating_mul(g), r.saturating_add(1).saturating_mul(g));
            }
        }
    }
    Ok(if n("mismatches") > 0 { EXIT_DIFFER_CLEAN } else { 0 })
}

fn cmd_bitmap_show(path: PathBuf, json: bool) -> CliResult {
    let (h, runs) = Bitmap::inspect(&path)?;
    let dirty: u64 = runs.iter().map(|r| r.1).sum();
    let dirty_bytes = dirty.saturating_mul(h.granularity).min(h.device_size);
    if json {
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        ublk_mirror::io::bitmap::write_show_json(&h, &runs, &mut out)?;
        out.flush()?;
        return Ok(0);
    }
    println!("bitmap       {}", path.display());
    println!("uuid         {}", h.uuid);
    println!("version      {}", h.version);
    println!("state        {:?}", h.state);
    println!("source       {}", h.pair.source);
    println!("target       {}", h.pair.target);
    println!("device size  {} ({})", h.device_size, human(h.device_size));
    println!("granularity  {}", human(h.granularity));
    println!("regions      {}", h.nregions);
    println!("dirty        {}, {}", regions(dirty), human(dirty_bytes));
    if runs.len() > SHOW_RUNS {
        println!("dirty by area ({} runs; --json lists them all):", runs.len());
        print!("{}", areas_text(&runs, h.nregions, h.granularity, h.device_size));
        println!("first runs:");
    }
    print!("{}", runs_text(&runs, h.granularity, h.device_size, SHOW_RUNS));
    Ok(0)
}

/// Runs `bitmap show` lists one by one; more are summarised by area.
const SHOW_RUNS: usize = 20;
/// Areas the device is cut into for that summary.
const AREAS: u64 = 16;

/// Dirty regions per sixteenth of the device, one line each: where a scattered dirty set lies,
/// in a screenful.
fn areas_text(runs: &[(u64, u64)], nregions: u64, g: u64, size: u64) -> String {
    let per = nregions.div_ceil(AREAS).max(1);
    let mut count = vec![0u64; nregions.div_ceil(per) as usize];
    for &(start, n) in runs {
        // A run may span areas: each gets its part.
        let mut r = start;
        let end = start.saturating_add(n).min(nregions);
        while r < end {
            let a = r / per;
            let upto = ((a + 1) * per).min(end);
            count[a as usize] += upto - r;
            r = upto;
        }
    }
    let mut s = String::new();
    for (a, &c) in count.iter().enumerate() {
        let (first, last) = (a as u64 * per, ((a as u64 + 1) * per).min(nregions));
        let bytes = |r: u64| r.saturating_mul(g).min(size);
        s += &format!(
            "  bytes {:>9} .. {:>9}: {:>12} dirty ({:.1}%)\n",
            human(bytes(first)),
            human(bytes(last)),
            regions(c),
            c as f64 * 100.0 / (last - first).max(1) as f64
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each sixteenth of the device gets the dirty regions inside it, a run across a boundary
    /// split between two areas.
    #[test]
    fn areas_count_the_regions_inside_them() {
        let (n, g) = (160u64, 4096u64);
        let t = areas_text(&[(0, 1), (5, 10), (150, 10)], n, g, n * g);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 16, "{t}");
        assert!(lines[0].contains(" 6 regions dirty (60.0%)"), "{t}");
        assert!(lines[1].contains(" 5 regions dirty (50.0%)"), "{t}");
        assert!(lines[2].contains(" 0 regions dirty"), "{t}");
        assert!(lines[15].contains(" 10 regions dirty (100.0%)"), "{t}");
    }

    /// Byte ranges stop at the device's end and never overflow, even for runs a header could
    /// not describe (2^38 regions of 64 MiB would end at 2^64).
    #[test]
    fn runs_text_stays_within_the_device() {
        const G: u64 = 64 << 20;
        let size = (1u64 << 58) - 4096;
        let t = runs_text(&[(0, 2), ((1 << 32) - 1, 1)], G, size, 20);
        assert!(t.contains(&format!("bytes 0..{}", 2 * G)), "{t}");
        assert!(t.contains(&format!("bytes {}..{size}", ((1u64 << 32) - 1) * G)), "{t}");
        let t = runs_text(&[((1 << 38) - 1, 1), (u64::MAX - 1, 1)], G, u64::MAX, 20);
        assert!(t.contains(&format!("bytes {}..{}", ((1u64 << 38) - 1) * G, u64::MAX)), "{t}");
    }
}
