//! Threading as a table: each case names the stored tickets and messages, the incoming
//! message's headers, and the expected decision. One `check` runs them all.

use chrono::TimeZone;
use futures::executor::block_on;

use super::*;
use crate::mail::headers::parse_message_ids;

use TicketStatus::{Archived, Closed, Open, Pending, Solved};

/// A stored ticket: number, status, customer, days since its last message, conversationId,
/// normalised subject.
struct T(
    i64,
    TicketStatus,
    &'static str,
    i64,
    Option<&'static str>,
    &'static str,
);

/// A stored message: its Message-ID (raw, so junk ids can be stored as broken mailers do), the
/// ticket it is on, and its raw In-Reply-To and References.
struct M(&'static str, i64, &'static str, &'static str);

#[derive(Default)]
struct In {
    id: Option<&'static str>,
    in_reply_to: &'static str,
    references: &'static str,
    conversation: Option<&'static str>,
    subject: &'static str,
    from: &'static str,
    auto: bool,
}

struct Expect {
    ticket: Option<i64>,
    rule: &'static str,
    reopen: bool,
    also: &'static [i64],
    adopt: &'static [i64],
    previous: Option<i64>,
    detail: &'static str,
}

const EXPECT: Expect = Expect {
    ticket: None,
    rule: "new_ticket",
    reopen: false,
    also: &[],
    adopt: &[],
    previous: None,
    detail: "",
};

struct Case {
    name: &'static str,
    tickets: &'static [T],
    messages: &'static [M],
    input: In,
    expect: Expect,
}

const ALICE: &str = "alice@customer.example";
const BOB: &str = "bob@other.example";

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 25, 12, 0, 0).unwrap()
}

struct Memory {
    tickets: Vec<(TicketRef, Option<&'static str>, &'static str)>,
    messages: &'static [M],
    fail: bool,
    /// Ignore customer and date in subject queries, like a buggy or over-broad query would.
    loose_subject: bool,
}

impl Memory {
    fn new(tickets: &[T], messages: &'static [M]) -> Self {
        let tickets = tickets
            .iter()
            .map(|T(id, status, customer, days, conversation, subject)| {
                let ticket = TicketRef {
                    id: TicketId::new(*id),
                    status: *status,
                    customer: EmailAddress::parse(customer).unwrap(),
                    last_message_at: now() - TimeDelta::days(*days),
                };
                (ticket, *conversation, *subject)
            })
            .collect();
        Self {
            tickets,
            messages,
            fail: false,
            loose_subject: false,
        }
    }

    fn ticket(&self, id: i64) -> TicketRef {
        self.tickets
            .iter()
            .find(|(t, _, _)| t.id.get() == id)
            .map(|(t, _, _)| t.clone())
            .unwrap_or_else(|| panic!("table names unknown ticket {id}"))
    }

    fn check_up(&self, query: &'static str) -> Result<(), LookupError> {
        if self.fail {
            return Err(LookupError::Store {
                query,
                source: "database is down".into(),
            });
        }
        Ok(())
    }
}

impl ThreadLookup for Memory {
    async fn tickets_by_message_ids(
        &self,
        ids: &[InternetMessageId],
    ) -> Result<Vec<MessageIdMatch>, LookupError> {
        self.check_up("tickets_by_message_ids")?;
        Ok(ids
            .iter()
            .flat_map(|id| {
                self.messages
                    .iter()
                    .filter(|m| m.0 == id.as_str())
                    .map(|m| MessageIdMatch {
                        message_id: id.clone(),
                        ticket: self.ticket(m.1),
                    })
            })
            .collect())
    }

    async fn tickets_replying_to(
        &self,
        ids: &[InternetMessageId],
    ) -> Result<Vec<TicketRef>, LookupError> {
        self.check_up("tickets_replying_to")?;
        Ok(self
            .messages
            .iter()
            .filter(|m| {
                let mut named = parse_message_ids(m.2);
                named.extend(parse_message_ids(m.3));
                named.iter().any(|n| ids.contains(n))
            })
            .map(|m| self.ticket(m.1))
            .collect())
    }

    async fn tickets_by_conversation(
        &self,
        conversation_id: &str,
    ) -> Result<Vec<TicketRef>, LookupError> {
        self.check_up("tickets_by_conversation")?;
        Ok(self
            .tickets
            .iter()
            .filter(|(_, c, _)| *c == Some(conversation_id))
            .map(|(t, _, _)| t.clone())
            .collect())
    }

