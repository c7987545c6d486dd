//! Subjects: rendering an event's subject template, and the NATS token rules.
//!
//! An event's subject is a template of dot-separated tokens; a token written
//! `{field}` is filled from that field's `Display` text when the event is
//! published. The value must be one legal NATS token — not empty, and free of
//! `.`, `*`, `>`, whitespace and control characters — or publishing fails with
//! a [`SubjectError`] naming the field and the value. A value is never
//! escaped or replaced: a silently different subject would route the event
//! somewhere nobody listens.
//!
//! Subscribers use the wildcard form, where each `{field}` token becomes `*`
//! (`orders.{order_id}.placed` → `orders.*.placed`).

use std::fmt::{self, Display, Write as _};

/// The longest subject choreo publishes, in bytes. NATS has no subject limit
/// of its own, but a protocol line longer than the server's
/// `max_control_line` (4 KiB by default) makes it close the connection, so a
/// hostile field value could otherwise disconnect the publisher.
pub const MAX_SUBJECT_LEN: usize = 1024;

/// Why a value cannot be a subject token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenProblem {
    /// The value is empty.
    Empty,
    /// The value contains this character, which NATS does not allow in a
    /// token (`.`, `*`, `>`, whitespace or a control character).
    IllegalChar(char),
}

impl Display for TokenProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("it is empty"),
            Self::IllegalChar(c) => write!(f, "it contains {c:?}"),
        }
    }
}

/// A subject could not be rendered.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SubjectError {
    /// A field's value is not a legal NATS subject token.
    #[error(
        "cannot build the subject of {event}: field `{field}` = {value:?} is not a legal NATS subject token ({problem}); \
         subject tokens may not be empty or contain '.', '*', '>', whitespace or control characters"
    )]
    InvalidToken {
        /// The event's name.
        event: &'static str,
        /// The field that filled the token.
        field: String,
        /// The field's rendered value.
        value: String,
        /// What is wrong with it.
        problem: TokenProblem,
    },
    /// The rendered subject is longer than [`MAX_SUBJECT_LEN`].
    #[error(
        "cannot build the subject of {event}: it would be {len} bytes, above the {max}-byte limit; \
         a field used in the subject is too long (the longest is `{field}`, {field_len} bytes)"
    )]
    TooLong {
        /// The event's name.
        event: &'static str,
        /// The subject's length.
        len: usize,
        /// The limit.
        max: usize,
        /// The longest field value in the subject.
        field: String,
        /// Its length.
        field_len: usize,
    },
    /// The template's placeholders and the values given disagree in number.
    /// Only a hand-written `Event` impl can cause this.
    #[error(
        "subject template {template:?} of {event} has {expected} placeholders but {got} values were given"
    )]
    ArityMismatch {
        /// The event's name.
        event: &'static str,
        /// The subject template.
        template: &'static str,
        /// Placeholders in the template.
        expected: usize,
        /// Values given.
        got: usize,
    },
}

/// What kind of [`SubjectError`] happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SubjectErrorKind {
    /// [`SubjectError::InvalidToken`].
    InvalidToken,
    /// [`SubjectError::TooLong`].
    TooLong,
    /// [`SubjectError::ArityMismatch`].
    ArityMismatch,
}

impl SubjectError {
    /// What kind of failure this is.
    pub fn kind(&self) -> SubjectErrorKind {
        match self {
            Self::InvalidToken { .. } => SubjectErrorKind::InvalidToken,
            Self::TooLong { .. } => SubjectErrorKind::TooLong,
            Self::ArityMismatch { .. } => SubjectErrorKind::ArityMismatch,
        }
    }
}

/// Checks that `value` is one legal NATS subject token.
pub fn check_token(value: &str) -> Result<(), TokenProblem> {
    if value.is_empty() {
        return Err(TokenProblem::Empty);
    }
    match value
        .chars()
        .find(|&c| matches!(c, '.' | '*' | '>') || c.is_whitespace() || c.is_control())
    {
        Some(c) => Err(TokenProblem::IllegalChar(c)),
        None => Ok(()),
    }
}

/// The placeholder name of a template token, if the token is `{name}`.
pub(crate) fn placeholder(token: &str) -> Option<&str> {
    token.strip_prefix('{')?.strip_suffix('}')
}

