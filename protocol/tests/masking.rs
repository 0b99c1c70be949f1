//! Secrets are masked in every form a build prints them: verbatim, line by line (PEM),
//! base64 (standard, URL-safe, alone or inside a longer encoded string), URL-encoded.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use stagely_protocol::SecretMask;

const SECRET: &str = "p@ss w/rd+Zq9~x&y=1";

fn masked(mask: &SecretMask, text: &str) -> String {
    mask.mask(text.to_string())
}

#[test]
fn every_printed_form_of_a_secret_is_masked() {
    let mask = SecretMask::new([SECRET]);
    let forms = [
        SECRET.to_string(),
        STANDARD.encode(SECRET),
        URL_SAFE_NO_PAD.encode(SECRET),
        // Inside longer encodings, at each byte offset (an auth header's user:password).
        STANDARD.encode(format!("user:{SECRET}")),
        STANDARD.encode(format!("ab:{SECRET}:cd")),
        STANDARD.encode(format!("x{SECRET}")),
        // URL-encoded, upper and lower hex, `+` for spaces.
        "p%40ss%20w%2Frd%2BZq9~x%26y%3D1".to_string(),
        "p%40ss+w%2Frd%2BZq9~x%26y%3D1".to_string(),
        "p%40ss%20w%2frd%2bZq9~x%26y%3d1".to_string(),
    ];
    for form in forms {
        let line = format!("token=[{form}] end\n");
        let out = masked(&mask, &line);
        assert!(out.contains(SecretMask::MASK), "{form} not masked: {out}");
        assert!(out.ends_with("] end\n"), "{out}");
        // The middle of the form (always the secret's own bytes) is gone.
        let third = form.len() / 3;
        let middle = &form[third..2 * third];
        assert!(!out.contains(middle), "{form}: {out}");
    }
}

#[test]
fn a_multi_line_secret_is_masked_line_by_line() {
    let pem = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj\n-----END PRIVATE KEY-----\n";
    let mask = SecretMask::new([pem]);
    for line in pem.lines() {
        let out = masked(&mask, &format!("{line}\n"));
        assert_eq!(out, format!("{}\n", SecretMask::MASK), "{line}");
    }
}

#[test]
fn ordinary_text_and_short_values_are_left_alone() {
    let mask = SecretMask::new(["abc", SECRET]);
    let text = "Step 3/4: COPY abc /abc\n".to_string();
    assert_eq!(
        mask.mask(text.clone()),
        text,
        "a 3-byte value is not masked"
    );
    assert!(mask.longest() >= SECRET.len());
    let none = SecretMask::new([]);
    assert_eq!(none.mask(text.clone()), text);
    assert!(none.find(&text).is_empty());
}
