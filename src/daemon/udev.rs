//! The udev helpers: names for a device's symlinks (`/dev/ublk-mirror/NAME`) and the mirrors a
//! block device is the configured source of (for starting them when it appears).

use super::saved::{check_name, ExportedDevice};
use std::path::Path;

/// For udev: the name of the ublk-mirror device behind kernel name `ublkbN`, from libublk's
/// saved configuration (no ublk command is sent).
pub fn udev_name(kernel: &str) -> Option<String> {
    let id: u32 = kernel.strip_prefix("ublkb")?.parse().ok()?;
    let text = std::fs::read_to_string(format!("/run/ublksrvd/{id:04}.json")).ok()?;
    let exported: ExportedDevice = serde_json::from_str(&text).ok()?;
    let name = exported.target_data?.name?;
    check_name(&name).ok()?;
    Some(name)
}

/// For udev: the names of the configured mirrors (`DIR/NAME.conf`) whose `SOURCE=` is this block
/// device, given its kernel name and its current symlinks (relative to /dev, as udev's `$links`).
pub fn udev_source(config_dir: &Path, kernel: &str, links: &[String]) -> Vec<String> {
    let mut paths: Vec<String> = vec![format!("/dev/{kernel}")];
    paths.extend(links.iter().map(|l| format!("/dev/{l}")));
    let Ok(dir) = std::fs::read_dir(config_dir) else { return Vec::new() };
    let mut names = Vec::new();
    for e in dir.flatten() {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some("conf") {
            continue;
        }
        let Some(name) = p.file_stem().and_then(|x| x.to_str()).map(String::from) else { continue };
        if check_name(&name).is_err() {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&p) else { continue };
        // The last assignment wins, as in a shell (and systemd's EnvironmentFile).
        let source = text
            .lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix("SOURCE="))
            .map(|v| v.trim().trim_matches('"').to_string());
        if source.is_some_and(|s| paths.contains(&s)) {
            names.push(name);
        }
    }
    names.sort();
    names
}