    async fn ticket_by_number(&self, id: TicketId) -> Result<Option<TicketRef>, LookupError> {
        self.check_up("ticket_by_number")?;
        Ok(self
            .tickets
            .iter()
            .find(|(t, _, _)| t.id == id)
            .map(|(t, _, _)| t.clone()))
    }

    async fn tickets_by_subject(
        &self,
        normalized_subject: &str,
        customer: &EmailAddress,
        since: DateTime<Utc>,
    ) -> Result<Vec<TicketRef>, LookupError> {
        self.check_up("tickets_by_subject")?;
        Ok(self
            .tickets
            .iter()
            .filter(|(t, _, s)| {
                *s == normalized_subject
                    && (self.loose_subject
                        || (t.customer.key() == customer.key() && t.last_message_at >= since))
            })
            .map(|(t, _, _)| t.clone())
            .collect())
    }
}

fn input(i: &In) -> ThreadInput {
    ThreadInput {
        internet_message_id: i.id.map(|id| InternetMessageId::parse(id).unwrap()),
        in_reply_to: parse_message_ids(i.in_reply_to),
        references: parse_message_ids(i.references),
        conversation_id: i.conversation.map(str::to_owned),
        subject: i.subject.to_owned(),
        from: Some(EmailAddress::parse(if i.from.is_empty() { ALICE } else { i.from }).unwrap()),
        received_at: now() - TimeDelta::minutes(5),
        is_auto_reply: i.auto,
    }
}

fn ids(raw: &[i64]) -> Vec<TicketId> {
    raw.iter().copied().map(TicketId::new).collect()
}

fn check(case: &Case) {
    let store = Memory::new(case.tickets, case.messages);
    let d = block_on(decide(
        &input(&case.input),
        &store,
        now(),
        &ThreadPolicy::default(),
    ))
    .unwrap_or_else(|e| panic!("{}: lookup failed: {e}", case.name));
    let want_target = case.expect.ticket.map_or(ThreadTarget::New, |t| {
        ThreadTarget::Existing(TicketId::new(t))
    });
    let n = case.name;
    assert_eq!(d.target, want_target, "{n}: target ({})", d.detail);
    assert_eq!(
        d.rule.as_str(),
        case.expect.rule,
        "{n}: rule ({})",
        d.detail
    );
    assert_eq!(d.reopen, case.expect.reopen, "{n}: reopen ({})", d.detail);
    assert_eq!(d.also_matches, ids(case.expect.also), "{n}: also_matches");
    assert_eq!(
        d.adopt_orphans,
        ids(case.expect.adopt),
        "{n}: adopt_orphans"
    );
    assert_eq!(
        d.previous_ticket,
        case.expect.previous.map(TicketId::new),
        "{n}: previous_ticket"
    );
    assert_eq!(d.suppress_auto_response, case.input.auto, "{n}: suppress");
    assert!(
        d.detail.contains(case.expect.detail),
        "{n}: detail {:?} lacks {:?}",
        d.detail,
        case.expect.detail
    );
}

/// The invoice ticket most subject cases thread onto: Alice's, active, mail 2 days ago.
const ALICE_INVOICE: T = T(30, Open, ALICE, 2, None, "invoice");
const BOB_INVOICE: T = T(31, Open, BOB, 1, None, "invoice");

