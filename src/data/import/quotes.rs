//! Quote checking of the CSV input. The `csv` crate is lenient where RFC 4180 is not: a quote
//! that opens a cell and never closes makes the rest of the file one cell (rows silently
//! swallowed), and a quoted cell whose closing quote is followed by more text is read on as
//! if nothing happened. [`QuoteTracker`] sits between the file and the parser, follows the
//! same quoting rules (a quote at the start of a cell opens it, `""` inside is a literal
//! quote, a quote elsewhere in an unquoted cell is literal) and records the first such
//! problem with the line and character of the quote that opened the cell, so that the
//! import can report it instead of reading past it.

use std::io::Read;
use std::path::Path;

use crate::Error;

/// Where the tracker is within the CSV grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a cell.
    StartField,
    /// Inside an unquoted cell.
    InField,
    /// Inside a quoted cell.
    InQuoted,
    /// Just after a quote inside a quoted cell: the closing quote, or the first of `""`.
    QuoteInQuoted,
    /// After a closing quote, only blanks up to the next comma or line end.
    AfterClose,
}

/// A quote that opened a cell: 1-based line, 1-based character on that line, 0-based cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Opening {
    /// Line of the quote.
    pub line: u64,
    /// Character of the quote on its line.
    pub col: u64,
    /// Cell index in its record.
    pub field: usize,
}

/// The first quoting problem found in the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum QuoteProblem {
    /// A quote opened a cell and the file ended before it closed.
    Unclosed {
        /// The opening quote.
        open: Opening,
        /// The last line of the file.
        last_line: u64,
    },
    /// A quoted cell closed and was followed by text other than a comma or the line end.
    TextAfterClose {
        /// The opening quote.
        open: Opening,
        /// Line of the closing quote.
        line: u64,
        /// Character of the closing quote on its line.
        col: u64,
        /// The character after it.
        next: char,
    },
}

impl QuoteProblem {
    /// The line of the quote that opened the offending cell.
    pub fn open_line(&self) -> u64 {
        match self {
            QuoteProblem::Unclosed { open, .. } | QuoteProblem::TextAfterClose { open, .. } => {
                open.line
            }
        }
    }

    /// The error naming `file`, the line, the column (from `headers` when the cell is within
    /// the header) and the character of the opening quote.
    pub fn to_error(&self, file: &Path, headers: &[String]) -> Error {
        let (open, what) = match self {
            QuoteProblem::Unclosed { open, last_line } => (
                open,
                if *last_line > open.line {
                    format!(
                        "a quote opens this cell and is never closed, so lines {}–{last_line} \
                         (the rest of the file) would be read as one cell",
                        open.line
                    )
                } else {
                    "a quote opens this cell and is never closed before the end of the file"
                        .to_string()
                },
            ),
            QuoteProblem::TextAfterClose {
                open,
                line,
                col,
                next,
            } => (
                open,
                format!(
                    "the quoted cell opened here closes at line {line}, character {col}, and is \
                     followed by {next:?} instead of a comma or the end of the line (an \
                     unbalanced quote?)"
                ),
            ),
        };
        let column = match headers.get(open.field) {
            Some(name) => format!("column `{name}`"),
            None => format!("field {}", open.field + 1),
        };
        Error::format(
            file,
            format!(
                "line {}, {column} (character {}): {what}; a literal quote inside a quoted cell \
                 is written as \"\"",
                open.line, open.col
            ),
        )
    }
}

/// A reader that passes the bytes of `inner` through unchanged and follows the CSV quoting
/// on the way (see the module documentation).
pub(crate) struct QuoteTracker<R> {
    inner: R,
    state: State,
    /// Current 1-based line.
    line: u64,
    /// Characters seen so far on the current line.
    col: u64,
    /// Cell index within the current record.
    field: usize,
    /// The quote that opened the current quoted cell.
    open: Option<Opening>,
    /// Line and character of the last closing quote.
    close: (u64, u64),
    /// Bytes of a leading UTF-8 byte-order mark still to skip (it is not a character).
    bom_left: usize,
    /// Whether the first bytes were examined for a byte-order mark.
    started: bool,
    /// The first problem found.
    problem: Option<QuoteProblem>,
    /// Whether the end of the input was reached.
    eof: bool,
}

