//! Realistic help-desk mailboxes: threads with real reply headers, localized prefixes,
//! auto-replies, headerless replies and forwards. Content is a pure function of the seed.

use chrono::{Duration, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::GraphSim;
use crate::model::*;

struct Locale {
    code: &'static str,
    re: &'static str,
    fw: &'static str,
    auto: &'static str,
    domain: &'static str,
    names: &'static [&'static str],
}

const LOCALES: &[Locale] = &[
    Locale {
        code: "en",
        re: "RE: ",
        fw: "FW: ",
        auto: "Automatic reply: ",
        domain: "example.com",
        names: &["Olivia Smith", "Liam Johnson", "Emma Brown", "Noah Davis"],
    },
    Locale {
        code: "de",
        re: "AW: ",
        fw: "WG: ",
        auto: "Automatische Antwort: ",
        domain: "beispiel.de",
        names: &["Lena Müller", "Jonas Schmidt", "Mia Schneider"],
    },
    Locale {
        code: "sv",
        re: "SV: ",
        fw: "VB: ",
        auto: "Automatiskt svar: ",
        domain: "exempel.se",
        names: &["Elsa Andersson", "Oskar Johansson"],
    },
    Locale {
        code: "it",
        re: "R: ",
        fw: "I: ",
        auto: "Risposta automatica: ",
        domain: "esempio.it",
        names: &["Giulia Rossi", "Marco Bianchi"],
    },
    Locale {
        code: "nl",
        re: "Antw: ",
        fw: "Doorst: ",
        auto: "Automatisch antwoord: ",
        domain: "voorbeeld.nl",
        names: &["Sanne de Vries", "Daan Jansen"],
    },
    Locale {
        code: "zh",
        re: "回复: ",
        fw: "转发: ",
        auto: "自动回复: ",
        domain: "example.cn",
        names: &["王伟", "李娜"],
    },
];

const TOPICS: &[&str] = &[
    "Cannot log in to the portal",
    "Invoice 4711 is wrong",
    "Printer on floor 3 offline",
    "VPN disconnects every hour",
    "Request for a new laptop",
    "Password reset not arriving",
    "Order #88213 has not shipped",
    "Refund for duplicate charge",
    "Access to the shared drive",
    "Outlook keeps asking for my password",
    "Broken link on the pricing page",
    "Contract renewal question",
];

struct Planned {
    thread: usize,
    at: chrono::DateTime<Utc>,
    mail: InboundMail,
}