fn subject_case(
    name: &'static str,
    subject: &'static str,
    from: &'static str,
    want: Option<i64>,
) -> Case {
    Case {
        name,
        tickets: &[ALICE_INVOICE, BOB_INVOICE],
        messages: &[],
        input: In {
            subject,
            from,
            ..In::default()
        },
        expect: match want {
            Some(t) => Expect {
                ticket: Some(t),
                rule: "subject",
                detail: "subject \"invoice\"",
                ..EXPECT
            },
            None => EXPECT,
        },
    }
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "in_reply_to names a message we received",
            tickets: &[T(1, Open, ALICE, 1, None, "printer")],
            messages: &[M("<m1@customer.example>", 1, "", "")],
            input: In {
                in_reply_to: "<m1@customer.example>",
                subject: "Re: Printer",
                ..In::default()
            },
            expect: Expect {
                ticket: Some(1),
                rule: "in_reply_to",
                detail: "In-Reply-To <m1@customer.example> → ticket 1",
                ..EXPECT
            },
        },
        Case {
            name: "in_reply_to names our own sent reply",
            tickets: &[T(2, Pending, ALICE, 1, None, "vpn")],
            messages: &[M("<ours-1@desk.example>", 2, "<m0@customer.example>", "")],
            input: In {
                in_reply_to: "<ours-1@desk.example>",
                references: "<m0@customer.example> <ours-1@desk.example>",
                ..In::default()
            },
            expect: Expect {
                ticket: Some(2),
                rule: "in_reply_to",
                ..EXPECT
            },
        },
        Case {
            name: "references only (In-Reply-To stripped by a gateway)",
            tickets: &[T(3, Open, ALICE, 1, None, "vpn")],
            messages: &[M("<root@customer.example>", 3, "", "")],
            input: In {
                references: "<root@customer.example> <unknown@x.example>",
                ..In::default()
            },
            expect: Expect {
                ticket: Some(3),
                rule: "references",
                detail: "References <root@customer.example> → ticket 3",
                ..EXPECT
            },
        },
        Case {
            name: "Outlook truncated References: root plus the last ids still thread",
            tickets: &[T(4, Open, ALICE, 1, None, "long thread")],
            messages: &[M("<root@a.example>", 4, "", "")],
            input: In {
                in_reply_to: "<r9@b.example>",
                references: "<root@a.example>\r\n <r8@a.example>\r\n <r9@b.example>",
                ..In::default()
            },
            expect: Expect {
                ticket: Some(4),
                rule: "references",
                ..EXPECT
            },
        },
        Case {
            name: "junk ids without @ never match, even when stored",
            tickets: &[T(5, Open, BOB, 1, None, "other")],
            messages: &[M("<1234567>", 5, "", ""), M("1234567", 5, "", "")],
            input: In {
                in_reply_to: "<1234567>",
                references: "1234567",
                ..In::default()
            },
            expect: EXPECT,
        },
        Case {
            name: "missing parent falls through to conversationId",
            tickets: &[T(6, Open, ALICE, 1, Some("conv-6"), "printer")],
            messages: &[],
            input: In {
                in_reply_to: "<never-seen@customer.example>",
                conversation: Some("conv-6"),
                ..In::default()
            },
            expect: Expect {
                ticket: Some(6),
                rule: "conversation_id",
                detail: "conversationId conv-6 → ticket 6",
                ..EXPECT
            },
        },
        Case {
            name: "missing parent and nothing else: new ticket",
            tickets: &[T(6, Open, ALICE, 1, Some("conv-6"), "printer")],
            messages: &[],
            input: In {
                in_reply_to: "<never-seen@customer.example>",
                subject: "Re: Hello",
                ..In::default()
            },
            expect: Expect {
                detail: "no threading evidence",
                ..EXPECT
            },
        },
        Case {
            name: "headers beat conversationId",
            tickets: &[
                T(7, Open, ALICE, 1, None, "a"),
                T(8, Open, ALICE, 1, Some("conv-8"), "b"),
            ],
            messages: &[M("<p7@customer.example>", 7, "", "")],
            input: In {
                in_reply_to: "<p7@customer.example>",
                conversation: Some("conv-8"),
                ..In::default()
            },
            expect: Expect {
                ticket: Some(7),
                rule: "in_reply_to",
                ..EXPECT
            },
        },
        Case {
            name: "headers naming two tickets: oldest active wins, the other is reported",
            tickets: &[
                T(9, Open, ALICE, 3, None, "a"),
                T(12, Pending, ALICE, 1, None, "a"),
            ],
            messages: &[
                M("<root@customer.example>", 9, "", ""),
                M("<p12@desk.example>", 12, "", ""),
            ],
            input: In {
                in_reply_to: "<p12@desk.example>",
                references: "<root@customer.example> <p12@desk.example>",
                ..In::default()
            },
            expect: Expect {
                ticket: Some(9),
                rule: "references",
                also: &[12],
                detail: "also matches ticket 12",
                ..EXPECT
            },
        },
        Case {
            name: "active beats archived among header matches; the archived one is not merged",
            tickets: &[
                T(2, Archived, ALICE, 1, None, "a"),
                T(13, Solved, ALICE, 2, None, "a"),
            ],
            messages: &[
                M("<old@customer.example>", 2, "", ""),
                M("<new@desk.example>", 13, "", ""),
            ],
            input: In {
                in_reply_to: "<old@customer.example>",
                references: "<new@desk.example>",
                ..In::default()
            },
            expect: Expect {
                ticket: Some(13),
                rule: "references",
                also: &[],
                ..EXPECT
            },
        },
        Case {
            name: "active beats archived within one conversation; the archived one is not merged",
            tickets: &[
                T(14, Archived, ALICE, 1, Some("conv"), "a"),
                T(15, Open, ALICE, 9, Some("conv"), "a"),
            ],
            messages: &[],
            input: In {
                conversation: Some("conv"),
                ..In::default()
            },
            expect: Expect {
                ticket: Some(15),
                rule: "conversation_id",
                also: &[],
                ..EXPECT
            },
        },
        Case {
            name: "reply to a recently closed ticket reopens it",
            tickets: &[T(16, Closed, ALICE, 3, None, "a")],
            messages: &[M("<ours@desk.example>", 16, "", "")],
            input: In {
                in_reply_to: "<ours@desk.example>",
                ..In::default()
            },
            expect: Expect {
                ticket: Some(16),
                rule: "in_reply_to",
                reopen: true,
                detail: "(closed; reopened)",
                ..EXPECT
            },
        },
        Case {
            name: "reply to a long-closed ticket opens a new one linked to it",
            tickets: &[T(17, Closed, ALICE, 40, None, "a")],
            messages: &[M("<ours@desk.example>", 17, "", "")],
            input: In {
                in_reply_to: "<ours@desk.example>",
                ..In::default()
            },
            expect: Expect {
                previous: Some(17),
                detail: "new ticket linked to 17",
                ..EXPECT
            },
        },
        Case {
            name: "archived tickets are never reopened, even when recent",
            tickets: &[T(18, Archived, ALICE, 1, None, "a")],
            messages: &[M("<ours@desk.example>", 18, "", "")],
            input: In {
                in_reply_to: "<ours@desk.example>",
                ..In::default()
            },
            expect: Expect {
                previous: Some(18),
                detail: "archived",
                ..EXPECT
            },
        },
        Case {
            name: "stale header match, but the conversation already has a fresh ticket; the stale one is not merged",
            tickets: &[
                T(19, Closed, ALICE, 60, Some("c19"), "a"),
                T(25, Open, ALICE, 5, Some("c19"), "a"),
            ],
            messages: &[M("<old@desk.example>", 19, "", "")],
            input: In {
                in_reply_to: "<old@desk.example>",
                conversation: Some("c19"),
                ..In::default()
            },
            expect: Expect {
                ticket: Some(25),
                rule: "conversation_id",
                also: &[],
                ..EXPECT
            },
        },
        Case {
            name: "ticket token in the subject",
            tickets: &[T(21, Open, BOB, 1, None, "invoice")],
            messages: &[],
            input: In {
                subject: "Re: Invoice [#21]",
                ..In::default()
            },
            expect: Expect {
                ticket: Some(21),
                rule: "ticket_token",
                detail: "subject token [#21] → ticket 21",
                ..EXPECT
            },
        },
        Case {
            name: "[Ticket #n] form of the token",
            tickets: &[T(22, Pending, ALICE, 1, None, "x")],
            messages: &[],
            input: In {
                subject: "AW: [Ticket #22] Lieferung",
                ..In::default()
            },
            expect: Expect {
                ticket: Some(22),
                rule: "ticket_token",
                ..EXPECT
            },
        },
        Case {
            name: "token naming no ticket of this tenant falls through to subject",
            tickets: &[ALICE_INVOICE],
            messages: &[],
            input: In {
                subject: "Re: Invoice [#999]",
                ..In::default()
            },
            expect: Expect {
                ticket: Some(30),
                rule: "subject",
                ..EXPECT
            },
        },
        Case {
            name: "conversationId beats the ticket token",
            tickets: &[
                T(23, Open, ALICE, 1, Some("c23"), "a"),
                T(24, Open, ALICE, 1, None, "b"),
            ],
            messages: &[],
            input: In {
                conversation: Some("c23"),
                subject: "Re: b [#24]",
                ..In::default()
            },
            expect: Expect {
                ticket: Some(23),
                rule: "conversation_id",
                ..EXPECT
            },
        },
        subject_case(
            "subject: RE: from the same customer",
            "RE: Invoice",
            ALICE,
            Some(30),
        ),
        subject_case("subject: German AW:", "AW: Invoice", ALICE, Some(30)),
        subject_case("subject: Swedish SV:", "SV: Invoice", ALICE, Some(30)),
        subject_case("subject: Italian R:", "R: Invoice", ALICE, Some(30)),
        subject_case("subject: Chinese 回复:", "回复：Invoice", ALICE, Some(30)),
        subject_case("subject: Dutch Antw:", "Antw: Invoice", ALICE, Some(30)),
        subject_case(
            "subject: stacked and list-tagged",
            "[billing] AW: WG: RE[2]: invoice",
            ALICE,
            Some(30),
        ),
        subject_case(
            "Re: Invoice from a second customer goes to that customer's ticket",
            "Re: Invoice",
            BOB,
            Some(31),
        ),
        subject_case(
            "Re: Invoice from a third customer is a new ticket",
            "Re: Invoice",
            "carol@third.example",
            None,
        ),
        subject_case(
            "Fwd: from a different customer does not subject-match",
            "Fwd: Invoice",
            "dave@fwd.example",
            None,
        ),
        subject_case(
            "Fwd: from the same customer does",
            "Fwd: Invoice",
            ALICE,
            Some(30),
        ),
        subject_case(
            "a fresh subject (no prefix) is a new request",
            "Invoice",
            ALICE,
            None,
        ),
        Case {
            name: "subject match needs a recent ticket",
            tickets: &[T(32, Open, ALICE, 20, None, "invoice")],
            messages: &[],
            input: In {
                subject: "Re: Invoice",
                ..In::default()
            },
            expect: EXPECT,
        },
        Case {
            name: "subject match needs an active ticket",
            tickets: &[T(33, Closed, ALICE, 1, None, "invoice")],
            messages: &[],
            input: In {
                subject: "Re: Invoice",
                ..In::default()
            },
            expect: EXPECT,
        },
        Case {
            name: "reply before its parent: the parent joins the reply's ticket",
            tickets: &[T(40, Open, ALICE, 0, None, "order")],
            messages: &[M(
                "<child@customer.example>",
                40,
                "<parent@customer.example>",
                "<parent@customer.example>",
            )],
            input: In {
                id: Some("<parent@customer.example>"),
                subject: "Order",
                ..In::default()
            },
            expect: Expect {
                ticket: Some(40),
                rule: "referenced_by",
                detail: "names this message → ticket 40",
                ..EXPECT
            },
        },
        Case {
            name: "parent with its own evidence adopts the orphan's ticket",
            tickets: &[
                T(41, Open, ALICE, 2, None, "order"),
                T(45, Open, ALICE, 0, None, "order"),
            ],
            messages: &[
                M("<grandparent@desk.example>", 41, "", ""),
                M(
                    "<child@customer.example>",
                    45,
                    "",
                    "<grandparent@desk.example> <parent@customer.example>",
                ),
            ],
            input: In {
                id: Some("<parent@customer.example>"),
                in_reply_to: "<grandparent@desk.example>",
                ..In::default()
            },
            expect: Expect {
                ticket: Some(41),
                rule: "in_reply_to",
                adopt: &[45],
                detail: "adopts earlier replies on ticket 45",
                ..EXPECT
            },
        },
        Case {
            name: "a message listing its own id is not its own evidence",
            tickets: &[T(46, Open, ALICE, 1, None, "x")],
            messages: &[M("<self@customer.example>", 46, "", "")],
            input: In {
                id: Some("<self@customer.example>"),
                references: "<self@customer.example>",
                ..In::default()
            },
            expect: EXPECT,
        },
        Case {
            name: "auto-reply is threaded and flagged but does not reopen",
            tickets: &[T(50, Closed, ALICE, 1, None, "a")],
            messages: &[M("<ours@desk.example>", 50, "", "")],
            input: In {
                in_reply_to: "<ours@desk.example>",
                subject: "Automatic reply: a",
                auto: true,
                ..In::default()
            },
            expect: Expect {
                ticket: Some(50),
                rule: "in_reply_to",
                detail: "auto-reply does not reopen",
                ..EXPECT
            },
        },
        Case {
            name: "unmatched auto-reply is flagged",
            tickets: &[],
            messages: &[],
            input: In {
                subject: "Out of Office",
                auto: true,
                ..In::default()
            },
            expect: Expect {
                detail: "; auto-reply",
                ..EXPECT
            },
        },
    ]
}

