//! docs/architecture.md describes the code as it is: every code name it quotes (a path with
//! `::`, a type, or a snake_case name with an underscore) is defined somewhere in src/.

use std::path::Path;

fn sources(dir: &Path, out: &mut String) {
    for e in std::fs::read_dir(dir).expect("src/") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push_str(&std::fs::read_to_string(&p).expect("source"));
        }
    }
}

/// Whether `name` is defined in `src`: an item of that name, or a field or variant.
fn defined(src: &str, name: &str) -> bool {
    ["fn ", "struct ", "enum ", "const ", "type ", "trait ", "mod ", "static "]
        .iter()
        .any(|k| src.match_indices(&format!("{k}{name}")).any(|(i, _)| {
            let after = src[i + k.len() + name.len()..].chars().next();
            !after.is_some_and(|c| c.is_alphanumeric() || c == '_')
        }))
        || src.lines().any(|l| {
            let l = l.trim_start();
            l.strip_prefix(name).is_some_and(|rest| rest.starts_with([',', '(', ' ', '{']) && rest.trim_start().starts_with([',', '(', '{']))
        })
}

#[test]
fn architecture_names_exist_in_the_code() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/architecture.md")).expect("docs/architecture.md");
    let mut src = String::new();
    sources(&root.join("src"), &mut src);
    let mut checked = 0;
    let mut missing = Vec::new();
    for quoted in doc.split('`').skip(1).step_by(2) {
        let code_like = quoted.chars().all(|c| c.is_alphanumeric() || c == '_' || c == ':')
            && (quoted.contains("::") || quoted.contains('_') || quoted.starts_with(|c: char| c.is_uppercase()));
        if !code_like {
            continue;
        }
        let name = quoted.rsplit("::").next().unwrap_or(quoted);
        checked += 1;
        if !defined(&src, name) {
            missing.push(quoted.to_string());
        }
    }
    assert!(checked > 40, "only {checked} names found in docs/architecture.md: is the parsing right?");
    assert!(missing.is_empty(), "docs/architecture.md names what src/ does not define: {missing:?}");
}
