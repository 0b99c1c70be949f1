//! Conformance vectors: the design seed's JSON examples, verbatim, plus one vector per frame
//! this project adds. Every vector must decode and re-encode to the same JSON value, so no
//! seed field is ever renamed or dropped.

use std::path::Path;

use stagely_protocol::{Message, decode, encode};

fn vectors() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) == Some("json") {
            out.push((
                path.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&path).unwrap(),
            ));
        }
    }
    out.sort();
    assert!(out.len() >= 13, "vectors missing: {}", out.len());
    out
}

#[test]
fn every_vector_round_trips_to_the_same_json() {
    for (name, bytes) in vectors() {
        let message = decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        let original: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let reencoded: serde_json::Value = serde_json::from_str(&encode(&message)).unwrap();
        assert_eq!(original, reencoded, "{name} changed on round trip");
        // And decoding our own encoding gives the same message.
        assert_eq!(
            decode(encode(&message).as_bytes()).unwrap(),
            message,
            "{name}"
        );
    }
}

#[test]
fn seed_vectors_decode_to_the_expected_fields() {
    let build = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/vectors/seed_build.json"
    ))
    .unwrap();
    let Message::Build(build) = decode(&build).unwrap() else {
        panic!("not BUILD")
    };
    assert_eq!(build.job_id, "job_build_xk82");
    assert_eq!(build.context.clone_token.as_deref(), Some("github_pat_..."));
    assert_eq!(build.build_config.build_args["NODE_ENV"], "staging");
    assert_eq!(
        build.build_config.cache_to.as_deref(),
        Some("registry.internal/proj-123/cache:backend")
    );
    assert_eq!(build.registry_auth.as_ref().unwrap().username, "stagely");

    let status = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/vectors/seed_status.json"
    ))
    .unwrap();
    let Message::Status(status) = decode(&status).unwrap() else {
        panic!("not STATUS")
    };
    assert_eq!(status.exit_code, Some(0));
    assert_eq!(status.state, stagely_protocol::JobState::Completed);
}

#[test]
fn every_truncation_of_every_vector_is_a_typed_error_not_a_panic() {
    for (name, bytes) in vectors() {
        for cut in 0..bytes.len() {
            let _ = decode(&bytes[..cut]);
        }
        // Removing any one top-level field other than optional additions names that field.
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let object = value.as_object().unwrap();
        for key in object.keys() {
            let mut smaller = object.clone();
            smaller.remove(key);
            let text = serde_json::to_vec(&smaller).unwrap();
            if let Err(error) = decode(&text) {
                let shown = error.to_string();
                assert!(
                    shown.contains(key.as_str()) || key == "type",
                    "{name}: removing `{key}` gave an error not naming it: {shown}"
                );
            }
        }
    }
}

#[test]
fn registry_password_is_redacted_from_debug_output() {
    let build = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/vectors/seed_build.json"
    ))
    .unwrap();
    let message = decode(&build).unwrap();
    let shown = format!("{message:?}");
    assert!(!shown.contains("reg_token_"), "{shown}");
}

#[test]
fn debug_output_never_shows_secret_build_args_or_clone_tokens() {
    let bytes = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/build_secrets.json"),
    )
    .unwrap();
    let Message::Build(mut build) = decode(&bytes).unwrap() else {
        panic!("expected BUILD")
    };
    build.context.clone_token = Some("ghp_clone_token_value".into());
    let shown = format!("{build:?}");
    assert!(shown.contains("NPM_TOKEN"), "{shown}");
    assert!(!shown.contains("npm_secret_value"), "{shown}");
    assert!(!shown.contains("ghp_clone_token_value"), "{shown}");
}

#[test]
fn every_vector_round_trips_through_protobuf_to_the_same_message() {
    use stagely_protocol::{decode_proto, encode_proto};
    for (name, bytes) in vectors() {
        let message = decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        let binary = encode_proto(&message);
        assert_eq!(
            decode_proto(&binary).unwrap_or_else(|e| panic!("{name}: {e}")),
            message,
            "{name}: protobuf changed the message"
        );
        // Every truncation is a typed error or a (shorter) message, never a panic.
        for end in 0..binary.len() {
            let _ = decode_proto(&binary[..end]);
        }
    }
}