impl<R: Read> QuoteTracker<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        QuoteTracker {
            inner,
            state: State::StartField,
            line: 1,
            col: 0,
            field: 0,
            open: None,
            close: (0, 0),
            bom_left: 0,
            started: false,
            problem: None,
            eof: false,
        }
    }

    /// The first quoting problem found so far.
    pub fn problem(&self) -> Option<&QuoteProblem> {
        self.problem.as_ref()
    }

    fn end_record(&mut self) {
        self.field = 0;
        self.state = State::StartField;
    }

    fn see(&mut self, b: u8) {
        if self.bom_left > 0 {
            self.bom_left -= 1;
            return;
        }
        if b == b'\n' {
            self.line += 1;
            self.col = 0;
        } else if b & 0xC0 != 0x80 {
            // A character starts here (not a UTF-8 continuation byte).
            self.col += 1;
        }
        match self.state {
            State::StartField => match b {
                b'"' => {
                    self.open = Some(Opening {
                        line: self.line,
                        col: self.col,
                        field: self.field,
                    });
                    self.state = State::InQuoted;
                }
                b',' => self.field += 1,
                b'\n' | b'\r' => self.end_record(),
                _ => self.state = State::InField,
            },
            State::InField => match b {
                b',' => {
                    self.field += 1;
                    self.state = State::StartField;
                }
                b'\n' | b'\r' => self.end_record(),
                _ => {}
            },
            State::InQuoted => {
                if b == b'"' {
                    self.close = (self.line, self.col);
                    self.state = State::QuoteInQuoted;
                }
            }
            State::QuoteInQuoted | State::AfterClose => match b {
                b'"' if self.state == State::QuoteInQuoted => self.state = State::InQuoted,
                b',' => {
                    self.field += 1;
                    self.state = State::StartField;
                }
                b'\n' | b'\r' => self.end_record(),
                b' ' | b'\t' => self.state = State::AfterClose,
                _ => {
                    if self.problem.is_none() {
                        if let Some(open) = self.open {
                            self.problem = Some(QuoteProblem::TextAfterClose {
                                open,
                                line: self.close.0,
                                col: self.close.1,
                                next: char::from(b),
                            });
                        }
                    }
                    // Read on as the parser does (the rest of the cell is unquoted text).
                    self.state = State::InField;
                }
            },
        }
    }
}

impl<R: Read> Read for QuoteTracker<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if !self.started && n > 0 {
            self.started = true;
            if buf[..n].starts_with(&[0xEF, 0xBB, 0xBF]) {
                self.bom_left = 3;
            }
        }
        for &b in &buf[..n] {
            self.see(b);
        }
        if n == 0 && !buf.is_empty() && !self.eof {
            self.eof = true;
            if self.state == State::InQuoted && self.problem.is_none() {
                if let Some(open) = self.open {
                    // A file ending in a newline has its last line before it.
                    let last_line = if self.col == 0 {
                        self.line - 1
                    } else {
                        self.line
                    };
                    self.problem = Some(QuoteProblem::Unclosed {
                        open,
                        last_line: last_line.max(open.line),
                    });
                }
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(text: &str) -> Option<QuoteProblem> {
        let mut t = QuoteTracker::new(text.as_bytes());
        let mut sink = Vec::new();
        t.read_to_end(&mut sink).unwrap();
        assert_eq!(sink, text.as_bytes());
        t.problem().cloned()
    }

    #[test]
    fn well_formed_quoting_passes() {
        assert_eq!(scan("a,b\n\"x, y\",\"he said \"\"hi\"\"\"\n"), None);
        assert_eq!(scan("a,b\n\"multi\nline\",2\r\n3,4"), None);
        assert_eq!(
            scan("a,b\n5'10\",x\n"),
            None,
            "a quote inside an unquoted cell"
        );
        assert_eq!(
            scan("a,b\n\"x\"  ,y\n"),
            None,
            "blanks after the closing quote"
        );
        assert_eq!(scan("\u{feff}\"a\",b\n1,2\n"), None);
    }

    #[test]
    fn unclosed_quote_names_its_opening() {
        let p = scan("id,name\n1,ok\n2,\"bad\n3,x\n4,y\n").unwrap();
        assert_eq!(
            p,
            QuoteProblem::Unclosed {
                open: Opening {
                    line: 3,
                    col: 3,
                    field: 1
                },
                last_line: 5
            }
        );
        let msg = p
            .to_error(Path::new("u.csv"), &["id".into(), "name".into()])
            .to_string();
        assert!(
            msg.contains("u.csv: line 3, column `name` (character 3)"),
            "{msg}"
        );
        assert!(msg.contains("lines 3–5"), "{msg}");
        // Characters, not bytes: the quote after "é," is character 3.
        let p = scan("a,b\né,\"x\n").unwrap();
        assert_eq!(p.open_line(), 2);
        assert!(matches!(p, QuoteProblem::Unclosed { open, .. } if open.col == 3));
    }

    #[test]
    fn text_after_a_closing_quote_is_a_problem() {
        let p = scan("a,b\n1,\"stray\n2,\"x\"y\n").unwrap();
        assert_eq!(
            p,
            QuoteProblem::TextAfterClose {
                open: Opening {
                    line: 2,
                    col: 3,
                    field: 1
                },
                line: 3,
                col: 3,
                next: 'x'
            }
        );
    }
}
