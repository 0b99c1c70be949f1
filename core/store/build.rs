//! Rebuilds the crate when a migration is added or changed: `sqlx::migrate!` embeds the
//! migrations at compile time, and without this a new file alone left a stale binary.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
