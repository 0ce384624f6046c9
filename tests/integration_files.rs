//! The system files: the systemd unit passes `systemd-analyze verify`, the config example
//! parses the way the unit reads it, and the udev rules use only the command the binary has.

use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn systemd_unit_verifies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = std::fs::read_to_string(format!("{ROOT}/systemd/ublk-mirror@.service")).expect("unit");
    // Point the unit at this build and its config at the example, so that verify can check the
    // executables and the environment file exist.
    let bin = env!("CARGO_BIN_EXE_ublk-mirror");
    let conf_dir = dir.path().join("etc");
    std::fs::create_dir_all(&conf_dir).unwrap();
    std::fs::copy(format!("{ROOT}/systemd/ublk-mirror.conf.example"), conf_dir.join("example.conf")).unwrap();
    let unit = unit
        .replace("/usr/bin/ublk-mirror", bin)
        .replace("/etc/ublk-mirror/", &format!("{}/", conf_dir.display()));
    let path = dir.path().join("ublk-mirror@.service");
    std::fs::write(&path, unit).unwrap();
    let inst = dir.path().join("ublk-mirror@example.service");
    std::os::unix::fs::symlink(&path, &inst).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&inst)
        .output()
        .expect("systemd-analyze must be installed (package systemd): scripts/deps.sh installs it");
    let err = String::from_utf8_lossy(&out.stderr);
    // verify also reports problems of unrelated system units on some machines: only lines that
    // name our unit count.
    let ours: Vec<&str> = err.lines().filter(|l| l.contains("ublk-mirror@")).collect();
    assert!(out.status.success() && ours.is_empty(), "systemd-analyze verify: {err}");
}

#[test]
fn config_example_has_every_variable_the_unit_uses() {
    let unit = std::fs::read_to_string(format!("{ROOT}/systemd/ublk-mirror@.service")).unwrap();
    let conf = std::fs::read_to_string(format!("{ROOT}/systemd/ublk-mirror.conf.example")).unwrap();
    let defined: Vec<&str> = conf
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('='))
        .map(|l| l.split('=').next().unwrap_or(""))
        .collect();
    for var in ["SOURCE", "TARGET", "BITMAP", "OPTIONS", "STOP_TIMEOUT"] {
        assert!(unit.contains(var), "the unit does not use {var}");
        assert!(defined.contains(&var), "the example does not define {var}");
    }
}

#[test]
fn udev_rules_call_an_existing_command() {
    let rules = std::fs::read_to_string(format!("{ROOT}/udev/60-ublk-mirror.rules")).unwrap();
    assert!(rules.contains("ublk-mirror udev-name %k"));
    // The helper exists and fails quietly for something that is not a ublk-mirror device.
    let out = Command::new(env!("CARGO_BIN_EXE_ublk-mirror")).args(["udev-name", "sda"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    // Every non-comment line continues or is a complete rule with a match and an action.
    let mut joined = String::new();
    for l in rules.lines().filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty()) {
        joined.push_str(l.trim_end_matches('\\'));
        if !l.ends_with('\\') {
            assert!(joined.contains("==") && (joined.contains("+=") || joined.contains("=\"")), "odd rule: {joined}");
            joined.clear();
        }
    }
    assert!(joined.is_empty(), "a rule ends with a continuation");
}

#[test]
fn install_script_puts_every_file_in_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(format!("{ROOT}/scripts/install.sh"))
        .args(["--destdir", dir.path().to_str().unwrap(), "--bin", env!("CARGO_BIN_EXE_ublk-mirror")])
        .output()
        .expect("run install.sh");
    assert!(out.status.success(), "install.sh: {}", String::from_utf8_lossy(&out.stderr));
    for f in [
        "usr/local/bin/ublk-mirror",
        "usr/local/share/man/man8/ublk-mirror.8",
        "usr/local/share/man/man5/ublk-mirror.conf.5",
        "etc/systemd/system/ublk-mirror@.service",
        "etc/udev/rules.d/60-ublk-mirror.rules",
        "etc/ublk-mirror/example.conf.sample",
        "usr/local/share/bash-completion/completions/ublk-mirror",
        "usr/local/share/zsh/site-functions/_ublk-mirror",
        "usr/local/share/fish/vendor_completions.d/ublk-mirror.fish",
    ] {
        let p = dir.path().join(f);
        let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        assert!(len > 0, "{f} is missing or empty after install");
    }
    // The checked-in unit and rules name the Debian package's /usr/bin/ublk-mirror; installed
    // under /usr/local they must name the binary installed there.
    for f in ["etc/systemd/system/ublk-mirror@.service", "etc/udev/rules.d/60-ublk-mirror.rules"] {
        let text = std::fs::read_to_string(dir.path().join(f)).unwrap();
        assert!(text.contains("/usr/local/bin/ublk-mirror "), "{f} does not name /usr/local/bin/ublk-mirror");
        assert!(!text.contains("/usr/bin/ublk-mirror"), "{f} still names /usr/bin/ublk-mirror");
    }
}

