//! Architecture invariant: `protocol` does no I/O. Fails if its manifest gains an I/O crate.

#[test]
fn protocol_has_no_io_dependencies() {
    let manifest: toml::Table =
        toml::from_str(include_str!("../Cargo.toml")).expect("Cargo.toml parses");
    let deps = manifest
        .get("dependencies")
        .and_then(|d| d.as_table())
        .cloned()
        .unwrap_or_default();
    for forbidden in [
        "tokio",
        "sqlx",
        "axum",
        "reqwest",
        "tokio-tungstenite",
        "hyper",
        "mio",
        "async-std",
    ] {
        assert!(
            !deps.contains_key(forbidden),
            "protocol must stay free of I/O, but depends on {forbidden}"
        );
    }
}

#[test]
fn protocol_sources_never_read_the_clock() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for forbidden in ["Instant::now", "SystemTime::now", "std::fs", "std::net"] {
            assert!(
                !text.contains(forbidden),
                "{} uses {forbidden}",
                path.display()
            );
        }
    }
}
