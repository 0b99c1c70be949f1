//! JSON codec for [`Message`]: bytes in, a typed message or a typed error out; never panics.
//!
//! Errors name what is wrong precisely (the unknown `type`, the missing or invalid field with
//! its path such as `context.repo_url`) because they are reported back to operators verbatim
//! when an agent misbehaves.

use serde_json::Value;

use crate::Message;

/// The largest frame either side accepts. A LOG frame is capped well below this.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;

/// The largest `data` of one LOG frame; longer lines are split by the agent.
pub const MAX_LOG_DATA_BYTES: usize = 64 * 1024;

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("frame is not valid JSON: {detail}")]
    NotJson { detail: String },
    #[error("frame is not a valid protobuf Frame: {detail}")]
    NotProtobuf { detail: String },
    #[error("frame is not a JSON object")]
    NotAnObject,
    #[error("frame has no `type` field (protobuf: no body)")]
    MissingType,
    #[error("frame field `type` must be a string")]
    TypeNotString,
    #[error("unknown frame type `{0}`")]
    UnknownType(String),
    #[error("{message_type} frame is missing field `{field}`")]
    MissingField {
        message_type: &'static str,
        field: String,
    },
    #[error("{message_type} frame has an invalid field `{field}`: {detail}")]
    InvalidField {
        message_type: &'static str,
        field: String,
        detail: String,
    },
}

const KNOWN_TYPES: [&str; 11] = [
    "HELLO",
    "BUILD",
    "MERGE",
    "LOG",
    "STATUS",
    "CANCEL",
    "ACK",
    "HEARTBEAT",
    "INTERRUPTION",
    "RESUME",
    "LOGS",
];

/// Decodes one frame.
pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            max: MAX_FRAME_BYTES,
        });
    }
    // The hot path: LOGS frames as agents write them (`type` first) parse straight into the
    // struct; anything else, or anything wrong with them, takes the path below, which names
    // precisely what is wrong.
    if bytes.starts_with(br#"{"type":"LOGS","#)
        && let Ok(frame) = serde_json::from_slice::<TaggedLogs>(bytes)
        && frame.kind == "LOGS"
    {
        return Ok(Message::Logs(crate::Logs {
            job_id: frame.job_id,
            seq: frame.seq,
            lines: frame.lines,
        }));
    }
    let value: Value = serde_json::from_slice(bytes).map_err(|error| DecodeError::NotJson {
        detail: error.to_string(),
    })?;
    let object = value.as_object().ok_or(DecodeError::NotAnObject)?;
    let type_value = object.get("type").ok_or(DecodeError::MissingType)?;
    let type_name = type_value.as_str().ok_or(DecodeError::TypeNotString)?;
    let message_type = KNOWN_TYPES
        .iter()
        .copied()
        .find(|known| *known == type_name)
        .ok_or_else(|| DecodeError::UnknownType(truncate(type_name, 64)))?;

    // Deserialize the variant's struct directly (not the tagged enum, which buffers its
    // content and loses field paths), so errors name `context.repo_url`, not `repo_url`.
    match message_type {
        "HELLO" => typed(message_type, value).map(Message::Hello),
        "BUILD" => typed(message_type, value).map(Message::Build),
        "MERGE" => typed(message_type, value).map(Message::Merge),
        "LOG" => typed(message_type, value).map(Message::Log),
        "STATUS" => typed(message_type, value).map(Message::Status),
        "CANCEL" => typed(message_type, value).map(Message::Cancel),
        "ACK" => typed(message_type, value).map(Message::Ack),
        "INTERRUPTION" => typed(message_type, value).map(Message::Interruption),
        "RESUME" => typed(message_type, value).map(Message::Resume),
        "LOGS" => typed(message_type, value).map(Message::Logs),
        _ => typed(message_type, value).map(Message::Heartbeat),
    }
}

/// A `LOGS` frame with its tag, for the direct parse.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TaggedLogs {
    #[serde(rename = "type")]
    kind: String,
    job_id: String,
    seq: u64,
    lines: Vec<crate::LogLine>,
}

