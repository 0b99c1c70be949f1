//! What an agent's log lines never show: the job's secrets (masked as `[REDACTED]`, also
//! across the cut of a line longer than the reader's cap) and host paths (shown as an alias
//! such as `$WORK`). The connection applies it to every line before it is spooled or sent;
//! the job masks its own system lines with it.

use stagely_protocol::LogStream;

/// Replaces known secrets in output with `[REDACTED]`, and host paths with a short alias.
pub struct Redactor {
    secrets: stagely_protocol::SecretMask,
    /// (host path prefix, alias); longest first so a canonical path wins over its prefix.
    aliases: Vec<(String, String)>,
    /// The aliases alone, in the same order (what [`Redactor::paths`] replaces matches with).
    replacements: Vec<String>,
    /// One searcher over every alias path (built once; one pass per line, and most lines
    /// hold none). Leftmost-longest: a canonical path wins over its prefix.
    paths: Option<aho_corasick::AhoCorasick>,
}

impl Redactor {
    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a str>) -> Self {
        Redactor {
            secrets: stagely_protocol::SecretMask::new(secrets),
            aliases: Vec::new(),
            replacements: Vec::new(),
            paths: None,
        }
    }

    /// Shows `path` (as given and as resolved) as `alias` in every scrubbed line.
    pub fn with_path_alias(mut self, path: &std::path::Path, alias: &str) -> Self {
        let mut forms = vec![path.to_string_lossy().into_owned()];
        if let Ok(real) = path.canonicalize() {
            forms.push(real.to_string_lossy().into_owned());
        }
        for form in forms {
            let form = form.trim_end_matches('/').to_string();
            // `/` or a one-letter directory would rewrite ordinary text.
            if form.len() > 1 && !self.aliases.iter().any(|(known, _)| *known == form) {
                self.aliases.push((form, alias.to_string()));
            }
        }
        self.aliases
            .sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
        self.replacements = self
            .aliases
            .iter()
            .map(|(_, alias)| alias.clone())
            .collect();
        self.paths = aho_corasick::AhoCorasick::builder()
            .match_kind(aho_corasick::MatchKind::LeftmostLongest)
            .build(self.aliases.iter().map(|(path, _)| path))
            .ok();
        self
    }

    /// Where a piece cut mid-line may end so that no secret form straddles the end: the
    /// last `longest - 1` bytes are held back, unless a complete form covers that point
    /// (then it ends after it). Always on a character boundary.
    fn safe_end(&self, text: &str) -> usize {
        let hold = self.secrets.longest().saturating_sub(1);
        let mut end = text.len().saturating_sub(hold);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        for (start, stop) in self.secrets.find(text) {
            if start < end && stop > end {
                end = stop;
            }
        }
        end
    }

    /// Whether `bytes` hold nothing [`Redactor::scrub`] would rewrite: no secret form and no
    /// host path. Checked over many lines at once, it spares each line its own search.
    pub fn is_clean(&self, bytes: &[u8]) -> bool {
        !self.secrets.holds_any(bytes)
            && self
                .paths
                .as_ref()
                .is_none_or(|paths| !paths.is_match(bytes))
    }

    pub fn scrub(&self, text: &str) -> String {
        self.scrub_owned(text.to_string())
    }

    /// [`Redactor::scrub`] of a line the caller gives up (no copy when nothing matches).
    pub fn scrub_owned(&self, text: String) -> String {
        let mut out = self.secrets.mask(text);
        if let Some(paths) = &self.paths
            && paths.is_match(&out)
        {
            out = paths.replace_all(&out, &self.replacements);
        }
        out
    }
}

/// Masks secrets across the pieces of a line longer than the reader's cap: a piece cut
/// mid-line keeps back its last bytes (up to the longest secret form, and never inside a
/// complete one) and sends them with the next piece, so a secret straddling the cut is
/// whole in one of the two when masked.
#[derive(Default)]
pub(crate) struct LinePieces {
    held: Vec<(LogStream, String)>,
}

impl LinePieces {
    /// The masked text to send for this piece, and whether the line goes on after it
    /// (`None`: all of it is held back for now). `clean`: `text` was checked as read and holds
    /// nothing to mask (it still is when joined to bytes held back from an earlier piece).
    pub(crate) fn take(
        &mut self,
        redactor: &Redactor,
        stream: LogStream,
        text: String,
        clean: bool,
    ) -> Option<(String, bool)> {
        let (joined, clean) = match self.held.iter().position(|(s, _)| *s == stream) {
            Some(at) => {
                let (_, mut held) = self.held.swap_remove(at);
                held.push_str(&text);
                (held, false)
            }
            None => (text, clean),
        };
        let cut = !joined.ends_with('\n')
            && joined.len() >= crate::process::MAX_LINE_BYTES.saturating_sub(3);
        if !cut {
            if clean {
                return Some((joined, false));
            }
            return Some((redactor.scrub_owned(joined), false));
        }
        let keep = redactor.safe_end(&joined);
        let (send, hold) = joined.split_at(keep);
        if !hold.is_empty() {
            self.held.push((stream, hold.to_string()));
        }
        (!send.is_empty()).then(|| (redactor.scrub(send), true))
    }