#[test]
fn threading_table() {
    let cases = cases();
    let mut names = HashSet::new();
    for case in &cases {
        assert!(names.insert(case.name), "duplicate case name {}", case.name);
        check(case);
    }
}

#[test]
fn localized_reply_windows_are_configurable() {
    let store = Memory::new(&[T(60, Open, ALICE, 10, None, "invoice")], &[]);
    let msg = input(&In {
        subject: "SV: Invoice",
        ..In::default()
    });
    let narrow = ThreadPolicy {
        subject_window: TimeDelta::days(7),
        ..ThreadPolicy::default()
    };
    let d = block_on(decide(&msg, &store, now(), &narrow)).unwrap();
    assert_eq!(d.target, ThreadTarget::New);
    let d = block_on(decide(&msg, &store, now(), &ThreadPolicy::default())).unwrap();
    assert_eq!(d.target, ThreadTarget::Existing(TicketId::new(60)));
}

#[test]
fn windows_count_from_received_time_for_backfills() {
    // Mail received 30 days ago, replying by subject to a ticket active 32 days ago.
    let store = Memory::new(&[T(61, Open, ALICE, 32, None, "invoice")], &[]);
    let mut msg = input(&In {
        subject: "Re: Invoice",
        ..In::default()
    });
    msg.received_at = now() - TimeDelta::days(30);
    let d = block_on(decide(&msg, &store, now(), &ThreadPolicy::default())).unwrap();
    assert_eq!(d.target, ThreadTarget::Existing(TicketId::new(61)));
}

