//! Recognising mail that a machine sent: auto-replies, out-of-office notices, bounces, list
//! traffic and loops. Such messages are still stored and threaded, but must never trigger an
//! automatic response, or two auto-responders end up mailing each other forever.
//!
//! The reason is stored in `helpdesk_messages.auto_reply_reason` as a short machine-readable code
//! such as `auto-submitted:auto-replied` or `sender:mailer-daemon`.

use std::fmt;
use std::sync::LazyLock;

use mail_parser::HeaderValue;
use mail_parser::parsers::MessageStream;
use regex::Regex;

use super::headers::MessageHeaders;
use crate::ids::EmailAddress;

/// Headers graphdesk's own automatic mail should carry. Graph only lets a client set `X-` headers,
/// so `Auto-Submitted` is out of reach; these are what other help desks (and we) recognise.
pub const OUTGOING_AUTOMATIC_HEADERS: [(&str, &str); 2] =
    [("X-Auto-Response-Suppress", "All"), ("X-Autoreply", "yes")];

/// Why a message counts as automatic. The order of the variants is the order of the checks:
/// explicit standard headers first, heuristics on sender and subject last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AutoReplyReason {
    /// RFC 3834 `Auto-Submitted` with any value other than `no` (value kept).
    AutoSubmitted(String),
    /// `Content-Type: multipart/report` (RFC 6522): a DSN bounce or a read receipt; holds the
    /// `report-type` (`delivery-status`, `disposition-notification`) or `unknown`.
    Report(String),
    /// `X-Autoreply` or `X-Autorespond` (lower-cased header name).
    AutoReplyHeader(&'static str),
    /// `X-Loop` present, or the sender is one of our own monitored mailboxes.
    Loop(&'static str),
    /// Microsoft's `X-Auto-Response-Suppress` naming a class of automatic reply (value kept).
    AutoResponseSuppress(String),
    /// `Precedence: bulk | junk | list | auto_reply`.
    Precedence(String),
    /// A mailing-list header present (RFC 2919 `List-Id`, RFC 2369 `List-Unsubscribe`,
    /// `List-Post`, `List-Help`, `List-Subscribe`, `List-Owner`, `List-Archive`; lower-cased).
    MailingList(&'static str),
    /// mailer-daemon, postmaster, noreply and friends (the matched local-part family).
    SystemSender(&'static str),
    /// A subject that only machines write ("Automatic reply:", "Undeliverable:", ...).
    Subject(&'static str),
}

impl AutoReplyReason {
    /// The code stored in `auto_reply_reason`, e.g. `auto-submitted:auto-replied`.
    #[must_use]
    pub fn code(&self) -> String {
        match self {
            Self::AutoSubmitted(v) => format!("auto-submitted:{v}"),
            Self::Report(t) => format!("report:{t}"),
            Self::AutoReplyHeader(h) => (*h).to_owned(),
            Self::Loop(why) => format!("loop:{why}"),
            Self::AutoResponseSuppress(v) => format!("x-auto-response-suppress:{v}"),
            Self::Precedence(v) => format!("precedence:{v}"),
            Self::MailingList(h) => format!("list:{h}"),
            Self::SystemSender(s) => format!("sender:{s}"),
            Self::Subject(s) => format!("subject:{s}"),
        }
    }

    /// Whether this looks like a delivery failure rather than a person being away; callers may
    /// want to surface bounces on the ticket of the message that bounced.
    #[must_use]
    pub fn is_bounce(&self) -> bool {
        match self {
            Self::Report(t) => t == "delivery-status",
            Self::SystemSender(s) => matches!(*s, "mailer-daemon" | "postmaster"),
            Self::Subject(s) => matches!(*s, "undeliverable" | "delivery-status-notification"),
            _ => false,
        }
    }
}

impl fmt::Display for AutoReplyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.code())
    }
}

/// Classifies a message; `None` means a person wrote it, as far as we can tell.
///
/// `own_addresses` are the tenant's monitored mailboxes: mail from one of them arriving in
/// another is our own traffic coming back and must not be answered.
#[must_use]
pub fn classify(
    headers: &MessageHeaders,
    from: Option<&EmailAddress>,
    subject: &str,
    own_addresses: &[EmailAddress],
) -> Option<AutoReplyReason> {
    auto_submitted(headers)
        .or_else(|| report(headers))
        .or_else(|| auto_reply_header(headers))
        .or_else(|| loop_signal(headers, from, own_addresses))
        .or_else(|| auto_response_suppress(headers))
        .or_else(|| precedence(headers))
        .or_else(|| mailing_list(headers))
        .or_else(|| from.and_then(system_sender))
        .or_else(|| machine_subject(subject))
}

/// Header values end up in the database; keep only a short, tame first token.
fn token(value: &str) -> String {
    value
        .split(|c: char| c == ';' || c == ',' || c.is_whitespace())
        .find(|t| !t.is_empty())
        .unwrap_or("")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(40)
        .collect::<String>()
        .to_ascii_lowercase()
}

fn auto_submitted(h: &MessageHeaders) -> Option<AutoReplyReason> {
    h.get_all("auto-submitted")
        .map(token)
        .find(|v| v != "no")
        .map(|v| AutoReplyReason::AutoSubmitted(if v.is_empty() { "unknown".into() } else { v }))
}

fn report(h: &MessageHeaders) -> Option<AutoReplyReason> {
    let value = h.get("content-type")?;
    // mail-parser's Content-Type parser expects a raw header line, terminated by a newline.
    let raw = format!("{value}\n");
    let HeaderValue::ContentType(ct) = MessageStream::new(raw.as_bytes()).parse_content_type()
    else {
        return None;
    };
    let is_report = ct.ctype().eq_ignore_ascii_case("multipart")
        && ct
            .subtype()
            .is_some_and(|s| s.eq_ignore_ascii_case("report"));
    is_report.then(|| {
        let kind = ct.attribute("report-type").map(token).unwrap_or_default();
        AutoReplyReason::Report(if kind.is_empty() {
            "unknown".into()
        } else {
            kind
        })
    })
}

fn auto_reply_header(h: &MessageHeaders) -> Option<AutoReplyReason> {
    ["x-autoreply", "x-autorespond"]
        .into_iter()
        .find(|name| h.get_all(name).any(|v| token(v) != "no"))
        .map(AutoReplyReason::AutoReplyHeader)
}

fn loop_signal(
    h: &MessageHeaders,
    from: Option<&EmailAddress>,
    own: &[EmailAddress],
) -> Option<AutoReplyReason> {
    if h.contains("x-loop") {
        return Some(AutoReplyReason::Loop("x-loop"));
    }
    let from = from?.key();
    own.iter()
        .any(|a| a.key() == from)
        .then_some(AutoReplyReason::Loop("own-mailbox"))
}

fn auto_response_suppress(h: &MessageHeaders) -> Option<AutoReplyReason> {
    const CLASSES: [&str; 6] = ["all", "oof", "autoreply", "dr", "rn", "nrn"];
    h.get_all("x-auto-response-suppress")
        .flat_map(|v| v.split([',', ';']))
        .map(token)
        .find(|v| CLASSES.contains(&v.as_str()))
        .map(AutoReplyReason::AutoResponseSuppress)
}

fn precedence(h: &MessageHeaders) -> Option<AutoReplyReason> {
    h.get_all("precedence")
        .map(token)
        .find(|v| matches!(v.as_str(), "bulk" | "junk" | "list" | "auto_reply"))
        .map(AutoReplyReason::Precedence)
}

fn mailing_list(h: &MessageHeaders) -> Option<AutoReplyReason> {
    [
        "list-id",
        "list-unsubscribe",
        "list-post",
        "list-help",
        "list-subscribe",
        "list-owner",
        "list-archive",
    ]
    .into_iter()
    .find(|name| h.contains(name))
    .map(AutoReplyReason::MailingList)
}

fn system_sender(from: &EmailAddress) -> Option<AutoReplyReason> {
    let key = from.key();
    let local = key.rsplit_once('@').map_or(key.as_str(), |(l, _)| l);
    // Sub-addressing ("noreply+billing") does not change who sent it.
    let local = local.split('+').next().unwrap_or(local);
    let compact: String = local
        .chars()
        .filter(|c| !matches!(c, '-' | '_' | '.'))
        .collect();
    if compact == "mailerdaemon" {
        Some(AutoReplyReason::SystemSender("mailer-daemon"))
    } else if compact == "postmaster" {
        Some(AutoReplyReason::SystemSender("postmaster"))
    } else if compact.starts_with("noreply") || compact.starts_with("donotreply") {
        Some(AutoReplyReason::SystemSender("noreply"))
    } else {
        None
    }
}

static MACHINE_SUBJECTS: LazyLock<Vec<(Regex, &'static str)>> = LazyLock::new(|| {
    [
        (
            r"^(automatic reply|auto[- ]?reply|autoreply|automatische antwort|réponse automatique|risposta automatica|respuesta automática|automatisch antwoord|autosvar|automaattinen vastaus|自动回复|自動回覆)\s*[:：]",
            "automatic-reply",
        ),
        (
            r"^(out of (the )?office|abwesenheitsnotiz|absence du bureau|fuori sede)(\s*[:：]|\s+(auto)?\s*reply\b|\s*$)",
            "out-of-office",
        ),
        (
            r"^(undeliverable|undelivered mail returned to sender|unzustellbar|non remis|mail delivery failed|delivery failure|returned mail|failure notice)\b",
            "undeliverable",
        ),
        (r"^delivery status notification", "delivery-status-notification"),
    ]
    .into_iter()
    .map(|(re, code)| (Regex::new(&format!("(?i){re}")).expect("static regex"), code))
    .collect()
});

