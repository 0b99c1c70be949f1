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
            "stagely-server",
            "stagely-agent",
            "stagely-api",
            "stagely-store",
            "stagely-engine",
            "stagely-protocol",
            "stagely-provisioning",
            "stagely-cloud-init",
        ],
    ),
    // The `stagely` binary: clap, the HTTP/SSE client, `stagely run`. It reaches the
    // service only through its entry points and the API's types.
    ("stagely-core", &["stagely-server", "stagely-api"]),
    (
        "stagely-server",
        &[
            "stagely-api",
            "stagely-store",
            "stagely-engine",
            "stagely-protocol",
            "stagely-provisioning",
            "stagely-cloud-init",
        ],
    ),
    ("stagely-agent", &["stagely-protocol", "stagely-cloud-init"]),
    ("stagely-api", &[]),
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
    let tree = normal_tree("stagely-engine");
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

#[test]
fn the_api_types_are_plain_data() {
    // What the server, the CLI and the tests share carries no runtime: serde and nothing else.
    let tree = normal_tree("stagely-api");
    for line in tree.lines() {
        let name = line.split(' ').next().unwrap_or_default();
        assert!(
            name.is_empty()
                || name.starts_with("stagely-api")
                || name.starts_with("serde")
                || ["proc-macro2", "quote", "syn", "unicode-ident"].contains(&name),
            "stagely-api depends on {name}: {tree}"
        );
    }
}

