//! Generates the protobuf types of `proto/stagely.proto` with `prost`, the `.proto` parsed by
//! `protox` (pure Rust: no system `protoc` needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/stagely.proto");
    let descriptors = protox::compile(["proto/stagely.proto"], ["proto"])?;
    let mut config = prost_build::Config::new();
    // Deterministic bytes: maps encode in key order.
    config.btree_map(["."]);
    config.compile_fds(descriptors)?;
    Ok(())
}
