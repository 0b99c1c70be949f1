//! Which `repo_url`s the core accepts, decided before anything runs git.
//!
//! Accepted: `https://host/path`, `ssh://[user@]host/path`, `git://host/path` and the scp-like
//! `[user@]host:path` that git treats as ssh. Local paths and `file://` URLs only when the
//! operator allows local repositories (`allow_local_repos`): on a shared core they would let
//! any API caller build, and so publish, whatever the core's host can read. Refused always:
//! git's `<transport>::<address>` syntax (`ext::` runs a command, `fd::` reads a descriptor),
//! plain `http://` (a clone token would cross the network in clear), credentials embedded in
//! the URL (they would be stored and shown), query strings and fragments (`?access_token=`).
//! git itself is also limited to these transports through `GIT_ALLOW_PROTOCOL`.

/// Where a repository is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoLocation {
    /// Reached over https, ssh or git.
    Remote,
    /// A path on the core's machine (or `file://`).
    Local,
}

/// Why a `repo_url` is refused. The message never repeats the URL: it may hold a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RepoUrlError {
    #[error("must not be empty")]
    Empty,
    #[error("is longer than {MAX_REPO_URL_BYTES} bytes")]
    TooLong,
    #[error("must not contain control characters, spaces or start with `-`")]
    BadCharacters,
    #[error(
        "uses git's `<transport>::<address>` syntax, which is refused (it can run commands or read the core's descriptors); use https://, ssh:// or git://"
    )]
    TransportSyntax,
    #[error("scheme `{0}` is not accepted; use https://, ssh:// or git://")]
    Scheme(String),
    #[error("plain http:// is refused (a clone token would travel in clear); use https://")]
    PlainHttp,
    #[error(
        "must not embed credentials (user:token@host); the agent receives clone credentials separately (clone_token)"
    )]
    Credentials,
    #[error(
        "must not carry a query or fragment (`?…`, `#…`); credentials such as access_token go in clone_token"
    )]
    Query,
    #[error("names no host")]
    NoHost,
    #[error(
        "is a path on the core's machine; local repositories are refused unless the operator sets allow_local_repos"
    )]
    LocalNotAllowed,
    #[error("a local repository must be an absolute path or a file:// URL")]
    RelativePath,
}

/// Longest `repo_url` accepted.
pub const MAX_REPO_URL_BYTES: usize = 2048;

/// Classifies `url`, refusing what the core must never hand to git.
pub fn check(url: &str, allow_local_repos: bool) -> Result<RepoLocation, RepoUrlError> {
    if url.trim().is_empty() {
        return Err(RepoUrlError::Empty);
    }
    if url.len() > MAX_REPO_URL_BYTES {
        return Err(RepoUrlError::TooLong);
    }
    if url.starts_with('-') || url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(RepoUrlError::BadCharacters);
    }
    if let Some((scheme, rest)) = url.split_once("://")
        && is_scheme(scheme)
    {
        return match scheme.to_ascii_lowercase().as_str() {
            "https" | "ssh" | "git" | "git+ssh" | "ssh+git" => {
                check_remote(scheme, rest)?;
                Ok(RepoLocation::Remote)
            }
            "file" => local(allow_local_repos),
            "http" => Err(RepoUrlError::PlainHttp),
            other => Err(RepoUrlError::Scheme(other.to_string())),
        };
    }
    if url.contains("::") {
        return Err(RepoUrlError::TransportSyntax);
    }
    if url.starts_with('/') {
        return local(allow_local_repos);
    }
    // git's rule: a colon before any slash makes `[user@]host:path` (ssh).
    match url.split_once(':') {
        Some((authority, path)) if !authority.contains('/') => {
            let (user, host) = match authority.rsplit_once('@') {
                Some((user, host)) => (Some(user), host),
                None => (None, authority),
            };
            if host.is_empty() || path.is_empty() {
                return Err(RepoUrlError::NoHost);
            }
            // `user:password@host:path` parses as host `user` with a path holding `@`.
            if user.is_some_and(|user| user.contains(':'))
                || path
                    .split('/')
                    .next()
                    .is_some_and(|first| first.contains('@'))
            {
                return Err(RepoUrlError::Credentials);
            }
            if path.contains(['?', '#']) {
                return Err(RepoUrlError::Query);
            }
            if !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '[' | ']'))
            {
                return Err(RepoUrlError::NoHost);
            }
            Ok(RepoLocation::Remote)
        }
        _ => {
            if allow_local_repos {
                Err(RepoUrlError::RelativePath)
            } else {
                Err(RepoUrlError::LocalNotAllowed)
            }
        }
    }
}