#[test]
fn subject_guard_holds_even_when_the_lookup_over_returns() {
    let mut store = Memory::new(&[ALICE_INVOICE, T(62, Open, BOB, 30, None, "invoice")], &[]);
    store.loose_subject = true;
    let policy = ThreadPolicy::default();
    // Another customer's ticket must not capture Bob's mail, nor may his own stale one.
    let bob = input(&In {
        subject: "Re: Invoice",
        from: BOB,
        ..In::default()
    });
    let d = block_on(decide(&bob, &store, now(), &policy)).unwrap();
    assert_eq!(d.target, ThreadTarget::New, "{}", d.detail);
    let alice = input(&In {
        subject: "Re: Invoice",
        ..In::default()
    });
    let d = block_on(decide(&alice, &store, now(), &policy)).unwrap();
    assert_eq!(
        d.target,
        ThreadTarget::Existing(TicketId::new(30)),
        "{}",
        d.detail
    );
}

#[test]
fn lookup_failures_propagate() {
    let mut store = Memory::new(&[], &[]);
    store.fail = true;
    let msg = input(&In {
        in_reply_to: "<p@x.example>",
        ..In::default()
    });
    let err = block_on(decide(&msg, &store, now(), &ThreadPolicy::default())).unwrap_err();
    assert!(err.to_string().contains("tickets_by_message_ids"), "{err}");
    assert!(std::error::Error::source(&err).is_some());
}

