//! The slice of OData query syntax Graph accepts on messages: `$filter`, `$orderby`, `$select`.

use std::cmp::Ordering;

use chrono::{DateTime, NaiveDate, Utc};

use crate::state::Msg;

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Lit {
    Str(String),
    Bool(bool),
    Date(DateTime<Utc>),
    Null,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Op {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
}

#[derive(Clone, Debug)]
pub(crate) enum Expr {
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Cmp { prop: String, op: Op, lit: Lit },
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Open,
    Close,
    Str(String),
    Word(String),
}

fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let cs: Vec<char> = s.chars().collect();
    let mut out = vec![];
    let mut i = 0;
    while i < cs.len() {
        let c = cs[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '(' {
            out.push(Tok::Open);
            i += 1;
        } else if c == ')' {
            out.push(Tok::Close);
            i += 1;
        } else if c == '\'' {
            let mut v = String::new();
            i += 1;
            loop {
                match cs.get(i) {
                    None => return Err("Unterminated string literal.".into()),
                    Some('\'') if cs.get(i + 1) == Some(&'\'') => {
                        v.push('\'');
                        i += 2;
                    }
                    Some('\'') => {
                        i += 1;
                        break;
                    }
                    Some(ch) => {
                        v.push(*ch);
                        i += 1;
                    }
                }
            }
            out.push(Tok::Str(v));
        } else {
            let start = i;
            while i < cs.len() && !cs[i].is_whitespace() && cs[i] != '(' && cs[i] != ')' {
                i += 1;
            }
            out.push(Tok::Word(cs[start..i].iter().collect()));
        }
    }
    Ok(out)
}

/// Canonical name and type of a filterable/sortable message property.
pub(crate) fn canonical_prop(p: &str) -> Option<&'static str> {
    const PROPS: &[&str] = &[
        "internetMessageId",
        "subject",
        "conversationId",
        "parentFolderId",
        "id",
        "importance",
        "receivedDateTime",
        "sentDateTime",
        "createdDateTime",
        "lastModifiedDateTime",
        "isRead",
        "isDraft",
        "hasAttachments",
        "from/emailAddress/address",
        "sender/emailAddress/address",
        "from/emailAddress/name",
    ];
    PROPS.iter().copied().find(|c| c.eq_ignore_ascii_case(p))
}

fn is_date_prop(p: &str) -> bool {
    p.ends_with("DateTime")
}

pub(crate) fn parse_datetime(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(d) = DateTime::parse_from_rfc3339(s) {
        return Some(d.with_timezone(&Utc));
    }
    if let Ok(d) = chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f") {
        return Some(d.and_utc());
    }
    if let Ok(d) = chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M") {
        return Some(d.and_utc());
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|d| d.and_utc())
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
    props: Vec<String>,
}

