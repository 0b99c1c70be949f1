//! Names in the registry: where a job's image and its layer cache go, and how digests and
//! references are spelled. Plain functions, no I/O.

use sha2::{Digest, Sha256};

/// A short, stable identity of a repository for registry paths: the first 16 hex digits of
/// the SHA-256 of its URL, with the spellings git treats as one repository (a trailing `/`
/// or `.git`, the host's case) made equal.
pub fn repository_key(repo_url: &str) -> String {
    let trimmed = repo_url.trim().trim_end_matches('/');
    let trimmed = trimmed.strip_suffix(".git").unwrap_or(trimmed);
    let normalized = match trimmed.split_once("://") {
        Some((scheme, rest)) => {
            let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
            format!(
                "{}://{}/{path}",
                scheme.to_ascii_lowercase(),
                host.to_ascii_lowercase()
            )
        }
        None => trimmed.to_string(),
    };
    let digest = Sha256::digest(normalized.as_bytes());
    hex::encode(&digest[..8])
}

/// Job or service name → image tag (`backend_amd64` → `backend-amd64`).
pub fn tag_for(name: &str) -> String {
    name.to_ascii_lowercase().replace('_', "-")
}

pub fn strip_tag(image: &str) -> &str {
    let name_start = image.rfind('/').map_or(0, |slash| slash + 1);
    match image[name_start..].find(':') {
        Some(colon) => &image[..name_start + colon],
        None => image,
    }
}

pub fn valid_digest(text: &str) -> bool {
    text.strip_prefix("sha256:")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_and_references() {
        assert_eq!(tag_for("backend_amd64"), "backend-amd64");
        assert_eq!(
            strip_tag("127.0.0.1:5000/stagely/env:api"),
            "127.0.0.1:5000/stagely/env"
        );
        assert!(valid_digest(&format!("sha256:{}", "0".repeat(64))));
        assert!(!valid_digest("sha256:abc"));
    }

    #[test]
    fn repositories_get_distinct_stable_cache_keys() {
        let a = repository_key("https://github.com/acme/api.git");
        assert_eq!(a.len(), 16);
        assert_eq!(a, repository_key("https://GitHub.com/acme/api/"));
        assert_eq!(a, repository_key("https://github.com/acme/api"));
        assert_ne!(a, repository_key("https://github.com/evil/api.git"));
        assert_ne!(a, repository_key("https://github.com/acme/API.git"));
    }
}
