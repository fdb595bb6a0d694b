//! Subject handling for threading: reply/forward prefix stripping (including the localized
//! prefixes Outlook and other clients write), the `[#1234]` ticket token, and adding that token to
//! outgoing subjects.

use std::sync::LazyLock;

use regex::Regex;

use crate::ids::TicketId;

/// Reply and forward prefixes, lower-cased. Localized clients write their own word and many
/// users' mailboxes mix languages in one thread ("AW: RE: WG: ...").
const PREFIXES: &[&str] = &[
    // English and generic
    "re",
    "fw",
    "fwd",
    // German
    "aw",
    "wg",
    // Scandinavian (sv: svar, vs: videresend / vidarebefordran), Finnish (vl, vs)
    "sv",
    "vs",
    "vl",
    "vb",
    "ynt",
    // Italian ("I:" for inoltro is left out: too easy to hit by accident)
    "r",
    "rif",
    // Dutch
    "antw",
    "doorst",
    // French
    "tr",
    "ref",
    "réf",
    // Spanish / Portuguese
    "rv",
    "enc",
    "res",
    // Polish
    "odp",
    "pd",
    // Turkish
    "ilt",
    "i̇lt",
    // Greek, Hebrew, Arabic
    "απ",
    "σχετ",
    "πρθ",
    "השב",
    "הועבר",
    "رد",
    "إعادة توجيه",
    // Hungarian
    "továbbítás",
    "vá",
    // Chinese (simplified and traditional), Japanese
    "回复",
    "回覆",
    "答复",
    "答覆",
    "转发",
    "轉寄",
    "转寄",
    "轉發",
    // Russian / Ukrainian
    "ответ",
    "отв",
    "пересл",
    "переслать",
    "відповідь",
];

const COLONS: [char; 3] = [':', '：', '﹕'];

static TICKET_TOKEN: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)\[\s*(?:ticket\s*)?#\s*([0-9]{1,18})\s*\]").expect("static regex")
});