impl Parser {
    fn peek_word(&self) -> Option<String> {
        match self.toks.get(self.pos) {
            Some(Tok::Word(w)) => Some(w.to_ascii_lowercase()),
            _ => None,
        }
    }
    fn or(&mut self) -> Result<Expr, String> {
        let mut l = self.and()?;
        while self.peek_word().as_deref() == Some("or") {
            self.pos += 1;
            let r = self.and()?;
            l = Expr::Or(Box::new(l), Box::new(r));
        }
        Ok(l)
    }
    fn and(&mut self) -> Result<Expr, String> {
        let mut l = self.unary()?;
        while self.peek_word().as_deref() == Some("and") {
            self.pos += 1;
            let r = self.unary()?;
            l = Expr::And(Box::new(l), Box::new(r));
        }
        Ok(l)
    }
    fn unary(&mut self) -> Result<Expr, String> {
        if self.peek_word().as_deref() == Some("not") {
            self.pos += 1;
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        if self.toks.get(self.pos) == Some(&Tok::Open) {
            self.pos += 1;
            let e = self.or()?;
            if self.toks.get(self.pos) != Some(&Tok::Close) {
                return Err("Syntax error: ')' expected.".into());
            }
            self.pos += 1;
            return Ok(e);
        }
        self.cmp()
    }
    fn cmp(&mut self) -> Result<Expr, String> {
        let Some(Tok::Word(prop)) = self.toks.get(self.pos).cloned() else {
            return Err("Syntax error: property expected.".into());
        };
        if self.toks.get(self.pos + 1) == Some(&Tok::Open) {
            return Err(format!(
                "The query filter function '{prop}' is not supported on this resource."
            ));
        }
        let Some(canon) = canonical_prop(&prop) else {
            return Err(format!(
                "Could not find a property named '{prop}' on type 'microsoft.graph.message'."
            ));
        };
        let op = match self.toks.get(self.pos + 1) {
            Some(Tok::Word(w)) => match w.to_ascii_lowercase().as_str() {
                "eq" => Op::Eq,
                "ne" => Op::Ne,
                "gt" => Op::Gt,
                "ge" => Op::Ge,
                "lt" => Op::Lt,
                "le" => Op::Le,
                other => return Err(format!("Syntax error: unknown operator '{other}'.")),
            },
            _ => return Err("Syntax error: operator expected.".into()),
        };
        let lit = match self.toks.get(self.pos + 2) {
            Some(Tok::Str(s)) => {
                if is_date_prop(canon) {
                    Lit::Date(
                        parse_datetime(s)
                            .ok_or_else(|| format!("Invalid DateTimeOffset value '{s}'."))?,
                    )
                } else {
                    Lit::Str(s.clone())
                }
            }
            Some(Tok::Word(w)) => match w.to_ascii_lowercase().as_str() {
                "true" => Lit::Bool(true),
                "false" => Lit::Bool(false),
                "null" => Lit::Null,
                _ => Lit::Date(
                    parse_datetime(w)
                        .ok_or_else(|| format!("Syntax error at position of '{w}'."))?,
                ),
            },
            _ => return Err("Syntax error: literal expected.".into()),
        };
        self.pos += 3;
        if !self.props.iter().any(|p| p == canon) {
            self.props.push(canon.to_string());
        }
        Ok(Expr::Cmp {
            prop: canon.to_string(),
            op,
            lit,
        })
    }
}

/// Parses `$filter`; returns the expression and the properties in order of first use.
pub(crate) fn parse_filter(s: &str) -> Result<(Expr, Vec<String>), String> {
    let mut p = Parser {
        toks: tokenize(s)?,
        pos: 0,
        props: vec![],
    };
    let e = p.or()?;
    if p.pos != p.toks.len() {
        return Err("Syntax error: unexpected token after expression.".into());
    }
    Ok((e, p.props))
}

pub(crate) fn prop_lit(m: &Msg, prop: &str) -> Lit {
    let addr = |a: &Option<crate::model::EmailAddress>, name: bool| match a {
        Some(a) if name => Lit::Str(a.name.clone()),
        Some(a) => Lit::Str(a.address.clone()),
        None => Lit::Null,
    };
    match prop {
        "internetMessageId" => Lit::Str(m.internet_message_id.clone()),
        "subject" => Lit::Str(m.subject.clone()),
        "conversationId" => Lit::Str(m.conversation_id.clone()),
        "parentFolderId" => Lit::Str(m.folder_id.clone()),
        "id" => Lit::Str(m.id.clone()),
        "importance" => Lit::Str(m.importance.clone()),
        "receivedDateTime" => Lit::Date(m.received),
        "sentDateTime" => m.sent.map(Lit::Date).unwrap_or(Lit::Null),
        "createdDateTime" => Lit::Date(m.created),
        "lastModifiedDateTime" => Lit::Date(m.last_modified),
        "isRead" => Lit::Bool(m.is_read),
        "isDraft" => Lit::Bool(m.is_draft),
        "hasAttachments" => Lit::Bool(!m.attachments.is_empty()),
        "from/emailAddress/address" => addr(&m.from, false),
        "sender/emailAddress/address" => addr(&m.sender, false),
        "from/emailAddress/name" => addr(&m.from, true),
        _ => Lit::Null,
    }
}

fn cmp_lit(a: &Lit, b: &Lit) -> Option<Ordering> {
    match (a, b) {
        (Lit::Str(x), Lit::Str(y)) => Some(x.to_lowercase().cmp(&y.to_lowercase())),
        (Lit::Bool(x), Lit::Bool(y)) => Some(x.cmp(y)),
        (Lit::Date(x), Lit::Date(y)) => Some(x.cmp(y)),
        (Lit::Null, Lit::Null) => Some(Ordering::Equal),
        _ => None,
    }
}

pub(crate) fn eval(e: &Expr, m: &Msg) -> bool {
    match e {
        Expr::And(a, b) => eval(a, m) && eval(b, m),
        Expr::Or(a, b) => eval(a, m) || eval(b, m),
        Expr::Not(a) => !eval(a, m),
        Expr::Cmp { prop, op, lit } => {
            let v = prop_lit(m, prop);
            let ord = cmp_lit(&v, lit);
            match op {
                Op::Eq => ord == Some(Ordering::Equal),
                Op::Ne => ord != Some(Ordering::Equal),
                Op::Gt => ord == Some(Ordering::Greater),
                Op::Ge => matches!(ord, Some(Ordering::Greater | Ordering::Equal)),
                Op::Lt => ord == Some(Ordering::Less),
                Op::Le => matches!(ord, Some(Ordering::Less | Ordering::Equal)),
            }
        }
    }
}

/// `$orderby=receivedDateTime desc, subject` -> `[(prop, desc)]`.
pub(crate) fn parse_orderby(s: &str) -> Result<Vec<(String, bool)>, String> {
    let mut out = vec![];
    for part in s.split(',') {
        let mut it = part.split_whitespace();
        let Some(p) = it.next() else { continue };
        let canon = canonical_prop(p).ok_or_else(|| {
            format!("Could not find a property named '{p}' on type 'microsoft.graph.message'.")
        })?;
        let desc = match it.next().map(|d| d.to_ascii_lowercase()) {
            None => false,
            Some(d) if d == "asc" => false,
            Some(d) if d == "desc" => true,
            Some(d) => return Err(format!("Syntax error: unknown sort direction '{d}'.")),
        };
        out.push((canon.to_string(), desc));
    }
    Ok(out)
}

pub(crate) fn compare(a: &Msg, b: &Msg, order: &[(String, bool)]) -> Ordering {
    for (p, desc) in order {
        let o = cmp_lit(&prop_lit(a, p), &prop_lit(b, p)).unwrap_or(Ordering::Equal);
        let o = if *desc { o.reverse() } else { o };
        if o != Ordering::Equal {
            return o;
        }
    }
    Ordering::Equal
}

/// Outlook's rule: the `$orderby` properties must lead the `$filter`, in the same order.
pub(crate) fn efficient(filter_props: &[String], order: &[(String, bool)]) -> bool {
    order.len() <= filter_props.len()
        && order
            .iter()
            .zip(filter_props)
            .all(|((o, _), f)| o.eq_ignore_ascii_case(f))
}

pub(crate) const MESSAGE_PROPS: &[&str] = &[
    "id",
    "createdDateTime",
    "lastModifiedDateTime",
    "changeKey",
    "categories",
    "receivedDateTime",
    "sentDateTime",
    "hasAttachments",
    "internetMessageId",
    "subject",
    "bodyPreview",
    "importance",
    "parentFolderId",
    "conversationId",
    "conversationIndex",
    "isDeliveryReceiptRequested",
    "isReadReceiptRequested",
    "isRead",
    "isDraft",
    "webLink",
    "inferenceClassification",
    "body",
    "uniqueBody",
    "sender",
    "from",
    "toRecipients",
    "ccRecipients",
    "bccRecipients",
    "replyTo",
    "flag",
    "internetMessageHeaders",
];

/// Properties returned without `$select`.
pub(crate) fn default_props() -> Vec<String> {
    MESSAGE_PROPS
        .iter()
        .filter(|p| **p != "uniqueBody" && **p != "internetMessageHeaders")
        .map(|p| p.to_string())
        .collect()
}

pub(crate) fn parse_select(s: &str) -> Result<Vec<String>, String> {
    let mut out = vec![];
    for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let canon = MESSAGE_PROPS
            .iter()
            .find(|c| c.eq_ignore_ascii_case(p))
            .ok_or_else(|| {
                format!("Could not find a property named '{p}' on type 'microsoft.graph.message'.")
            })?;
        out.push(canon.to_string());
    }
    Ok(out)
}
