//! Build output on an operator's terminal. Stored lines are what a build printed, and a build
//! is untrusted: raw, its escape sequences could set the clipboard (OSC 52), plant links
//! (OSC 8), clear the screen, or move the cursor up and overwrite a line to fake a result.
//! On a terminal the CLI therefore shows every C0 control but tab and newline, DEL and every C1
//! control as visible text (`\x1b`, `^M`, `\u{9b}`), and lets through only plain SGR colour
//! sequences, which it re-emits itself (numbers only, reset at the end of the line). `--raw`
//! (and any output that is not a terminal) gets the stored bytes unchanged.

use std::borrow::Cow;
use std::io::IsTerminal;

/// How lines are written to one output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Screen {
    /// A terminal: controls shown escaped, colours re-emitted.
    Terminal,
    /// A pipe or file, or `--raw`: the stored bytes as they are.
    Raw,
}

impl Screen {
    /// For standard output: escaped when it is a terminal, unless `raw`.
    pub fn stdout(raw: bool) -> Screen {
        Screen::pick(raw, std::io::stdout().is_terminal())
    }

    /// For standard error: escaped when it is a terminal, unless `raw`.
    pub fn stderr(raw: bool) -> Screen {
        Screen::pick(raw, std::io::stderr().is_terminal())
    }

    fn pick(raw: bool, terminal: bool) -> Screen {
        if terminal && !raw {
            Screen::Terminal
        } else {
            Screen::Raw
        }
    }

    /// `text` as it may be written to this screen.
    pub fn show<'a>(&self, text: &'a str) -> Cow<'a, str> {
        match self {
            Screen::Raw => Cow::Borrowed(text),
            Screen::Terminal => escape(text),
        }
    }
}

/// Longest SGR parameter list re-emitted (`38;2;255;255;255` and a few more).
const MAX_SGR_PARAMS: usize = 32;

/// `text` safe for a terminal (see the module doc); borrowed when nothing needed escaping.
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_care) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    let mut coloured = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if c == '\x1b'
            && let Some((params, after)) = plain_sgr(rest)
        {
            out.push_str("\x1b[");
            out.push_str(params);
            out.push('m');
            // `ESC[m` and `ESC[0m` reset; anything else leaves a colour to close.
            coloured = !(params.is_empty() || params == "0");
            rest = after;
            continue;
        }
        rest = &rest[c.len_utf8()..];
        match c {
            '\n' if coloured => {
                // Colours end with their line.
                out.push_str("\x1b[0m\n");
                coloured = false;
            }
            '\n' | '\t' => out.push(c),
            '\x1b' => out.push_str("\\x1b"),
            '\x7f' => out.push_str("^?"),
            c if (c as u32) < 0x20 => {
                out.push('^');
                out.push(char::from(b'@' + c as u8));
            }
            c if (0x80..0xa0).contains(&(c as u32)) => {
                out.push_str(&format!("\\u{{{:x}}}", c as u32));
            }
            c => out.push(c),
        }
    }
    if coloured {
        out.push_str("\x1b[0m");
    }
    Cow::Owned(out)
}

fn needs_care(c: char) -> bool {
    let code = c as u32;
    (code < 0x20 && c != '\n' && c != '\t') || code == 0x7f || (0x80..0xa0).contains(&code)
}

/// `ESC [ n ; n ... m` at the start of `text` with numbers only (each at most 255): its
/// parameters and what follows.
fn plain_sgr(text: &str) -> Option<(&str, &str)> {
    let body = text.strip_prefix("\x1b[")?;
    let end = body
        .char_indices()
        .take(MAX_SGR_PARAMS + 1)
        .find(|(_, c)| !(c.is_ascii_digit() || *c == ';'))
        .map(|(at, _)| at)?;
    if !body[end..].starts_with('m') {
        return None;
    }
    let params = &body[..end];
    let numbers_fit = params
        .split(';')
        .all(|n| n.is_empty() || (n.len() <= 3 && n.parse::<u16>().is_ok_and(|v| v <= 255)));
    numbers_fit.then(|| (params, &body[end + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_untouched_and_borrowed() {
        let text = "Step 1/3 : FROM scratch\n\tindented ünïcode\n";
        assert!(matches!(escape(text), Cow::Borrowed(_)));
        assert_eq!(Screen::Raw.show("\x1b]52;c;aGk=\x07"), "\x1b]52;c;aGk=\x07");
    }

    #[test]
    fn hostile_sequences_are_shown_not_obeyed() {
        let cases = [
            // OSC 52: set the clipboard.
            (
                "\x1b]52;c;Y3VybCBldmlsfHNo\x07",
                "\\x1b]52;c;Y3VybCBldmlsfHNo^G",
            ),
            // OSC 8: a hyperlink.
            (
                "\x1b]8;;https://evil.example\x1b\\click\x1b]8;;\x1b\\",
                "\\x1b]8;;https://evil.example\\x1b\\click\\x1b]8;;\\x1b\\",
            ),
            // Clear the screen.
            ("\x1b[2J\x1b[H", "\\x1b[2J\\x1b[H"),
            // Cursor up and erase the line, to fake a result.
            (
                "\x1b[1A\x1b[2KSuccessfully tagged x\n",
                "\\x1b[1A\\x1b[2KSuccessfully tagged x\n",
            ),
            // A carriage return overwriting the line.
            (
                "error: failed\rok          \n",
                "error: failed^Mok          \n",
            ),
            // DEL, a C1 CSI (U+009B), backspace.
            ("a\x7fb\u{9b}2Jc\x08", "a^?b\\u{9b}2Jc^H"),
        ];
        for (hostile, shown) in cases {
            assert_eq!(escape(hostile), shown, "{hostile:?}");
        }
    }

    #[test]
    fn plain_colours_are_re_emitted_and_reset_at_the_line_end() {
        assert_eq!(
            escape("\x1b[1;31merror\x1b[0m: x\n"),
            "\x1b[1;31merror\x1b[0m: x\n"
        );
        // A colour left open is closed at the newline.
        assert_eq!(escape("\x1b[32mgreen\nnext"), "\x1b[32mgreen\x1b[0m\nnext");
        assert_eq!(
            escape("\x1b[38;2;255;0;0mred"),
            "\x1b[38;2;255;0;0mred\x1b[0m"
        );
        // Not plain SGR: private modes, huge numbers, overlong lists are escaped.
        assert_eq!(escape("\x1b[?25l"), "\\x1b[?25l");
        assert_eq!(escape("\x1b[99999m"), "\\x1b[99999m");
        let long = format!("\x1b[{}m", "1;".repeat(40));
        assert!(escape(&long).starts_with("\\x1b["));
    }

    #[test]
    fn raw_or_a_pipe_keeps_the_bytes_a_terminal_gets_them_escaped() {
        assert_eq!(Screen::pick(true, true), Screen::Raw);
        assert_eq!(Screen::pick(false, false), Screen::Raw);
        assert_eq!(Screen::pick(false, true), Screen::Terminal);
    }
}
