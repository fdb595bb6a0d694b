//! Lenient Message-ID list parsing and a case-insensitive view of Graph's
//! `internetMessageHeaders`.
//!
//! Graph v1.0 has no `inReplyTo`/`references` properties, so threading depends on these header
//! values, which real mailers get wrong in every possible way: folded lines, `(comments)`,
//! missing angle brackets, commas between ids, duplicates, junk ids without `@`, and Outlook's
//! habit of truncating long References to the first id plus the last few.
//!
//! The Message-ID lists are parsed by hand rather than with mail-parser's `parse_id`: that parser
//! works on a raw header stream (it returns nothing unless the value ends in a newline), does not
//! skip comments, and silently drops bare ids once a bracketed one has been seen. A dedicated
//! scanner over an already-unfolded value is short and keeps every lenient case testable.

use std::collections::HashSet;

use serde::Deserialize;

use crate::ids::InternetMessageId;

/// Upper bound on ids kept from one header. A hostile or runaway References header must not turn
/// into an unbounded lookup; when trimming we keep the root and the most recent ids, exactly the
/// shape Outlook produces itself, because those are the ids most likely to be known.
pub const MAX_IDS_PER_HEADER: usize = 64;

/// Every syntactically usable Message-ID in `value`, in order, without duplicates.
/// Ids without `@` are dropped (see [`InternetMessageId::parse`]).
#[must_use]
pub fn parse_message_ids(value: &str) -> Vec<InternetMessageId> {
    let mut seen = HashSet::new();
    let ids: Vec<InternetMessageId> = raw_tokens(&unfold(value))
        .into_iter()
        .filter_map(|token| InternetMessageId::parse(&token).ok())
        .filter(|id| seen.insert(id.clone()))
        .collect();
    cap_keeping_root_and_tail(ids)
}

/// The first usable Message-ID in `value` (for Message-ID and In-Reply-To, which should hold
/// one id but sometimes hold junk first).
#[must_use]
pub fn parse_message_id(value: &str) -> Option<InternetMessageId> {
    parse_message_ids(value).into_iter().next()
}

/// Ids from several header values (repeated headers), in order, deduplicated across values.
#[must_use]
pub fn parse_message_id_lists<'a>(
    values: impl IntoIterator<Item = &'a str>,
) -> Vec<InternetMessageId> {
    let mut seen = HashSet::new();
    let ids: Vec<InternetMessageId> = values
        .into_iter()
        .flat_map(parse_message_ids)
        .filter(|id| seen.insert(id.clone()))
        .collect();
    cap_keeping_root_and_tail(ids)
}

fn cap_keeping_root_and_tail(mut ids: Vec<InternetMessageId>) -> Vec<InternetMessageId> {
    if ids.len() > MAX_IDS_PER_HEADER {
        let tail_start = ids.len() - (MAX_IDS_PER_HEADER - 1);
        ids.drain(1..tail_start);
    }
    ids
}

/// RFC 5322 unfolding: a line break followed by whitespace is one space. Graph usually unfolds
/// already, but values copied from raw MIME (or from buggy gateways) may still carry CRLFs.
#[must_use]
pub fn unfold(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' | '\n' => {
                while chars
                    .peek()
                    .is_some_and(|n| matches!(n, '\r' | '\n' | ' ' | '\t'))
                {
                    chars.next();
                }
                out.push(' ');
            }
            _ => out.push(c),
        }
    }
    out
}

/// Splits a header value into candidate id strings. Brackets delimit an id when present; bare
/// tokens between separators are candidates too, so `a@b, <c@d>` yields both.
fn raw_tokens(value: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut chars = value.chars().peekable();
    let mut bare = String::new();
    let flush = |bare: &mut String, tokens: &mut Vec<String>| {
        if !bare.is_empty() {
            tokens.push(std::mem::take(bare));
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '(' => {
                flush(&mut bare, &mut tokens);
                skip_comment(&mut chars);
            }
            '<' => {
                flush(&mut bare, &mut tokens);
                let mut inner = String::new();
                // A missing '>' (truncated header) ends the id at the next separator instead.
                while let Some(&n) = chars.peek() {
                    match n {
                        '>' => {
                            chars.next();
                            break;
                        }
                        '<' => break,
                        ',' | ';' if !inner.contains('@') => break,
                        c if c.is_whitespace() => {
                            // Ids never contain whitespace: inside brackets it is folding
                            // damage (`<a@\r\n b.com>`) while the domain is still incomplete,
                            // and otherwise marks a missing '>' before the next id.
                            if inner.contains('@') && !inner.ends_with(['@', '.']) {
                                break;
                            }
                            chars.next();
                        }
                        _ => {
                            inner.push(n);
                            chars.next();
                        }
                    }
                }
                if !inner.is_empty() {
                    tokens.push(inner);
                }
            }
            '>' => flush(&mut bare, &mut tokens),
            ',' | ';' => flush(&mut bare, &mut tokens),
            c if c.is_whitespace() => flush(&mut bare, &mut tokens),
            _ => bare.push(c),
        }
    }
    flush(&mut bare, &mut tokens);
    tokens
}

