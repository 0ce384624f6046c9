//! The man page and the completions come from the clap definitions: the checked-in page and
//! completions must be what they generate now (regenerate with `cargo run -- man >
//! man/ublk-mirror.8`, `cargo run -- completions bash > completions/ublk-mirror.bash`...).

use std::process::Command;

fn run(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ublk-mirror")).args(args).output().expect("run");
    assert!(out.status.success(), "ublk-mirror {args:?} failed");
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn checked_in_man_page_is_current() {
    let generated = ublk_mirror::cli::manpage::render();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/man/ublk-mirror.8");
    let checked_in = std::fs::read_to_string(path).expect("man/ublk-mirror.8");
    assert!(
        generated == checked_in,
        "man/ublk-mirror.8 differs from the page the CLI generates: run `cargo run -- man > man/ublk-mirror.8`"
    );
    for s in ["NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "OPTIONS", "FILES", "EXIT STATUS", "EXAMPLES", "SEE ALSO"] {
        assert!(generated.contains(&format!(".SH {s}")) || generated.contains(&format!(".SH \"{s}\"")), "no {s} section");
    }
    for c in ["add", "del", "recover", "sync", "bitmap show", "status", "list", "verify", "metrics"] {
        // roff escapes the dash.
        assert!(generated.contains(&format!("ublk\\-mirror {c}")), "{c} is not documented");
    }
    assert_eq!(run(&["man"]), generated);
}

#[test]
fn completions_cover_the_commands() {
    for shell in ["bash", "zsh", "fish"] {
        let c = run(&["completions", shell]);
        for word in ["add", "recover", "verify", "wait-synced", "granularity"] {
            assert!(c.contains(word), "{shell} completion lacks {word}");
        }
    }
}

/// The Debian package ships checked-in completions (Cargo.toml's assets, so that a plain
/// `cargo deb` has them): they must be what the CLI generates now.
#[test]
fn checked_in_completions_are_current() {
    let root = env!("CARGO_MANIFEST_DIR");
    for (shell, file) in [("bash", "ublk-mirror.bash"), ("zsh", "_ublk-mirror"), ("fish", "ublk-mirror.fish")] {
        let checked_in = std::fs::read_to_string(format!("{root}/completions/{file}")).unwrap_or_default();
        assert!(
            checked_in == run(&["completions", shell]),
            "completions/{file} is stale: run `cargo run -- completions {shell} > completions/{file}`"
        );
    }
}

#[test]
fn config_page_and_example_are_current() {
    let root = env!("CARGO_MANIFEST_DIR");
    let page = std::fs::read_to_string(format!("{root}/man/ublk-mirror.conf.5")).expect("man/ublk-mirror.conf.5");
    assert!(page == ublk_mirror::cli::manpage::render_conf(), "man/ublk-mirror.conf.5 is stale: run `cargo run -- man --conf > man/ublk-mirror.conf.5`");
    let ex = std::fs::read_to_string(format!("{root}/systemd/ublk-mirror.conf.example")).expect("example");
    assert!(
        ex == ublk_mirror::cli::manpage::render_conf_example(),
        "systemd/ublk-mirror.conf.example is stale: run `cargo run -- man --conf-example > systemd/ublk-mirror.conf.example`"
    );
    for (k, _, _) in ublk_mirror::cli::manpage::CONF_KEYS {
        assert!(page.contains(k), "{k} is not documented");
    }
}