/// Renders `template` for event `event`, filling its `{field}` tokens with
/// `values`, in order.
pub fn render(
    event: &'static str,
    template: &'static str,
    values: &[&dyn Display],
) -> Result<String, SubjectError> {
    let mut out = String::with_capacity(template.len() + 16 * values.len());
    let mut values_iter = values.iter();
    let mut used = 0;
    for (i, token) in template.split('.').enumerate() {
        if i > 0 {
            out.push('.');
        }
        match placeholder(token) {
            None => out.push_str(token),
            Some(field) => {
                let Some(value) = values_iter.next() else {
                    return Err(SubjectError::ArityMismatch {
                        event,
                        template,
                        expected: count_placeholders(template),
                        got: values.len(),
                    });
                };
                used += 1;
                let start = out.len();
                // Writing into a String cannot fail.
                let _ = write!(out, "{value}");
                if let Err(problem) = check_token(&out[start..]) {
                    return Err(SubjectError::InvalidToken {
                        event,
                        field: field.to_owned(),
                        value: out[start..].to_owned(),
                        problem,
                    });
                }
            }
        }
    }
    if used != values.len() {
        return Err(SubjectError::ArityMismatch {
            event,
            template,
            expected: used,
            got: values.len(),
        });
    }
    if out.len() > MAX_SUBJECT_LEN {
        let (template_tokens, out_tokens) = (template.split('.'), out.split('.'));
        let (field, field_len) = template_tokens
            .zip(out_tokens)
            .filter_map(|(t, v)| placeholder(t).map(|f| (f.to_owned(), v.len())))
            .max_by_key(|(_, n)| *n)
            .unwrap_or_default();
        return Err(SubjectError::TooLong {
            event,
            len: out.len(),
            max: MAX_SUBJECT_LEN,
            field,
            field_len,
        });
    }
    Ok(out)
}

/// The wildcard form of a template: each `{field}` token becomes `*`.
#[cfg(test)]
pub(crate) fn filter(template: &str) -> String {
    template
        .split('.')
        .map(|t| if placeholder(t).is_some() { "*" } else { t })
        .collect::<Vec<_>>()
        .join(".")
}

/// Whether the NATS subject filter `filter` (with `*` and `>` wildcards)
/// covers every subject that `inner` (itself a filter) matches.
pub fn covers(filter: &str, inner: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = inner.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(t)) if t != ">" => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

fn count_placeholders(template: &str) -> usize {
    template
        .split('.')
        .filter(|t| placeholder(t).is_some())
        .count()
}

#[cfg(test)]
mod tests {
    use super::{MAX_SUBJECT_LEN, SubjectError, TokenProblem, covers, filter, render};

    #[test]
    fn renders_placeholders_in_order() {
        let s = render("E", "a.{x}.b.{y}", &[&"1", &42]).unwrap();
        assert_eq!(s, "a.1.b.42");
    }

    #[test]
    fn rejects_illegal_values_naming_the_field() {
        for (value, problem) in [
            ("", TokenProblem::Empty),
            ("a.b", TokenProblem::IllegalChar('.')),
            ("a*", TokenProblem::IllegalChar('*')),
            (">", TokenProblem::IllegalChar('>')),
            ("a b", TokenProblem::IllegalChar(' ')),
            ("a\tb", TokenProblem::IllegalChar('\t')),
            ("a\r\nb", TokenProblem::IllegalChar('\r')),
            ("a\u{0}", TokenProblem::IllegalChar('\u{0}')),
            ("a\u{3000}", TokenProblem::IllegalChar('\u{3000}')),
        ] {
            let err = render("OrderPlaced", "orders.{order_id}.placed", &[&value]).unwrap_err();
            assert_eq!(
                err,
                SubjectError::InvalidToken {
                    event: "OrderPlaced",
                    field: "order_id".into(),
                    value: value.into(),
                    problem
                }
            );
            assert!(err.to_string().contains("`order_id`"), "{err}");
        }
    }

    #[test]
    fn an_overlong_subject_is_refused_naming_the_longest_field() {
        let long = "x".repeat(2000);
        let err = render("E", "a.{short}.{long}", &[&"s", &long]).unwrap_err();
        assert!(
            matches!(&err, SubjectError::TooLong { len: 2004, max: MAX_SUBJECT_LEN, field, field_len: 2000, .. } if field == "long"),
            "{err:?}"
        );
        assert!(render("E", "a.{x}", &[&"y".repeat(MAX_SUBJECT_LEN - 2)]).is_ok());
        assert!(render("E", "a.{x}", &[&"y".repeat(MAX_SUBJECT_LEN - 1)]).is_err());
    }

    #[test]
    fn non_ascii_letters_are_legal() {
        assert_eq!(
            render("E", "a.{x}", &[&"zürich-東京"]).unwrap(),
            "a.zürich-東京"
        );
    }

    #[test]
    fn arity_mismatch_is_an_error() {
        assert!(matches!(
            render("E", "a.{x}", &[]),
            Err(SubjectError::ArityMismatch { .. })
        ));
        assert!(matches!(
            render("E", "a.b", &[&1]),
            Err(SubjectError::ArityMismatch { .. })
        ));
    }

    #[test]
    fn filter_and_covers() {
        assert_eq!(filter("orders.{id}.placed"), "orders.*.placed");
        assert!(covers("orders.>", "orders.*.placed"));
        assert!(covers("orders.*.placed", "orders.*.placed"));
        assert!(covers("orders.*.*", "orders.x.placed"));
        assert!(!covers("orders.*", "orders.*.placed"));
        assert!(!covers("payments.>", "orders.*.placed"));
        assert!(!covers("orders.x.placed", "orders.*.placed"));
        assert!(!covers("orders.*.placed", "orders.>"));
    }
}
