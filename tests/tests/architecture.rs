//! Architecture invariant: the crates depend on each other in one direction only. The table
//! below is the whole allowed graph; `cargo metadata` is the truth it is checked against, so an
//! arrow that points the other way (the engine reaching for the store, the agent for the
//! server) fails here, and so does a new crate nobody placed in the table.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

/// For each workspace crate, the workspace crates it may depend on (normal, build and dev
/// dependencies alike). Order: from the binary down to the leaves.
const ALLOWED: &[(&str, &[&str])] = &[
    (
        "stagely-tests",
        &[
            "stagely-core",
            "stagely-store",
            "stagely-engine",
            "stagely-protocol",
            "stagely-provisioning",
            "stagely-cloud-init",
        ],
    ),
    (
        "stagely-core",
        &[
            "stagely-store",
            "stagely-engine",
            "stagely-protocol",
            "stagely-provisioning",
            "stagely-cloud-init",
        ],
    ),
    ("stagely-agent", &["stagely-protocol", "stagely-cloud-init"]),
    (
        "stagely-provisioning",
        &["stagely-protocol", "stagely-cloud-init"],
    ),
    ("stagely-store", &["stagely-engine"]),
    ("stagely-engine", &["stagely-protocol"]),
    ("stagely-cloud-init", &[]),
    ("stagely-protocol", &[]),
];

/// Every workspace crate with the names of all its dependencies (ours and the registry's).
fn workspace_graph() -> BTreeMap<String, BTreeSet<String>> {
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--no-deps",
            "--offline",
            "--format-version",
            "1",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata is JSON");
    let packages = meta["packages"].as_array().expect("packages");
    packages
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .expect("dependencies")
                .iter()
                .map(|d| d["name"].as_str().expect("dependency name").to_owned())
                .collect();
            (p["name"].as_str().expect("name").to_owned(), deps)
        })
        .collect()
}

#[test]
fn every_crate_dependency_points_down_the_table() {
    let graph = workspace_graph();
    let allowed: BTreeMap<&str, BTreeSet<&str>> = ALLOWED
        .iter()
        .map(|(name, deps)| (*name, deps.iter().copied().collect()))
        .collect();
    for (name, deps) in &graph {
        let deps: BTreeSet<&String> = deps.iter().filter(|d| graph.contains_key(*d)).collect();
        let Some(may) = allowed.get(name.as_str()) else {
            panic!("the workspace crate {name} has no row in ALLOWED: place it in the layering");
        };
        for dep in &deps {
            assert!(
                may.contains(dep.as_str()),
                "{name} depends on {dep}, an arrow the layering does not allow"
            );
        }
    }
    for (name, _) in ALLOWED {
        assert!(
            graph.contains_key(*name),
            "ALLOWED names {name}, which is not a workspace crate"
        );
    }
}

#[test]
fn the_allowed_table_itself_has_no_cycle() {
    // Each row may only name crates in rows below it: a total order, so no cycle can hide in it.
    for (index, (name, deps)) in ALLOWED.iter().enumerate() {
        for dep in *deps {
            let below = ALLOWED[index + 1..].iter().any(|(n, _)| n == dep);
            assert!(below, "{name} may depend on {dep}, which is not below it");
        }
    }
}

#[test]
fn only_the_store_knows_sql() {
    // The tests' harness reads databases directly to check what was stored; no product crate
    // but the store may.
    for (name, deps) in workspace_graph() {
        if deps.contains("sqlx") {
            assert!(
                name == "stagely-store" || name == "stagely-tests",
                "{name} depends on sqlx: only stagely-store may speak SQL"
            );
        }
    }
}

#[test]
fn the_engine_builds_without_tokio() {
    // The engine's whole dependency tree, not just its manifest: nothing in it pulls tokio in.
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            "stagely-engine",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(
        tree.contains("stagely-engine"),
        "cargo tree listed nothing: {tree}"
    );
    let crates: BTreeSet<&str> = tree.lines().filter_map(|l| l.split(' ').next()).collect();
    for forbidden in [
        "tokio",
        "sqlx",
        "axum",
        "hyper",
        "mio",
        "reqwest",
        "async-trait",
    ] {
        assert!(
            !crates.contains(forbidden),
            "the engine's dependency tree holds {forbidden}: {tree}"
        );
    }
}