fn typed<T: serde::de::DeserializeOwned>(
    message_type: &'static str,
    value: Value,
) -> Result<T, DecodeError> {
    serde_path_to_error::deserialize::<_, T>(value).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner().to_string();
        field_error(message_type, &path, &inner)
    })
}

/// Encodes one frame as JSON text.
pub fn encode(message: &Message) -> String {
    // Serializing these types cannot fail: every map key is a string and no custom
    // serializer returns an error. Fall back to an empty object rather than panic.
    serde_json::to_string(message).unwrap_or_else(|_| String::from("{}"))
}

fn field_error(message_type: &'static str, path: &str, detail: &str) -> DecodeError {
    // serde reports a missing field as "missing field `name`" at the path of the struct
    // that lacks it; join the two so the error names the full path.
    if let Some(rest) = detail.strip_prefix("missing field `") {
        let name = rest.split('`').next().unwrap_or(rest);
        let field = if path == "." || path.is_empty() {
            name.to_string()
        } else {
            format!("{path}.{name}")
        };
        return DecodeError::MissingField {
            message_type,
            field,
        };
    }
    let field = if path == "." || path.is_empty() {
        "(frame)".to_string()
    } else {
        path.to_string()
    };
    DecodeError::InvalidField {
        message_type,
        field,
        detail: truncate(detail, 200),
    }
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_type_is_named() {
        let error = decode(br#"{"type":"DEPLOY","image":"x"}"#).unwrap_err();
        assert_eq!(error, DecodeError::UnknownType("DEPLOY".into()));
    }

    #[test]
    fn missing_nested_field_names_its_path() {
        let frame = br#"{"type":"BUILD","job_id":"j","context":{"commit_hash":"a","branch":"b"},
            "build_config":{"context_path":".","dockerfile":"D","target_image":"t","platform":"linux/amd64"}}"#;
        let error = decode(frame).unwrap_err();
        assert_eq!(
            error,
            DecodeError::MissingField {
                message_type: "BUILD",
                field: "context.repo_url".into()
            }
        );
        assert_eq!(
            error.to_string(),
            "BUILD frame is missing field `context.repo_url`"
        );
    }

    #[test]
    fn missing_top_level_field_is_named() {
        let error = decode(br#"{"type":"LOG","stream":"stdout","data":"x"}"#).unwrap_err();
        assert_eq!(
            error,
            DecodeError::MissingField {
                message_type: "LOG",
                field: "job_id".into()
            }
        );
    }

    #[test]
    fn invalid_field_is_named() {
        let error =
            decode(br#"{"type":"LOG","job_id":"j","stream":"video","data":"x"}"#).unwrap_err();
        match error {
            DecodeError::InvalidField {
                message_type,
                field,
                ..
            } => {
                assert_eq!(message_type, "LOG");
                assert_eq!(field, "stream");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn garbage_is_not_json() {
        assert!(matches!(
            decode(b"\xff\x00garbage"),
            Err(DecodeError::NotJson { .. })
        ));
        assert_eq!(decode(b"[1,2]"), Err(DecodeError::NotAnObject));
        assert_eq!(decode(b"{}"), Err(DecodeError::MissingType));
        assert_eq!(decode(br#"{"type":5}"#), Err(DecodeError::TypeNotString));
    }

    #[test]
    fn oversized_frame_is_refused_before_parsing() {
        let big = vec![b' '; MAX_FRAME_BYTES + 1];
        assert!(matches!(decode(&big), Err(DecodeError::TooLarge { .. })));
    }

    #[test]
    fn unknown_type_names_are_truncated() {
        let long = format!(r#"{{"type":"{}"}}"#, "X".repeat(10_000));
        match decode(long.as_bytes()).unwrap_err() {
            DecodeError::UnknownType(name) => assert!(name.len() < 100),
            other => panic!("unexpected {other:?}"),
        }
    }
}