/// Skips a (possibly nested) RFC 5322 comment whose opening '(' was consumed.
fn skip_comment(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) {
    let mut depth = 1usize;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return;
                }
            }
            _ => {}
        }
    }
}

/// One entry of Graph's `internetMessageHeaders`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct GraphHeader {
    pub name: String,
    pub value: String,
}

/// Graph's `internetMessageHeaders` as a lookup table: names compare case-insensitively, repeated
/// headers are all kept in their original order, values are unfolded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(from = "Vec<GraphHeader>")]
pub struct MessageHeaders {
    entries: Vec<(String, String)>,
}

impl MessageHeaders {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds the view from `(name, value)` pairs, e.g. the deserialized Graph array.
    pub fn from_pairs<N, V>(pairs: impl IntoIterator<Item = (N, V)>) -> Self
    where
        N: Into<String>,
        V: AsRef<str>,
    {
        Self {
            entries: pairs
                .into_iter()
                .map(|(n, v)| {
                    let name: String = n.into();
                    (
                        name.trim().to_ascii_lowercase(),
                        unfold(v.as_ref()).trim().to_owned(),
                    )
                })
                .collect(),
        }
    }

    /// The first value of `name`.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&str> {
        self.get_all(name).next()
    }

    /// Every value of `name`, in header order.
    pub fn get_all<'s>(&'s self, name: &str) -> impl Iterator<Item = &'s str> {
        self.entries
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    #[must_use]
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The message's own Message-ID, when the header holds a usable one.
    #[must_use]
    pub fn message_id(&self) -> Option<InternetMessageId> {
        self.get_all("message-id").find_map(parse_message_id)
    }

    /// All usable ids of every In-Reply-To header. RFC 5322 allows several ids here.
    #[must_use]
    pub fn in_reply_to(&self) -> Vec<InternetMessageId> {
        parse_message_id_lists(self.get_all("in-reply-to"))
    }

    /// All usable ids of every References header, oldest first as sent.
    #[must_use]
    pub fn references(&self) -> Vec<InternetMessageId> {
        parse_message_id_lists(self.get_all("references"))
    }
}

impl From<Vec<GraphHeader>> for MessageHeaders {
    fn from(headers: Vec<GraphHeader>) -> Self {
        Self::from_pairs(headers.into_iter().map(|h| (h.name, h.value)))
    }
}

