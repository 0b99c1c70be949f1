//! Architecture invariant: the engine is a plain state machine. It depends on nothing that does
//! I/O or keeps time, and its sources never read the clock, the file system or the network.
//! Fails if its manifest gains such a crate or a source file reaches for one.

#[test]
fn engine_has_no_io_dependencies() {
    let manifest: toml::Table =
        toml::from_str(include_str!("../Cargo.toml")).expect("Cargo.toml parses");
    let deps = manifest
        .get("dependencies")
        .and_then(|d| d.as_table())
        .cloned()
        .unwrap_or_default();
    // The engine may use serde and thiserror for its types, and nothing of ours but protocol.
    let allowed = ["serde", "thiserror", "stagely-protocol"];
    for name in deps.keys() {
        assert!(
            allowed.contains(&name.as_str()),
            "the engine must stay a plain state machine, but depends on {name}"
        );
    }
}

#[test]
fn engine_sources_never_read_the_clock_or_do_io() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for forbidden in [
            "Instant::now",
            "SystemTime::now",
            "std::fs",
            "std::net",
            "std::thread",
            "std::process",
            "std::env",
            "tokio::",
        ] {
            assert!(
                !text.contains(forbidden),
                "{} uses {forbidden}",
                path.display()
            );
        }
        checked += 1;
    }
    assert!(checked >= 3, "the engine's sources were not found");
}