    /// Everything held back, masked (the job ended).
    pub(crate) fn drain(&mut self, redactor: &Redactor) -> Vec<(LogStream, String)> {
        self.held
            .drain(..)
            .map(|(stream, text)| (stream, redactor.scrub_owned(text)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_straddling_the_cut_of_a_long_line_is_still_masked() {
        let secret = "hunter22-very-secret";
        let redactor = Redactor::new([secret]);
        let cap = crate::process::MAX_LINE_BYTES;
        for split in 1..secret.len() {
            let mut pieces = LinePieces::default();
            let first = format!("{}{}", "x".repeat(cap - split), &secret[..split]);
            let second = format!("{} tail\n", &secret[split..]);
            let mut sent = String::new();
            sent.extend(
                pieces
                    .take(&redactor, LogStream::Stdout, first, false)
                    .map(|(t, _)| t),
            );
            sent.extend(
                pieces
                    // Its bytes alone hold no secret, so the reader may call it clean; joined
                    // to the held-back end of the first piece it still is masked.
                    .take(&redactor, LogStream::Stdout, second, true)
                    .map(|(t, _)| t),
            );
            sent.extend(pieces.drain(&redactor).into_iter().map(|(_, t)| t));
            assert!(!sent.contains(secret), "split at {split}");
            assert!(sent.ends_with("[REDACTED] tail\n"), "split at {split}");
            assert_eq!(sent.len(), cap - split + "[REDACTED] tail\n".len());
        }
        // Another stream's lines pass in between untouched.
        let mut pieces = LinePieces::default();
        let first = format!("{}hunt", "y".repeat(cap - 4));
        assert!(
            pieces
                .take(&redactor, LogStream::Stdout, first, false)
                .is_some()
        );
        assert_eq!(
            pieces.take(&redactor, LogStream::Stderr, "other\n".into(), false),
            Some(("other\n".to_string(), false))
        );
        let (rest, continues) = pieces
            .take(
                &redactor,
                LogStream::Stdout,
                "er22-very-secret!\n".into(),
                true,
            )
            .unwrap();
        assert!(!continues);
        assert!(rest.ends_with("y[REDACTED]!\n"), "{rest}");
    }

    #[test]
    fn a_block_is_clean_only_when_no_secret_or_host_path_is_in_it() {
        let dir = tempfile::tempdir().unwrap();
        let redactor = Redactor::new(["hunter22"]).with_path_alias(dir.path(), "$WORK");
        assert!(redactor.is_clean(b"plain\nlines\n"));
        assert!(!redactor.is_clean(b"plain\nthe hunter22 line\n"));
        // Derived forms count too (base64 of the secret).
        assert!(!redactor.is_clean(b"aHVudGVyMjI=\n"));
        let path = format!("x\n{}/file\n", dir.path().display());
        assert!(!redactor.is_clean(path.as_bytes()));
        // A clean piece is passed on as it is, without a scan.
        let mut pieces = LinePieces::default();
        assert_eq!(
            pieces.take(&redactor, LogStream::Stdout, "ok\n".into(), true),
            Some(("ok\n".to_string(), false))
        );
    }

    #[test]
    fn secrets_are_scrubbed() {
        let redactor = Redactor::new(["hunter22", "x"]);
        assert_eq!(
            redactor.scrub("login with hunter22 failed x"),
            "login with [REDACTED] failed x"
        );
    }

    #[test]
    fn host_paths_are_shown_as_an_alias() {
        let redactor = Redactor::new([]).with_path_alias(
            std::path::Path::new("/tmp/stagely-core-x/instances/local-1/work"),
            "$WORK",
        );
        assert_eq!(
            redactor.scrub("step build: buildah --root /tmp/stagely-core-x/instances/local-1/work/buildah/storage bud /tmp/stagely-core-x/instances/local-1/work/src/api"),
            "step build: buildah --root $WORK/buildah/storage bud $WORK/src/api"
        );
        // Both forms of a path reached through a symlink, in one line; text without either
        // is the same string back.
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real-work");
        std::fs::create_dir(&real).unwrap();
        let link = dir.path().join("work");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let redactor = Redactor::new([]).with_path_alias(&link, "$WORK");
        let real = real.canonicalize().unwrap();
        assert_eq!(
            redactor.scrub(&format!(
                "cd {}/src && ls {}/src\n",
                link.display(),
                real.display()
            )),
            "cd $WORK/src && ls $WORK/src\n"
        );
        assert_eq!(redactor.scrub("no path here\n"), "no path here\n");
    }
}