#[test]
fn rule_strings_are_stable() {
    let all = [
        (ThreadRule::InReplyTo, "in_reply_to"),
        (ThreadRule::References, "references"),
        (ThreadRule::ReferencedBy, "referenced_by"),
        (ThreadRule::ConversationId, "conversation_id"),
        (ThreadRule::TicketToken, "ticket_token"),
        (ThreadRule::Subject, "subject"),
        (ThreadRule::NewTicket, "new_ticket"),
    ];
    for (rule, s) in all {
        assert_eq!(rule.as_str(), s);
        assert_eq!(rule.to_string(), s);
    }
}

#[test]
fn ticket_status_round_trips() {
    for s in [Open, Pending, Solved, Closed, Archived] {
        assert_eq!(s.as_str().parse::<TicketStatus>(), Ok(s));
    }
    assert!("deleted".parse::<TicketStatus>().is_err());
    assert!(Solved.is_active() && !Closed.is_active() && !Archived.is_active());
}

#[test]
fn ids_this_message_answers_for_is_its_own_id() {
    let msg = input(&In {
        id: Some("<me@x.example>"),
        in_reply_to: "<p@x.example>",
        ..In::default()
    });
    let ids = msg.ids_this_message_answers_for();
    assert_eq!(ids.len(), 1);
    assert_eq!(ids[0].as_str(), "<me@x.example>");
    let anonymous = input(&In::default());
    assert!(anonymous.ids_this_message_answers_for().is_empty());
}

#[test]
fn decide_is_send_for_multithreaded_workers() {
    fn assert_send<F: Future + Send>(_: F) {}
    let store = Memory::new(&[], &[]);
    let msg = input(&In::default());
    let policy = ThreadPolicy::default();
    assert_send(decide(&msg, &store, now(), &policy));
}
