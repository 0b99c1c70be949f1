//! What of an agent's output is stored: the per-job log budget (lines past the cap are
//! counted and summarised once), the longest stored line, and agent error text tidied.

/// Most of an agent's `STATUS.error` kept.
pub const MAX_AGENT_ERROR_BYTES: usize = 4096;

/// An agent's `STATUS.error` as stored: control characters (escape sequences, carriage
/// returns; all but newline and tab) dropped, and when longer than
/// [`MAX_AGENT_ERROR_BYTES`] its first and last lines only (like git's errors: the first says
/// what was tried, the last what finally failed), each cut to fit, with the count of what
/// was left out between them.
pub fn tidy_agent_error(text: &str) -> String {
    let clean: String = text
        .chars()
        .filter(|c| {
            *c == '\n' || *c == '\t' || !(c.is_control() || ('\u{80}'..='\u{9f}').contains(c))
        })
        .collect();
    let clean = clean.trim();
    if clean.len() <= MAX_AGENT_ERROR_BYTES {
        return clean.to_string();
    }
    let half = MAX_AGENT_ERROR_BYTES / 2 - 64;
    let first = clean.lines().next().unwrap_or("");
    let last = clean.lines().next_back().unwrap_or("");
    let head = &first[..floor_char_boundary(first, half)];
    let tail = &last[last.len() - floor_char_boundary_from_end(last, half)..];
    let dropped = clean.len() - head.len() - tail.len();
    format!("{head}\n[stagely: {dropped} bytes of the error left out]\n{tail}")
}

pub(super) fn floor_char_boundary(text: &str, at: usize) -> usize {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// The length of the longest suffix of `text` of at most `len` bytes.
pub(super) fn floor_char_boundary_from_end(text: &str, len: usize) -> usize {
    let mut start = text.len().saturating_sub(len);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text.len() - start
}

/// Longest line the core stores; longer ones are cut (agents split lines into pieces of at
/// most this, flagged `continued`, so only a misbehaving agent reaches this).
pub const MAX_STORED_LINE_BYTES: usize = stagely_protocol::MAX_LOG_DATA_BYTES;

/// The core's own bounds on one job's log: lines cut at [`MAX_STORED_LINE_BYTES`], and at most
/// `max_bytes` stored; past that, one marker line and the rest is counted, not stored. The
/// build goes on either way.
#[derive(Debug)]
pub struct LogBudget {
    max_bytes: u64,
    stored_bytes: u64,
    dropped_bytes: u64,
    dropped_lines: u64,
}

impl LogBudget {
    pub fn new(max_bytes: u64) -> LogBudget {
        LogBudget::resumed(max_bytes, 0)
    }

    /// A budget of which `stored_bytes` are already spent (an adopted attempt's job).
    pub fn resumed(max_bytes: u64, stored_bytes: u64) -> LogBudget {
        LogBudget {
            max_bytes,
            stored_bytes,
            dropped_bytes: 0,
            dropped_lines: 0,
        }
    }

    /// The text to store for this line, if any: cut when too long; the first line past the
    /// cap becomes the marker.
    pub fn admit(&mut self, mut line: String) -> Option<String> {
        if self.dropped_lines > 0 {
            self.dropped_lines += 1;
            self.dropped_bytes += line.len() as u64;
            return None;
        }
        if line.len() > MAX_STORED_LINE_BYTES {
            let over = line.len() - MAX_STORED_LINE_BYTES;
            line.truncate(line.floor_char_boundary(MAX_STORED_LINE_BYTES));
            line.push_str(&format!(
                " [stagely: line cut, {over} more bytes dropped]\n"
            ));
        }
        if self.stored_bytes + line.len() as u64 > self.max_bytes {
            self.dropped_lines = 1;
            self.dropped_bytes = line.len() as u64;
            return Some(format!(
                "[stagely] this job's log reached its limit of {} bytes; further output is not stored (the build goes on)\n",
                self.max_bytes
            ));
        }
        self.stored_bytes += line.len() as u64;
        Some(line)
    }

    /// The closing line when output was dropped.
    pub fn summary(&self) -> Option<String> {
        (self.dropped_lines > 0).then(|| {
            format!(
                "[stagely] {} bytes in {} lines of output were dropped after the log limit of {} bytes\n",
                self.dropped_bytes, self.dropped_lines, self.max_bytes
            )
        })
    }
}
