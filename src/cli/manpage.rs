//! The man page, generated from the clap definitions so that it cannot drift from the program
//! (a test compares it with the checked-in `man/ublk-mirror.8`).

use crate::cli::Cli;
use clap::CommandFactory;
use clap_mangen::roff::{bold, italic, roman, Roff};
use clap_mangen::Man;

fn arg_line(a: &clap::Arg) -> Vec<clap_mangen::roff::Inline> {
    let mut parts = Vec::new();
    if let Some(s) = a.get_short() {
        parts.push(bold(format!("-{s}")));
    }
    if let Some(l) = a.get_long() {
        if !parts.is_empty() {
            parts.push(roman(", "));
        }
        parts.push(bold(format!("--{l}")));
    }
    let takes_value = a.get_num_args().is_some_and(|n| n.takes_values()) || a.get_action().takes_values();
    if takes_value {
        let name = a
            .get_value_names()
            .and_then(|v| v.first().map(|s| s.to_string()))
            .unwrap_or_else(|| a.get_id().as_str().to_uppercase());
        if parts.is_empty() {
            parts.push(italic(name));
        } else {
            parts.push(roman(" "));
            parts.push(italic(name));
        }
    }
    parts
}

fn help_text(a: &clap::Arg) -> String {
    let mut t = a.get_help().map(|h| h.to_string()).unwrap_or_default();
    let defaults: Vec<String> = a.get_default_values().iter().map(|v| v.to_string_lossy().into_owned()).collect();
    if !defaults.is_empty() && !t.contains("[default") && a.get_action().takes_values() {
        t.push_str(&format!(" [default: {}]", defaults.join(", ")));
    }
    let possible: Vec<String> =
        a.get_possible_values().iter().filter(|v| !v.is_hide_set()).map(|v| v.get_name().to_string()).collect();
    if !possible.is_empty() && a.get_action().takes_values() {
        t.push_str(&format!(" [possible values: {}]", possible.join(", ")));
    }
    t
}

fn section(roff: &mut Roff, name: &str) {
    roff.control("SH", [name]);
}

fn para(roff: &mut Roff, text: &str) {
    roff.control("PP", []);
    roff.text([roman(text)]);
}

fn tagged(roff: &mut Roff, tag: Vec<clap_mangen::roff::Inline>, text: &str) {
    roff.control("TP", []);
    roff.text(tag);
    roff.text([roman(text)]);
}