impl<N: Into<String>, V: AsRef<str>> FromIterator<(N, V)> for MessageHeaders {
    fn from_iter<T: IntoIterator<Item = (N, V)>>(iter: T) -> Self {
        Self::from_pairs(iter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strs(ids: &[InternetMessageId]) -> Vec<&str> {
        ids.iter().map(InternetMessageId::as_str).collect()
    }

    #[test]
    fn plain_list_keeps_order() {
        let ids = parse_message_ids("<a@x.com> <b@x.com>\t<c@y.org>");
        assert_eq!(strs(&ids), ["<a@x.com>", "<b@x.com>", "<c@y.org>"]);
    }

    #[test]
    fn folded_whitespace_and_crlf_are_tolerated() {
        let ids = parse_message_ids("<a@x.com>\r\n <b@x.com>\r\n\t<c@\r\n y.org>");
        assert_eq!(strs(&ids), ["<a@x.com>", "<b@x.com>", "<c@y.org>"]);
    }

    #[test]
    fn comments_are_skipped_even_nested_and_with_brackets_inside() {
        let ids = parse_message_ids("<a@x.com> (sent by <junk@evil> (really)) <b@x.com>");
        assert_eq!(strs(&ids), ["<a@x.com>", "<b@x.com>"]);
        let ids = parse_message_ids("(only \\) a comment) <c@x.com>");
        assert_eq!(strs(&ids), ["<c@x.com>"]);
    }

    #[test]
    fn missing_brackets_and_commas() {
        let ids = parse_message_ids("a@x.com, b@x.com;<c@x.com>,d@x.com");
        assert_eq!(
            strs(&ids),
            ["<a@x.com>", "<b@x.com>", "<c@x.com>", "<d@x.com>"]
        );
    }

    #[test]
    fn unterminated_bracket_still_yields_the_id() {
        let ids = parse_message_ids("<a@x.com> <b@x.com");
        assert_eq!(strs(&ids), ["<a@x.com>", "<b@x.com>"]);
        let ids = parse_message_ids("<a@x.com<b@x.com>");
        assert_eq!(strs(&ids), ["<a@x.com>", "<b@x.com>"]);
        let ids = parse_message_ids("<a@x.com b@x.com>");
        assert_eq!(strs(&ids), ["<a@x.com>", "<b@x.com>"]);
    }

    #[test]
    fn duplicates_removed_and_first_position_kept() {
        let ids = parse_message_ids("<a@x.com> <b@x.com> <a@x.com> a@x.com");
        assert_eq!(strs(&ids), ["<a@x.com>", "<b@x.com>"]);
    }

    #[test]
    fn junk_ids_without_at_are_dropped() {
        let ids = parse_message_ids("<1234567> <a@x.com> <> <@x.com> <local@> <b@x.com>");
        assert_eq!(strs(&ids), ["<a@x.com>", "<b@x.com>"]);
        assert!(parse_message_ids("<1234567.JavaMail>").is_empty());
        assert!(parse_message_ids("").is_empty());
    }

    #[test]
    fn first_usable_id_skips_junk() {
        assert_eq!(
            parse_message_id("<junk> <real@x.com>").map(|i| i.as_str().to_owned()),
            Some("<real@x.com>".to_owned())
        );
        assert_eq!(parse_message_id("<junk>"), None);
    }

    #[test]
    fn outlook_truncated_references_parse_root_and_tail() {
        // Outlook keeps the first id and the last few once References gets long.
        let value = "<root@a.com> <r7@b.com>\r\n <r8@a.com> <r9@b.com>";
        let ids = parse_message_ids(value);
        assert_eq!(
            strs(&ids),
            ["<root@a.com>", "<r7@b.com>", "<r8@a.com>", "<r9@b.com>"]
        );
    }

    #[test]
    fn oversized_lists_keep_root_and_newest() {
        let value: String = (0..200).map(|i| format!("<m{i}@x.com> ")).collect();
        let ids = parse_message_ids(&value);
        assert_eq!(ids.len(), MAX_IDS_PER_HEADER);
        assert_eq!(ids[0].as_str(), "<m0@x.com>");
        assert_eq!(
            ids[1].as_str(),
            format!("<m{}@x.com>", 200 - MAX_IDS_PER_HEADER + 1)
        );
        assert_eq!(
            ids.last().map(InternetMessageId::as_str),
            Some("<m199@x.com>")
        );
    }

    #[test]
    fn header_view_is_case_insensitive_and_keeps_repeats() {
        let h = MessageHeaders::from_pairs([
            ("Message-ID", "<self@x.com>"),
            ("in-reply-to", "<p@x.com>"),
            ("REFERENCES", "<r1@x.com> <p@x.com>"),
            ("References", "<r2@x.com>\r\n <r1@x.com>"),
            ("Received", "by one"),
            ("received", "by two"),
        ]);
        assert_eq!(h.message_id().unwrap().as_str(), "<self@x.com>");
        assert_eq!(strs(&h.in_reply_to()), ["<p@x.com>"]);
        assert_eq!(
            strs(&h.references()),
            ["<r1@x.com>", "<p@x.com>", "<r2@x.com>"]
        );
        assert_eq!(
            h.get_all("RECEIVED").collect::<Vec<_>>(),
            ["by one", "by two"]
        );
        assert_eq!(h.get("x-missing"), None);
        assert!(h.contains("Message-Id"));
    }

    #[test]
    fn deserializes_from_graph_json() {
        let json = r#"[{"name":"In-Reply-To","value":"<p@x.com>"},
                       {"name":"Auto-Submitted","value":"auto-replied"}]"#;
        let h: MessageHeaders = serde_json::from_str(json).unwrap();
        assert_eq!(strs(&h.in_reply_to()), ["<p@x.com>"]);
        assert_eq!(h.get("auto-submitted"), Some("auto-replied"));
    }

    #[test]
    fn unfold_joins_continuation_lines() {
        assert_eq!(unfold("a\r\n b\n\tc"), "a b c");
    }
}