fn machine_subject(subject: &str) -> Option<AutoReplyReason> {
    let s = subject.trim();
    MACHINE_SUBJECTS
        .iter()
        .find(|(re, _)| re.is_match(s))
        .map(|(_, code)| AutoReplyReason::Subject(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdrs(pairs: &[(&str, &str)]) -> MessageHeaders {
        MessageHeaders::from_pairs(pairs.iter().copied())
    }

    fn addr(s: &str) -> EmailAddress {
        EmailAddress::parse(s).unwrap()
    }

    fn code(pairs: &[(&str, &str)], from: &str, subject: &str) -> Option<String> {
        classify(&hdrs(pairs), Some(&addr(from)), subject, &[]).map(|r| r.code())
    }

    const ALICE: &str = "alice@customer.example";

    #[test]
    fn a_person_writing_is_not_flagged() {
        let h = [
            ("Content-Type", "multipart/alternative; boundary=\"x\""),
            ("Auto-Submitted", "no"),
            ("X-Auto-Response-Suppress", "None"),
            ("Precedence", "normal"),
        ];
        assert_eq!(code(&h, ALICE, "Re: Invoice"), None);
        assert_eq!(code(&[], ALICE, "Out of office planning for Q3"), None);
        assert_eq!(code(&[], "noreen@customer.example", "Question"), None);
    }

    #[test]
    fn auto_submitted_anything_but_no() {
        assert_eq!(
            code(&[("Auto-Submitted", "auto-replied")], ALICE, "x").as_deref(),
            Some("auto-submitted:auto-replied")
        );
        assert_eq!(
            code(&[("auto-submitted", "Auto-Generated; foo=bar")], ALICE, "x").as_deref(),
            Some("auto-submitted:auto-generated")
        );
        assert_eq!(
            code(&[("Auto-Submitted", "")], ALICE, "x").as_deref(),
            Some("auto-submitted:unknown")
        );
    }

    #[test]
    fn delivery_reports_via_mail_parser_content_type() {
        let dsn = [(
            "Content-Type",
            "multipart/report; report-type=delivery-status;\r\n boundary=\"b1\"",
        )];
        let r = classify(&hdrs(&dsn), Some(&addr(ALICE)), "x", &[]).unwrap();
        assert_eq!(r.code(), "report:delivery-status");
        assert!(r.is_bounce());
        let mdn = [(
            "Content-Type",
            "Multipart/Report; report-type=\"disposition-notification\"",
        )];
        assert_eq!(
            code(&mdn, ALICE, "x").as_deref(),
            Some("report:disposition-notification")
        );
    }

    #[test]
    fn x_autoreply_and_loops() {
        assert_eq!(
            code(&[("X-Autoreply", "yes")], ALICE, "x").as_deref(),
            Some("x-autoreply")
        );
        assert_eq!(
            code(&[("X-Autorespond", "1")], ALICE, "x").as_deref(),
            Some("x-autorespond")
        );
        assert_eq!(
            code(&[("X-Loop", "desk@x")], ALICE, "x").as_deref(),
            Some("loop:x-loop")
        );
        let own = [addr("Support@Desk.example")];
        let r = classify(&hdrs(&[]), Some(&addr("support@desk.example")), "Hi", &own);
        assert_eq!(r.map(|r| r.code()).as_deref(), Some("loop:own-mailbox"));
    }

    #[test]
    fn exchange_auto_response_suppress() {
        for v in ["All", "OOF", "AutoReply", "DR, RN", "NRN"] {
            assert!(
                code(&[("X-Auto-Response-Suppress", v)], ALICE, "x").is_some(),
                "{v}"
            );
        }
        assert_eq!(
            code(&[("X-Auto-Response-Suppress", "DR, OOF")], ALICE, "x").as_deref(),
            Some("x-auto-response-suppress:dr")
        );
        assert_eq!(
            code(&[("X-Auto-Response-Suppress", "None")], ALICE, "x"),
            None
        );
    }

    #[test]
    fn precedence_and_lists() {
        for v in ["bulk", "junk", "list", "auto_reply"] {
            assert_eq!(
                code(&[("Precedence", v)], ALICE, "x"),
                Some(format!("precedence:{v}"))
            );
        }
        assert_eq!(code(&[("Precedence", "first-class")], ALICE, "x"), None);
        assert_eq!(
            code(&[("List-Id", "<news.x>")], ALICE, "x").as_deref(),
            Some("list:list-id")
        );
        assert_eq!(
            code(&[("List-Unsubscribe", "<mailto:u@x>")], ALICE, "x").as_deref(),
            Some("list:list-unsubscribe")
        );
        // A list that sends no List-Id still names itself in the other RFC 2369 headers.
        assert_eq!(
            code(&[("List-Post", "<mailto:team@lists.x>")], ALICE, "x").as_deref(),
            Some("list:list-post")
        );
        assert_eq!(
            code(&[("List-Archive", "<https://lists.x/archive>")], ALICE, "x").as_deref(),
            Some("list:list-archive")
        );
    }

    #[test]
    fn system_senders() {
        for (from, want) in [
            ("MAILER-DAEMON@mx.example", "sender:mailer-daemon"),
            ("postmaster@customer.example", "sender:postmaster"),
            ("noreply@shop.example", "sender:noreply"),
            ("no-reply+billing@shop.example", "sender:noreply"),
            ("do_not_reply@shop.example", "sender:noreply"),
        ] {
            assert_eq!(code(&[], from, "Hello").as_deref(), Some(want), "{from}");
        }
    }

    #[test]
    fn machine_subjects() {
        for (subject, want) in [
            ("Automatic reply: Invoice", "subject:automatic-reply"),
            ("Automatische Antwort: Rechnung", "subject:automatic-reply"),
            ("Out of Office: Invoice", "subject:out-of-office"),
            ("Out of office", "subject:out-of-office"),
            ("Undeliverable: Invoice", "subject:undeliverable"),
            (
                "Delivery Status Notification (Failure)",
                "subject:delivery-status-notification",
            ),
        ] {
            assert_eq!(
                code(&[], ALICE, subject).as_deref(),
                Some(want),
                "{subject}"
            );
        }
    }

    #[test]
    fn strongest_signal_wins_and_values_are_tamed() {
        let h = [
            ("Precedence", "bulk"),
            ("Auto-Submitted", "auto-replied <script>"),
        ];
        assert_eq!(
            code(&h, "noreply@x.example", "Automatic reply: x").as_deref(),
            Some("auto-submitted:auto-replied")
        );
    }
}