fn local(allow_local_repos: bool) -> Result<RepoLocation, RepoUrlError> {
    if allow_local_repos {
        Ok(RepoLocation::Local)
    } else {
        Err(RepoUrlError::LocalNotAllowed)
    }
}

fn is_scheme(text: &str) -> bool {
    text.starts_with(|c: char| c.is_ascii_alphabetic())
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

fn check_remote(scheme: &str, rest: &str) -> Result<(), RepoUrlError> {
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    if let Some((user, _)) = authority.rsplit_once('@') {
        // ssh names a login user (`git@host`); a password, or any userinfo on https/git, is
        // a credential.
        let ssh = scheme.contains("ssh");
        if !ssh || user.contains(':') {
            return Err(RepoUrlError::Credentials);
        }
    }
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    if host.is_empty() || host.starts_with(':') {
        return Err(RepoUrlError::NoHost);
    }
    if path.contains(['?', '#']) || authority.contains(['?', '#']) {
        return Err(RepoUrlError::Query);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_forms_are_accepted() {
        for url in [
            "https://github.com/user/repo.git",
            "https://git.example.com:8443/a/b",
            "ssh://git@github.com/user/repo.git",
            "git://192.0.2.10/repo.git",
            "git@github.com:user/repo.git",
            "github.com:user/repo.git",
        ] {
            assert_eq!(check(url, false), Ok(RepoLocation::Remote), "{url}");
        }
    }

    #[test]
    fn local_forms_need_the_operator() {
        for url in ["/srv/repos/app", "file:///srv/repos/app"] {
            assert_eq!(
                check(url, false),
                Err(RepoUrlError::LocalNotAllowed),
                "{url}"
            );
            assert_eq!(check(url, true), Ok(RepoLocation::Local), "{url}");
        }
        assert_eq!(check("repo", false), Err(RepoUrlError::LocalNotAllowed));
        assert_eq!(check("./repo", true), Err(RepoUrlError::RelativePath));
    }

    #[test]
    fn hostile_forms_are_refused_precisely() {
        assert_eq!(check("fd::0", true), Err(RepoUrlError::TransportSyntax));
        assert_eq!(
            check("ext::sh -c id", true),
            Err(RepoUrlError::BadCharacters)
        );
        assert_eq!(check("ext::sh", true), Err(RepoUrlError::TransportSyntax));
        assert_eq!(
            check("http://example.com/r.git", true),
            Err(RepoUrlError::PlainHttp)
        );
        assert_eq!(
            check("ftp://example.com/r.git", true),
            Err(RepoUrlError::Scheme("ftp".into()))
        );
        assert_eq!(
            check("https://u:p@example.com/r.git", true),
            Err(RepoUrlError::Credentials)
        );
        assert_eq!(
            check("https://token@example.com/r.git", true),
            Err(RepoUrlError::Credentials)
        );
        assert_eq!(
            check("ssh://git:pw@example.com/r.git", true),
            Err(RepoUrlError::Credentials)
        );
        assert_eq!(check("u:p@host:x", true), Err(RepoUrlError::Credentials));
        assert_eq!(
            check("https://example.com/r.git?access_token=abc", true),
            Err(RepoUrlError::Query)
        );
        assert_eq!(
            check("--upload-pack=touch /tmp/x", true),
            Err(RepoUrlError::BadCharacters)
        );
        assert_eq!(check("https://", true), Err(RepoUrlError::NoHost));
    }

    #[test]
    fn errors_never_repeat_the_url() {
        let error = check("https://u:supersecret@example.com/r.git", true)
            .unwrap_err()
            .to_string();
        assert!(!error.contains("supersecret"), "{error}");
    }
}