pub(crate) fn generate(sim: &GraphSim, owner: &SimUser, spec: &GeneratorSpec) -> GeneratedSummary {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let owner_addr = owner.mail.clone().unwrap_or(owner.upn.clone());
    let owner_domain = owner_addr
        .split('@')
        .nth(1)
        .unwrap_or("contoso.com")
        .to_string();
    let end = Utc::now() - Duration::minutes(5);
    let span_secs = i64::from(spec.days.max(1)) * 86_400;
    let start = end - Duration::seconds(span_secs);
    let mut remaining = spec.messages;
    let mut planned: Vec<Planned> = vec![];
    let mut threads: Vec<GeneratedThread> = vec![];
    let mut summary = GeneratedSummary {
        threads: 0,
        messages: 0,
        auto_replies: 0,
        headerless_replies: 0,
        forwards: 0,
        threaded_replies: 0,
        thread_details: vec![],
    };
    let mean_extra = (spec.mean_thread_length - 1.0).max(0.0);
    while remaining > 0 {
        let t = threads.len();
        let loc = &LOCALES[rng.random_range(0..LOCALES.len())];
        let name = loc.names[rng.random_range(0..loc.names.len())];
        let local: String = name
            .split_whitespace()
            .next()
            .unwrap_or("user")
            .to_lowercase()
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .collect();
        let local = if local.is_empty() {
            format!("kunde{t}")
        } else {
            local
        };
        let customer = EmailAddress::new(name, format!("{local}.{t}@{}", loc.domain));
        let topic = TOPICS[rng.random_range(0..TOPICS.len())];
        let subject = format!(
            "{topic} [{}]",
            spec.seed.wrapping_mul(1000).wrapping_add(t as u64)
        );
        let t0 = start + Duration::seconds(rng.random_range(0..span_secs.max(1)));
        let mid = |n: usize, dom: &str| format!("<{}.{t}.{n}.gen@{dom}>", spec.seed);
        let is_forward = rng.random::<f64>() < spec.forward_ratio;
        let mut detail = GeneratedThread {
            subject: String::new(),
            conversation_id: String::new(),
            kind: if is_forward { "forward" } else { "original" }.into(),
            locale: loc.code.into(),
            internet_message_ids: vec![],
            auto_replies: 0,
            headerless_replies: 0,
        };
        if is_forward {
            // A colleague forwards an outside conversation: new thread, no reply headers.
            let colleague =
                EmailAddress::new("Sam Colleague", format!("sam.colleague@{owner_domain}"));
            let s = format!("{}{subject}", loc.fw);
            let id = mid(0, &owner_domain);
            detail.subject = s.clone();
            detail.internet_message_ids.push(id.clone());
            planned.push(Planned {
                thread: t,
                at: t0,
                mail: InboundMail {
                    from: colleague,
                    subject: s,
                    html_body: Some(format!(
                        "<html><body><p>Can you take this one?</p><hr><p><b>From:</b> {name} &lt;{}&gt;<br><b>Subject:</b> {subject}</p><p>Hello, {topic}. Please help.</p></body></html>",
                        customer.address
                    )),
                    message_id: Some(id),
                    received: Some(t0),
                    ..InboundMail::default()
                },
            });
            summary.forwards += 1;
            remaining -= 1;
            threads.push(detail);
            continue;
        }
        // Geometric-ish thread length with the requested mean.
        let mut len = 1usize;
        while len < remaining && rng.random::<f64>() < mean_extra / (mean_extra + 1.0) {
            len += 1;
        }
        detail.subject = subject.clone();
        let first = mid(0, loc.domain);
        let mut refs = vec![first.clone()];
        let mut at = t0;
        planned.push(Planned {
            thread: t,
            at,
            mail: InboundMail {
                from: customer.clone(),
                subject: subject.clone(),
                text_body: Some(format!(
                    "Hello,\n\n{topic}. Could you please have a look?\n\nThanks,\n{name}"
                )),
                message_id: Some(first.clone()),
                received: Some(at),
                ..InboundMail::default()
            },
        });
        detail.internet_message_ids.push(first);
        for n in 1..len {
            // The help desk answered in between (not in this mailbox); the customer follows up.
            let agent_id = format!("<agent.{}.{t}.{n}@{owner_domain}>", spec.seed);
            refs.push(agent_id.clone());
            at += Duration::minutes(rng.random_range(20..2000));
            let id = mid(n, loc.domain);
            let roll = rng.random::<f64>();
            let mail = if roll < spec.auto_reply_ratio {
                summary.auto_replies += 1;
                detail.auto_replies += 1;
                let mut m = InboundMail {
                    from: customer.clone(),
                    subject: format!("{}{}{subject}", loc.auto, loc.re),
                    text_body: Some(
                        "I am out of the office until Monday with limited access to email.".into(),
                    ),
                    message_id: Some(id.clone()),
                    in_reply_to: Some(agent_id.clone()),
                    references: refs.clone(),
                    received: Some(at),
                    ..InboundMail::default()
                };
                m.headers
                    .push(MessageHeader::new("Auto-Submitted", "auto-replied"));
                m.headers
                    .push(MessageHeader::new("X-Auto-Response-Suppress", "All"));
                if rng.random::<f64>() < 0.5 {
                    m.headers.push(MessageHeader::new("Precedence", "bulk"));
                }
                m
            } else if roll < spec.auto_reply_ratio + spec.headerless_reply_ratio {
                summary.headerless_replies += 1;
                detail.headerless_replies += 1;
                InboundMail {
                    from: customer.clone(),
                    subject: format!("{}{subject}", loc.re),
                    text_body: Some("Sorry, one more thing (sent from my phone).".into()),
                    message_id: Some(id.clone()),
                    received: Some(at),
                    ..InboundMail::default()
                }
            } else {
                summary.threaded_replies += 1;
                let stacked = if rng.random::<f64>() < 0.2 {
                    format!("{}{}", loc.re, loc.re)
                } else {
                    loc.re.to_string()
                };
                InboundMail {
                    from: customer.clone(),
                    subject: format!("{stacked}{subject}"),
                    text_body: Some(format!(
                        "Thanks for the quick answer. It still does not work.\n\n> {topic}\n\n{name}"
                    )),
                    message_id: Some(id.clone()),
                    in_reply_to: Some(agent_id.clone()),
                    references: refs.clone(),
                    received: Some(at),
                    ..InboundMail::default()
                }
            };
            refs.push(id.clone());
            detail.internet_message_ids.push(id);
            planned.push(Planned {
                thread: t,
                at,
                mail,
            });
        }
        remaining -= len;
        threads.push(detail);
    }
    planned.sort_by_key(|p| p.at);
    let folder = spec.folder.clone();
    let mut st = sim.lock();
    for p in planned {
        let mut mail = p.mail;
        mail.folder = folder.clone();
        // Later messages join the thread's conversation even without headers.
        if !threads[p.thread].conversation_id.is_empty() {
            mail.conversation_id = Some(threads[p.thread].conversation_id.clone());
        }
        if let Ok(d) = st.deliver(&owner.id, mail) {
            if threads[p.thread].conversation_id.is_empty() {
                threads[p.thread].conversation_id = d.conversation_id;
            }
            summary.messages += 1;
        }
    }
    summary.threads = threads.len();
    summary.thread_details = threads;
    summary
}