/// The subject used as a threading key: all leading reply/forward prefixes removed (with any
/// `[list]` tags that precede a prefix), ticket tokens removed, whitespace collapsed, case folded.
///
/// `"AW: [support] RE[2]: Invoice  [#42]"` → `"invoice"`.
#[must_use]
pub fn normalize_subject(subject: &str) -> String {
    let (rest, _) = strip_prefixes(subject);
    let without_token = TICKET_TOKEN.replace_all(rest, " ");
    without_token
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// Whether the subject carries at least one reply or forward prefix. Only such subjects may be
/// threaded by subject: a fresh "Invoice" is a new request even if an old one had that subject.
#[must_use]
pub fn is_reply_or_forward(subject: &str) -> bool {
    strip_prefixes(subject).1 > 0
}

/// The subject without leading reply/forward prefixes, case and inner spacing preserved; a good
/// title for a new ticket.
#[must_use]
pub fn strip_reply_prefixes(subject: &str) -> &str {
    strip_prefixes(subject).0.trim()
}

/// Removes leading prefixes; returns the remainder and how many prefixes were removed.
fn strip_prefixes(subject: &str) -> (&str, usize) {
    let mut rest = subject;
    let mut count = 0;
    loop {
        let trimmed = rest.trim_start();
        if let Some(after) = take_prefix(trimmed) {
            rest = after;
            count += 1;
            continue;
        }
        // A list tag is only noise when a prefix follows it ("[list] Re: x"); "[list] x" keeps
        // its tag because the tag may be the only thing distinguishing two subjects.
        if let Some(after_tags) = skip_tags(trimmed)
            && let Some(after) = take_prefix(after_tags.trim_start())
        {
            rest = after;
            count += 1;
            continue;
        }
        return (trimmed, count);
    }
}

/// Skips one or more `[...]` blocks at the start.
fn skip_tags(s: &str) -> Option<&str> {
    let mut rest = s;
    let mut any = false;
    while let Some(inner) = rest.strip_prefix('[') {
        let close = inner.find(']')?;
        rest = inner[close + 1..].trim_start();
        any = true;
    }
    any.then_some(rest)
}

/// Matches `word`, an optional counter (`[2]`, `(2)`, `^2`), optional spaces, then a colon.
fn take_prefix(s: &str) -> Option<&str> {
    // U+0307 keeps the Turkish dotted capital (İ lower-cases to i + U+0307) inside the word.
    let word_end = s
        .char_indices()
        .find(|&(_, c)| !(c.is_alphabetic() || c == '\u{307}'))
        .map_or(s.len(), |(i, _)| i);
    let single = &s[..word_end];
    let word = if !single.is_empty() && PREFIXES.contains(&single.to_lowercase().as_str()) {
        single
    } else {
        // Multi-word prefixes ("إعادة توجيه") contain a space, so the word scan cannot see them.
        let multi = PREFIXES.iter().filter(|p| p.contains(' ')).find(|p| {
            s.get(..p.len())
                .is_some_and(|head| head.to_lowercase() == **p)
        })?;
        &s[..multi.len()]
    };
    let rest = skip_counter(&s[word.len()..]).trim_start_matches([' ', '\t']);
    rest.strip_prefix(COLONS)
}

fn skip_counter(s: &str) -> &str {
    let (open, close) = match s.chars().next() {
        Some('[') => ('[', ']'),
        Some('(') => ('(', ')'),
        Some('^') => {
            let digits = s[1..]
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(s.len() - 1);
            return if digits > 0 { &s[1 + digits..] } else { s };
        }
        _ => return s,
    };
    let inner = &s[open.len_utf8()..];
    match inner.find(close) {
        Some(end) if end > 0 && inner[..end].chars().all(|c| c.is_ascii_digit()) => {
            &inner[end + 1..]
        }
        _ => s,
    }
}

/// The ticket named by a `[#1234]` (or `[Ticket #1234]`) token, the first one if several.
#[must_use]
pub fn ticket_token(subject: &str) -> Option<TicketId> {
    TICKET_TOKEN
        .captures_iter(subject)
        .filter_map(|c| c.get(1)?.as_str().parse::<i64>().ok())
        .find(|&n| n > 0)
        .map(TicketId::new)
}

/// The token our outgoing mail carries.
#[must_use]
pub fn format_ticket_token(ticket: TicketId) -> String {
    format!("[#{ticket}]")
}

/// `subject` with exactly one token for `ticket` at its end: an existing token for this ticket is
/// kept where it is, tokens naming other tickets (a merged ticket's old number) are removed.
///
/// `with_ticket_token("RE: Invoice", 42)` → `"RE: Invoice [#42]"`.
#[must_use]
pub fn with_ticket_token(subject: &str, ticket: TicketId) -> String {
    let mut kept_ours = false;
    let cleaned = TICKET_TOKEN.replace_all(subject, |c: &regex::Captures<'_>| {
        let ours = c[1].parse::<i64>().ok() == Some(ticket.get());
        if ours && !kept_ours {
            kept_ours = true;
            c[0].to_owned()
        } else {
            String::new()
        }
    });
    let collapsed = cleaned.split_whitespace().collect::<Vec<_>>().join(" ");
    match (kept_ours, collapsed.is_empty()) {
        (true, _) => collapsed,
        (false, true) => format_ticket_token(ticket),
        (false, false) => format!("{collapsed} {}", format_ticket_token(ticket)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_stacked_english_prefixes() {
        assert_eq!(
            normalize_subject("RE: Re: FW: Fwd:  Invoice   March"),
            "invoice march"
        );
        assert_eq!(normalize_subject("re:re:invoice"), "invoice");
        assert_eq!(normalize_subject("RE[2]: Invoice"), "invoice");
        assert_eq!(normalize_subject("Re(3): Invoice"), "invoice");
        assert_eq!(normalize_subject("Re^2: Invoice"), "invoice");
        assert_eq!(normalize_subject("RE : Facture"), "facture");
    }

    #[test]
    fn strips_localized_prefixes() {
        for s in [
            "AW: Invoice",
            "WG: Invoice",
            "SV: Invoice",
            "VS: Invoice",
            "R: Invoice",
            "RIF: Invoice",
            "Antw: Invoice",
            "Doorst: Invoice",
            "TR: Invoice",
            "RV: Invoice",
            "Enc: Invoice",
            "ODP: Invoice",
            "YNT: Invoice",
            "回复: Invoice",
            "回复：Invoice",
            "回覆: Invoice",
            "答复：Invoice",
            "转发: Invoice",
            "轉寄: Invoice",
            "Ответ: Invoice",
            "AW：Invoice",
            "AW: WG: RE: SV: Invoice",
        ] {
            assert_eq!(normalize_subject(s), "invoice", "{s}");
            assert!(is_reply_or_forward(s), "{s}");
        }
    }

    #[test]
    fn words_that_merely_start_like_prefixes_are_kept() {
        assert_eq!(
            normalize_subject("Request: new laptop"),
            "request: new laptop"
        );
        assert_eq!(normalize_subject("Reminder: Invoice"), "reminder: invoice");
        assert_eq!(normalize_subject("Re invoice"), "re invoice");
        assert_eq!(normalize_subject("回复客户：问题"), "回复客户：问题");
        assert!(!is_reply_or_forward("Request: new laptop"));
        assert!(!is_reply_or_forward("Invoice"));
    }

    #[test]
    fn list_tags_only_stripped_before_a_prefix() {
        assert_eq!(normalize_subject("[support] Re: Invoice"), "invoice");
        assert_eq!(normalize_subject("Re: [support] Re: Invoice"), "invoice");
        assert_eq!(normalize_subject("[support] Invoice"), "[support] invoice");
        assert_eq!(
            normalize_subject("Re: [support] Invoice"),
            "[support] invoice"
        );
        assert!(is_reply_or_forward("[support] AW: Invoice"));
        assert!(!is_reply_or_forward("[support] Invoice"));
    }

    #[test]
    fn ticket_tokens_do_not_affect_the_threading_key() {
        assert_eq!(normalize_subject("RE: Invoice [#42]"), "invoice");
        assert_eq!(normalize_subject("[#42] RE: Invoice"), "invoice");
    }

    #[test]
    fn strip_reply_prefixes_keeps_case() {
        assert_eq!(
            strip_reply_prefixes("AW: RE:  Invoice March "),
            "Invoice March"
        );
        assert_eq!(strip_reply_prefixes("Invoice"), "Invoice");
    }

    #[test]
    fn ticket_token_extraction() {
        assert_eq!(
            ticket_token("RE: Invoice [#1234]"),
            Some(TicketId::new(1234))
        );
        assert_eq!(ticket_token("[Ticket #77] help"), Some(TicketId::new(77)));
        assert_eq!(ticket_token("[ ticket#8 ] help"), Some(TicketId::new(8)));
        assert_eq!(ticket_token("Issue #1234 again"), None);
        assert_eq!(ticket_token("[#0] zero is no ticket"), None);
        assert_eq!(ticket_token("[#99999999999999999999] overflow"), None);
        assert_eq!(ticket_token("[#0] and [#5]"), Some(TicketId::new(5)));
    }

    #[test]
    fn token_added_exactly_once() {
        let t = TicketId::new(42);
        assert_eq!(with_ticket_token("RE: Invoice", t), "RE: Invoice [#42]");
        assert_eq!(
            with_ticket_token("RE: Invoice [#42]", t),
            "RE: Invoice [#42]"
        );
        assert_eq!(
            with_ticket_token("RE: Invoice [#42] [#42]", t),
            "RE: Invoice [#42]"
        );
        assert_eq!(
            with_ticket_token("RE: [Ticket #42] Invoice", t),
            "RE: [Ticket #42] Invoice"
        );
        assert_eq!(
            with_ticket_token("RE: Invoice [#7]", t),
            "RE: Invoice [#42]"
        );
        assert_eq!(with_ticket_token("", t), "[#42]");
        let twice = with_ticket_token(&with_ticket_token("Invoice", t), t);
        assert_eq!(twice.matches("[#42]").count(), 1);
    }
}
