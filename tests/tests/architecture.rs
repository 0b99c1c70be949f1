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
            "stagely-engine",
            "stagely-protocol",
            "stagely-provisioning",
            "stagely-cloud-init",
        ],
    ),
    (
        "stagely-core",
        &[
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
    ("stagely-engine", &["stagely-protocol"]),
    ("stagely-cloud-init", &[]),
    ("stagely-protocol", &[]),
];

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
    let names: BTreeSet<String> = packages
        .iter()
        .map(|p| p["name"].as_str().expect("name").to_owned())
        .collect();
    packages
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .expect("dependencies")
                .iter()
                .map(|d| d["name"].as_str().expect("dependency name").to_owned())
                .filter(|d| names.contains(d))
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
        let Some(may) = allowed.get(name.as_str()) else {
            panic!("the workspace crate {name} has no row in ALLOWED: place it in the layering");
        };
        for dep in deps {
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
