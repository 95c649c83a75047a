//! Text from peers, artifacts and hooks made safe to show: a control character (a newline, ESC,
//! a C1 code) is shown escaped, so a hostile message cannot fake a line or rewrite a terminal.
use std::borrow::Cow;

/// A character that must not reach a terminal as it is: a control character, or an invisible
/// format character that reorders or breaks lines (bidi overrides and isolates, zero-width
/// characters, line and paragraph separators, the BOM).
fn unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}')
}

/// An error and its causes, "a: b: c" (a transport error's own text rarely says why).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        // An error that prints its source already (`"...: {source}"`) is not said twice.
        let said = c.to_string();
        if !text.ends_with(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        cause = c.source();
    }
    text
}

/// `s` with every unsafe character escaped (`\n`, `\u{1b}`, `\u{202e}`, …).
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(unsafe_char) {
        return Cow::Borrowed(s);
    }
    Cow::Owned(s.chars().map(|c| if unsafe_char(c) { c.escape_default().to_string() } else { c.to_string() }).collect())
}

/// Like [`printable`], but keeps line breaks: for text of several lines the program itself made.
pub fn printable_lines(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| unsafe_char(c) && c != '\n') {
        return Cow::Borrowed(s);
    }
    Cow::Owned(s.split('\n').map(|l| printable(l).into_owned()).collect::<Vec<_>>().join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrapped(std::io::Error, bool);
    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            if self.1 { write!(f, "cannot read x: {}", self.0) } else { write!(f, "cannot read x") }
        }
    }
    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_cause_is_said_once() {
        let gone = || std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        assert_eq!(error_chain(&Wrapped(gone(), true)), "cannot read x: no such file");
        assert_eq!(error_chain(&Wrapped(gone(), false)), "cannot read x: no such file");
    }

    #[test]
    fn control_characters_are_shown_escaped() {
        assert_eq!(printable("activated (1 -> 2)"), "activated (1 -> 2)");
        assert_eq!(printable("x\n  web-1: activated OK"), "x\\n  web-1: activated OK");
        assert_eq!(printable("ok \u{202e}kcatta"), "ok \\u{202e}kcatta");
        assert_eq!(printable("\u{1b}[2K\u{1b}[1Aok"), "\\u{1b}[2K\\u{1b}[1Aok");
        assert_eq!(printable("c1 \u{9b}"), "c1 \\u{9b}");
        assert_eq!(printable_lines("a\nb\u{1b}"), "a\nb\\u{1b}");
        assert_eq!(printable("é ✓"), "é ✓");
    }
}