/// `cargo tree -p CRATE -e normal --prefix none`: one `name vX` per line.
fn normal_tree(krate: &str) -> String {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            krate,
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
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The top-level modules of one crate that each top-level module names (`crate::x`, in code,
/// `use` trees and macro bodies alike), test modules left out: module → modules it imports.
fn module_graph(src: &std::path::Path) -> BTreeMap<String, BTreeSet<String>> {
    use syn::visit::Visit;

    struct Refs {
        found: BTreeSet<String>,
    }
    impl Refs {
        fn tokens(&mut self, tokens: proc_macro2::TokenStream) {
            let tokens: Vec<proc_macro2::TokenTree> = tokens.into_iter().collect();
            for (i, token) in tokens.iter().enumerate() {
                match token {
                    proc_macro2::TokenTree::Group(group) => self.tokens(group.stream()),
                    proc_macro2::TokenTree::Ident(ident) if ident == "crate" => {
                        let after = (tokens.get(i + 1), tokens.get(i + 2), tokens.get(i + 3));
                        if let (
                            Some(proc_macro2::TokenTree::Punct(a)),
                            Some(proc_macro2::TokenTree::Punct(b)),
                            Some(next),
                        ) = after
                            && a.as_char() == ':'
                            && b.as_char() == ':'
                        {
                            // `$crate` is the macro's own crate root, not a module.
                            let dollar = i > 0
                                && matches!(&tokens[i - 1], proc_macro2::TokenTree::Punct(p) if p.as_char() == '$');
                            match next {
                                proc_macro2::TokenTree::Ident(module) if !dollar => {
                                    self.found.insert(module.to_string());
                                }
                                proc_macro2::TokenTree::Group(group) if !dollar => {
                                    self.group(group.stream());
                                }
                                _ => {}
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        /// `crate::{a, b::c}`: the first name of each item.
        fn group(&mut self, tokens: proc_macro2::TokenStream) {
            let mut first = true;
            for token in tokens {
                match token {
                    proc_macro2::TokenTree::Ident(ident) if first => {
                        self.found.insert(ident.to_string());
                        first = false;
                    }
                    proc_macro2::TokenTree::Punct(p) if p.as_char() == ',' => first = true,
                    _ => {}
                }
            }
        }
    }
    fn is_test(attrs: &[syn::Attribute]) -> bool {
        attrs
            .iter()
            .any(|attr| attr.path().is_ident("cfg") && quote_tokens(attr).contains("test"))
    }
    fn quote_tokens(attr: &syn::Attribute) -> String {
        match &attr.meta {
            syn::Meta::List(list) => list.tokens.to_string(),
            _ => String::new(),
        }
    }
    impl<'ast> Visit<'ast> for Refs {
        fn visit_item_mod(&mut self, item: &'ast syn::ItemMod) {
            if !is_test(&item.attrs) {
                syn::visit::visit_item_mod(self, item);
            }
        }
        fn visit_item_fn(&mut self, item: &'ast syn::ItemFn) {
            if !is_test(&item.attrs) {
                syn::visit::visit_item_fn(self, item);
            }
        }
        fn visit_path(&mut self, path: &'ast syn::Path) {
            let mut segments = path.segments.iter();
            if let (Some(first), Some(second)) = (segments.next(), segments.next())
                && first.ident == "crate"
            {
                self.found.insert(second.ident.to_string());
            }
            syn::visit::visit_path(self, path);
        }
        fn visit_use_tree(&mut self, tree: &'ast syn::UseTree) {
            if let syn::UseTree::Path(path) = tree
                && path.ident == "crate"
            {
                match &*path.tree {
                    syn::UseTree::Path(next) => {
                        self.found.insert(next.ident.to_string());
                    }
                    syn::UseTree::Name(name) => {
                        self.found.insert(name.ident.to_string());
                    }
                    syn::UseTree::Rename(rename) => {
                        self.found.insert(rename.ident.to_string());
                    }
                    syn::UseTree::Group(group) => {
                        for item in &group.items {
                            match item {
                                syn::UseTree::Path(next) => {
                                    self.found.insert(next.ident.to_string());
                                }
                                syn::UseTree::Name(name) => {
                                    self.found.insert(name.ident.to_string());
                                }
                                syn::UseTree::Rename(rename) => {
                                    self.found.insert(rename.ident.to_string());
                                }
                                _ => {}
                            }
                        }
                    }
                    _ => {}
                }
                return;
            }
            syn::visit::visit_use_tree(self, tree);
        }
        fn visit_macro(&mut self, mac: &'ast syn::Macro) {
            self.tokens(mac.tokens.clone());
        }
        fn visit_item_macro(&mut self, item: &'ast syn::ItemMacro) {
            self.tokens(item.mac.tokens.clone());
        }
    }

    fn files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("source dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut all = Vec::new();
    files(src, &mut all);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in all {
        let relative = file.strip_prefix(src).expect("under src");
        let top = relative
            .components()
            .next()
            .expect("a file")
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        // The crate roots declare the modules; a binary's root is another crate.
        if ["lib", "main"].contains(&top.as_str()) {
            continue;
        }
        // A file of one module's own tests (`mod tests;` under `#[cfg(test)]`).
        if relative.file_stem().is_some_and(|stem| stem == "tests") {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("readable source");
        let parsed = syn::parse_file(&text)
            .unwrap_or_else(|error| panic!("{} does not parse: {error}", file.display()));
        let mut refs = Refs {
            found: BTreeSet::new(),
        };
        refs.visit_file(&parsed);
        let entry = graph.entry(top.clone()).or_default();
        entry.extend(refs.found.into_iter().filter(|m| *m != top));
    }
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for deps in graph.values_mut() {
        deps.retain(|m| modules.contains(m));
    }
    graph
}

/// A cycle in `graph`, as the modules along it, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, done, path) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut done, &mut Vec::new()))
}

#[test]
fn no_import_circle_between_the_modules_of_a_crate() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf();
    let mut checked = 0;
    for krate in [
        "protocol",
        "core",
        "core/server",
        "core/api",
        "core/engine",
        "core/store",
        "agent",
        "provisioning",
        "cloud-init",
        "tests",
    ] {
        let graph = module_graph(&root.join(krate).join("src"));
        checked += graph.len();
        if let Some(cycle) = find_cycle(&graph) {
            panic!(
                "the modules of {krate} import each other in a circle: {}",
                cycle.join(" -> ")
            );
        }
    }
    assert!(checked > 40, "only {checked} modules were found");
}

#[test]
fn the_circle_finder_finds_circles() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("api", &["runner", "source"][..]),
        ("source", &["config"]),
        ("config", &["api"]),
        ("runner", &[]),
    ]
    .into_iter()
    .map(|(m, deps)| (m.to_string(), deps.iter().map(|d| d.to_string()).collect()))
    .collect();
    assert_eq!(
        find_cycle(&graph),
        Some(vec![
            "api".into(),
            "source".into(),
            "config".into(),
            "api".into()
        ])
    );
    let mut acyclic = graph.clone();
    acyclic.insert("config".into(), BTreeSet::new());
    assert_eq!(find_cycle(&acyclic), None);
}