/// Renders the whole page.
pub fn render() -> String {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let man = Man::new(cmd.clone()).section("8").date("2026-11").source("ublk-mirror").manual("System Administration");
    let mut out = Vec::new();
    // Title, NAME, SYNOPSIS and DESCRIPTION come from clap; the rest is laid out here.
    let _ = man.render_title(&mut out);
    let _ = man.render_name_section(&mut out);
    let mut roff = Roff::default();
    section(&mut roff, "SYNOPSIS");
    roff.text([bold("ublk-mirror"), roman(" "), italic("COMMAND"), roman(" [OPTIONS]")]);
    let _ = roff.to_writer(&mut out);
    let _ = man.render_description_section(&mut out);

    let mut roff = Roff::default();
    section(&mut roff, "COMMANDS");
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let mut nested: Vec<&clap::Command> = sub.get_subcommands().filter(|s| !s.is_hide_set()).collect();
        if nested.is_empty() {
            nested.push(sub);
        }
        for c in nested {
            let name = if std::ptr::eq(c, sub) { sub.get_name().to_string() } else { format!("{} {}", sub.get_name(), c.get_name()) };
            let mut usage = vec![bold(format!("ublk-mirror {name}"))];
            for a in c.get_positionals() {
                usage.push(roman(" "));
                usage.push(italic(a.get_id().as_str().to_uppercase()));
            }
            roff.control("TP", []);
            roff.text(usage);
            let about = c.get_long_about().or(c.get_about()).map(|s| s.to_string()).unwrap_or_default();
            roff.text([roman(about)]);
            roff.control("RS", []);
            for a in c.get_arguments().filter(|a| !a.is_hide_set() && !a.is_positional()) {
                if matches!(a.get_id().as_str(), "help" | "version") {
                    continue;
                }
                tagged(&mut roff, arg_line(a), &help_text(a));
            }
            roff.control("RE", []);
        }
    }
    section(&mut roff, "OPTIONS");
    tagged(&mut roff, vec![bold("-h"), roman(", "), bold("--help")], "Print help (of the program, or of a command after it).");
    tagged(&mut roff, vec![bold("-V"), roman(", "), bold("--version")], "Print the version.");
    para(&mut roff, "Sizes take a K, M, G or T suffix (powers of 1024). The environment variable RUST_LOG sets the log level (error, warn, info, debug); the daemon logs to /run/ublk-mirror/daemon-PID.log.");

    section(&mut roff, "FILES");
    tagged(&mut roff, vec![italic("BITMAP")], "The persistent dirty bitmap given with --bitmap: a 4 KiB header (magic UBLKMIRB, version, UUID, granularity, device size, the source and target it belongs to, state, CRC-32) and one bit per region. ublk-mirror refuses a bitmap it cannot trust and never treats it as clean; --full rebuilds it.");
    tagged(&mut roff, vec![bold("/run/ublk-mirror/")], "Status of each running device (N.json, read by status and del --wait-synced) and the daemons' logs.");
    tagged(&mut roff, vec![bold("/run/ublksrvd/")], "libublk's saved configuration of each device, read by recover.");
    tagged(&mut roff, vec![bold("/dev/ublkb"), italic("N")], "The mirrored block device.");

    section(&mut roff, "EXIT STATUS");
    tagged(&mut roff, vec![bold("0")], "Success; for verify, source and target are identical.");
    tagged(&mut roff, vec![bold("1")], "An error: the message names the problem and what to do.");
    tagged(&mut roff, vec![bold("2")], "A usage error.");
    tagged(&mut roff, vec![bold("3")], "verify found differences, all in regions the bitmap marks dirty (or no bitmap was given).");
    tagged(&mut roff, vec![bold("4")], "verify found differences in regions the bitmap marks clean: a bug, or the target was written behind the mirror's back.");

    section(&mut roff, "EXAMPLES");
    let examples = [
        ("Mirror a disk to an image file on another disk (a full sync first):", "ublk-mirror add --source /dev/sdb --target /backup/sdb.img --bitmap /var/lib/ublk-mirror/sdb.bitmap"),
        ("Mirror it to a remote machine over TLS, its NBD server checked against your CA (on the remote: qemu-nbd --object tls-creds-x509,id=t0,dir=/etc/pki/qemu,endpoint=server --tls-creds t0 -x disk1 -f raw /srv/disk1.img):", "ublk-mirror add -s /dev/sdb -t nbds://backup.example/disk1 -b /var/lib/ublk-mirror/sdb.bitmap --tls-ca /etc/ublk-mirror/tls/ca.pem"),
        ("Watch it, then remove it once the target is a consistent copy:", "ublk-mirror status -n 0; ublk-mirror del -n 0 --wait-synced"),
        ("After the daemon died (the device waits, I/O blocks):", "ublk-mirror recover -n 0"),
        ("Bring a copy up to date offline, then check it:", "ublk-mirror sync -s disk.img -t copy.img -b disk.bitmap && ublk-mirror verify -s disk.img -t copy.img -b disk.bitmap"),
        ("Publish every device's state to Prometheus through node_exporter's textfile collector (run it every minute from a timer; the rename makes the new file appear whole):", "ublk-mirror metrics > /var/lib/prometheus/node-exporter/ublk-mirror.prom.tmp && mv /var/lib/prometheus/node-exporter/ublk-mirror.prom.tmp /var/lib/prometheus/node-exporter/ublk-mirror.prom"),
    ];
    for (what, cmdline) in examples {
        para(&mut roff, what);
        roff.control("RS", []);
        roff.control("nf", []);
        roff.text([roman(cmdline)]);
        roff.control("fi", []);
        roff.control("RE", []);
    }

    section(&mut roff, "SEE ALSO");
    roff.text([
        bold("ublk-mirror.conf"), roman("(5), "),
        bold("mdadm"), roman("(8), "), bold("drbdadm"), roman("(8), "), bold("dmsetup"), roman("(8), "),
        bold("losetup"), roman("(8), "), bold("qemu-img"), roman("(1); the ublk documentation in the Linux kernel tree (Documentation/block/ublk.rst)."),
    ]);
    let _ = roff.to_writer(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The keys of `/etc/ublk-mirror/NAME.conf`: (key, meaning, example value). The example file in
/// `systemd/` and the `ublk-mirror.conf(5)` page are both made from this list.
pub const CONF_KEYS: &[(&str, &str, &str)] = &[
    ("SOURCE", "The device's data: a block device (prefer a stable path under /dev/disk/by-id, by-uuid or by-partuuid: the udev rules match it when the disk appears) or a file.", "/dev/disk/by-id/ata-EXAMPLE-SERIAL"),
    ("TARGET", "The mirror, at least as large as the source: a block device, a file, or an NBD export (nbd://HOST[:PORT]/EXPORT; nbds://... over TLS, with --tls-ca, --tls-cert and --tls-key in OPTIONS).", "/srv/mirrors/example.img"),
    ("BITMAP", "The persistent dirty bitmap, created with a full sync on the first start. Keep it on a local, journaled file system.", "/var/lib/ublk-mirror/example.bitmap"),
    ("OPTIONS", "Further options of ublk-mirror add, for example queues, depth, granularity, copy speed, copy mode and max lag (see ublk-mirror(8)).", "-q 2 --speed 200M --max-lag 30s"),
    ("STOP_TIMEOUT", "Seconds that stopping the unit waits for a consistent point before removing the device anyway.", "120"),
];

/// `systemd/ublk-mirror.conf.example`.
pub fn render_conf_example() -> String {
    let mut s = String::from(
        "# /etc/ublk-mirror/NAME.conf: one mirrored device, started by ublk-mirror@NAME.service.\n\
         # KEY=VALUE lines as in a shell (systemd EnvironmentFile), no spaces around '='.\n\
         # Generated from src/cli/manpage.rs (CONF_KEYS); see ublk-mirror.conf(5).\n",
    );
    for (k, what, example) in CONF_KEYS {
        s.push_str(&format!("\n# {what}\n{k}={example}\n"));
    }
    s
}

/// `man/ublk-mirror.conf.5`.
pub fn render_conf() -> String {
    let mut roff = Roff::default();
    roff.control("TH", ["UBLK-MIRROR.CONF", "5", "2026-11", "ublk-mirror", "File Formats"]);
    section(&mut roff, "NAME");
    roff.text([roman("ublk-mirror.conf - configuration of one mirrored device started by systemd")]);
    section(&mut roff, "SYNOPSIS");
    roff.text([bold("/etc/ublk-mirror/"), italic("NAME"), bold(".conf")]);
    section(&mut roff, "DESCRIPTION");
    para(&mut roff, "Each file configures the device NAME, which the unit ublk-mirror@NAME.service starts with ublk-mirror up --name NAME (adding it, or recovering it if its daemon died) and stops with ublk-mirror down --name NAME --wait-synced. The file is read as a systemd EnvironmentFile: KEY=VALUE lines, comments start with #, values may be quoted, the last assignment of a key wins.");
    section(&mut roff, "KEYS");
    for (k, what, example) in CONF_KEYS {
        tagged(&mut roff, vec![bold(k.to_string())], &format!("{what} Example: {example}"));
    }
    section(&mut roff, "EXAMPLES");
    roff.control("nf", []);
    for (k, _, example) in CONF_KEYS {
        roff.text([roman(format!("{k}={example}"))]);
    }
    roff.control("fi", []);
    section(&mut roff, "SEE ALSO");
    roff.text([bold("ublk-mirror"), roman("(8), "), bold("systemd.exec"), roman("(5), "), bold("udev"), roman("(7)")]);
    roff.to_roff()
}