#[test]
fn udev_source_matches_configured_sources_by_kernel_name_or_link() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("db.conf"), "SOURCE=/dev/disk/by-id/ata-DISK-1\nTARGET=/x\n").unwrap();
    std::fs::write(dir.path().join("raw.conf"), "SOURCE=\"/dev/sdc\"\n").unwrap();
    std::fs::write(dir.path().join("notes.txt"), "SOURCE=/dev/sdb\n").unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_ublk-mirror"))
            .arg("udev-source")
            .args(args)
            .arg("--config-dir")
            .arg(dir.path())
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    // udev passes $links as one word list.
    assert_eq!(run(&["sdb", "disk/by-path/x disk/by-id/ata-DISK-1"]), (Some(0), "db".to_string()));
    assert_eq!(run(&["sdc"]), (Some(0), "raw".to_string()));
    assert_eq!(run(&["sdd", "disk/by-id/other"]), (Some(1), String::new()));
}

/// `vm/run.sh` (behind the README's main command) on a machine without qemu runs the setup,
/// which installs it, instead of stopping: here with qemu-system-x86_64 hidden from PATH and a
/// stand-in setup command that records its call (and fails, so that nothing is installed or
/// booted).
#[test]
fn vm_run_sets_up_a_machine_without_qemu() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).expect("bin");
    // Every command of the machine but qemu's emulators.
    for d in ["/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"] {
        let Ok(rd) = std::fs::read_dir(d) else { continue };
        for e in rd.flatten() {
            let name = e.file_name();
            if name.to_string_lossy().starts_with("qemu-system") || bin.join(&name).exists() {
                continue;
            }
            let _ = std::os::unix::fs::symlink(e.path(), bin.join(&name));
        }
    }
    let called = dir.path().join("setup-called");
    let setup = dir.path().join("setup.sh");
    std::fs::write(&setup, format!("#!/bin/sh\necho called > {}\nexit 1\n", called.display())).expect("setup stub");
    std::fs::set_permissions(&setup, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let out = std::process::Command::new(bin.join("bash"))
        .arg(format!("{ROOT}/vm/run.sh"))
        .args(["-t", "30", &format!("{ROOT}/vm/guest/smoke.sh")])
        .env("PATH", &bin)
        .env("UBLK_MIRROR_VM_SETUP", &setup)
        .env("UBLK_MIRROR_VM_CACHE", dir.path().join("cache"))
        .env_remove("UBLK_MIRROR_VM_NO_AUTO_SETUP")
        .output()
        .expect("run vm/run.sh");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(called.exists(), "run.sh did not run the setup on a machine without qemu:\n{err}");
    assert!(err.contains("host tools missing: qemu-system-x86_64"), "{err}");
    assert!(!out.status.success(), "the stand-in setup failed, so must run.sh");
}
