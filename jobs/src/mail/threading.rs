//! Which ticket does an inbound message belong to? An explainable rule engine: every decision
//! names the rule that matched ([`ThreadRule::as_str`], stored in `helpdesk_messages.thread_rule`)
//! and a human-readable trail (`thread_detail`, e.g. `In-Reply-To <a@b> → ticket 42`).
//!
//! Rules, strongest evidence first; the first rule that yields a usable ticket wins:
//!
//! 1. `in_reply_to` / `references`: the message answers a Message-ID we know (one we received or
//!    one we sent). Both headers are looked up in one round trip.
//! 2. `referenced_by`: a message already stored names *this* message in its In-Reply-To or
//!    References, i.e. a reply arrived before its parent. The parent joins the reply's ticket.
//! 3. `conversation_id`: Graph's conversationId.
//! 4. `ticket_token`: a `[#42]` token in the subject naming an existing ticket of this tenant.
//! 5. `subject`: same normalised subject, the subject is a reply/forward, the SAME customer
//!    address, the ticket had mail within [`ThreadPolicy::subject_window`], and it is active.
//! 6. `new_ticket`.
//!
//! Choosing among a rule's candidates: active tickets (open, pending, solved) win, and among
//! those the oldest (lowest number), so that the survivor of a later merge is stable; the other
//! candidates that are active or closed within the reopen window are reported in
//! [`ThreadDecision::also_matches`] for the caller to merge. Archived and long-closed candidates
//! are left alone, as the policy below leaves them.
//!
//! Closed and archived tickets (the policy): a message whose evidence leads only to inactive
//! tickets
//! - reopens a **closed** ticket whose last message is within [`ThreadPolicy::reopen_window`] of
//!   this message (the customer is answering a conversation that only just ended);
//! - otherwise the engine keeps looking with the later rules (an earlier follow-up may already
//!   have opened a new ticket for this conversation), and if nothing active turns up it decides
//!   for a **new ticket** whose `thread_detail` and [`ThreadDecision::previous_ticket`] link the
//!   old one. Archived tickets are never reopened.
//!
//! Auto-replies are threaded like any other mail (an out-of-office belongs on its ticket) but
//! never reopen a ticket, and the decision tells the caller not to respond automatically.
//!
//! Merges are the lookup's business: a [`ThreadLookup`] returns the surviving ticket for
//! messages of a ticket that was merged into another.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::future::Future;

use chrono::{DateTime, TimeDelta, Utc};

use super::subject::{is_reply_or_forward, normalize_subject, ticket_token};
use crate::ids::{EmailAddress, InternetMessageId, TicketId};

/// A ticket's status as stored in `helpdesk_tickets.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TicketStatus {
    Open,
    Pending,
    Solved,
    Closed,
    Archived,
}

impl TicketStatus {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Pending => "pending",
            Self::Solved => "solved",
            Self::Closed => "closed",
            Self::Archived => "archived",
        }
    }

    /// Solved counts as active: a customer answering a solved ticket is the usual way of saying
    /// "it is not solved after all".
    #[must_use]
    pub const fn is_active(self) -> bool {
        matches!(self, Self::Open | Self::Pending | Self::Solved)
    }
}

/// A status string that is not one of the schema's values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown ticket status `{0}`: expected open, pending, solved, closed or archived")]
pub struct UnknownTicketStatus(pub String);

impl std::str::FromStr for TicketStatus {
    type Err = UnknownTicketStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "open" => Ok(Self::Open),
            "pending" => Ok(Self::Pending),
            "solved" => Ok(Self::Solved),
            "closed" => Ok(Self::Closed),
            "archived" => Ok(Self::Archived),
            other => Err(UnknownTicketStatus(other.to_owned())),
        }
    }
}

/// What the engine needs to know about a candidate ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketRef {
    pub id: TicketId,
    pub status: TicketStatus,
    pub customer: EmailAddress,
    pub last_message_at: DateTime<Utc>,
}

/// A known Message-ID and the ticket its message is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageIdMatch {
    pub message_id: InternetMessageId,
    pub ticket: TicketRef,
}

/// The storage behind a lookup failed; threading cannot decide without it, so the job retries.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("threading lookup `{query}` failed")]
    Store {
        query: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The queries threading needs, implemented by the storage layer. Every query is scoped to the
/// tenant the implementation was built for.
pub trait ThreadLookup: Sync {
    /// Tickets holding a message with one of these Message-IDs: inbound messages and our own
    /// sent replies alike (`helpdesk_messages.internet_message_id` and
    /// `helpdesk_outbound_sends.internet_message_id`).
    fn tickets_by_message_ids(
        &self,
        ids: &[InternetMessageId],
    ) -> impl Future<Output = Result<Vec<MessageIdMatch>, LookupError>> + Send;

    /// Tickets holding a message whose In-Reply-To or References contains one of these ids
    /// (replies that arrived before their parent).
    fn tickets_replying_to(
        &self,
        ids: &[InternetMessageId],
    ) -> impl Future<Output = Result<Vec<TicketRef>, LookupError>> + Send;

    /// Tickets with this Graph conversationId.
    fn tickets_by_conversation(
        &self,
        conversation_id: &str,
    ) -> impl Future<Output = Result<Vec<TicketRef>, LookupError>> + Send;

    /// The ticket with this number, if it exists for this tenant.
    fn ticket_by_number(
        &self,
        id: TicketId,
    ) -> impl Future<Output = Result<Option<TicketRef>, LookupError>> + Send;

    /// Tickets with this normalised subject for this customer with mail since `since`.
    fn tickets_by_subject(
        &self,
        normalized_subject: &str,
        customer: &EmailAddress,
        since: DateTime<Utc>,
    ) -> impl Future<Output = Result<Vec<TicketRef>, LookupError>> + Send;
}

/// The message being threaded, already parsed (see [`super::headers`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadInput {
    pub internet_message_id: Option<InternetMessageId>,
    pub in_reply_to: Vec<InternetMessageId>,
    pub references: Vec<InternetMessageId>,
    pub conversation_id: Option<String>,
    pub subject: String,
    pub from: Option<EmailAddress>,
    pub received_at: DateTime<Utc>,
    pub is_auto_reply: bool,
}

impl ThreadInput {
    /// The ids by which other messages refer to this one; stored replies that name one of them
    /// in In-Reply-To or References arrived before this message and belong with it.
    #[must_use]
    pub fn ids_this_message_answers_for(&self) -> Vec<InternetMessageId> {
        self.internet_message_id.iter().cloned().collect()
    }
}

/// Tunables; the defaults suit a typical help desk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadPolicy {
    /// How recent a ticket's last message must be for a subject-only match.
    pub subject_window: TimeDelta,
    /// How recent a closed ticket's last message must be for a reply to reopen it.
    pub reopen_window: TimeDelta,
}

impl Default for ThreadPolicy {
    fn default() -> Self {
        Self {
            subject_window: TimeDelta::days(14),
            reopen_window: TimeDelta::days(14),
        }
    }
}

/// The rule that put a message on its ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadRule {
    InReplyTo,
    References,
    ReferencedBy,
    ConversationId,
    TicketToken,
    Subject,
    NewTicket,
}

impl ThreadRule {
    /// The value stored in `helpdesk_messages.thread_rule`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InReplyTo => "in_reply_to",
            Self::References => "references",
            Self::ReferencedBy => "referenced_by",
            Self::ConversationId => "conversation_id",
            Self::TicketToken => "ticket_token",
            Self::Subject => "subject",
            Self::NewTicket => "new_ticket",
        }
    }
}

impl std::fmt::Display for ThreadRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadTarget {
    Existing(TicketId),
    New,
}

/// The engine's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadDecision {
    pub target: ThreadTarget,
    pub rule: ThreadRule,
    /// For `thread_detail`: the evidence, e.g. `In-Reply-To <a@b> → ticket 42`.
    pub detail: String,
    /// The target is a closed ticket that this message reopens.
    pub reopen: bool,
    /// Other tickets the deciding rule also pointed at (ascending) that are active or closed
    /// within the reopen window: the same conversation split over several tickets, for the
    /// caller to merge into the target. Archived and long-closed ones are not listed.
    pub also_matches: Vec<TicketId>,
    /// Tickets (other than the target, ascending) holding replies that arrived before this
    /// message; they belong with the target.
    pub adopt_orphans: Vec<TicketId>,
    /// With a new ticket: the closed or archived ticket the evidence pointed at, to link.
    pub previous_ticket: Option<TicketId>,
    /// The message is an auto-reply, bounce or list mail: never answer it automatically.
    pub suppress_auto_response: bool,
}

struct Candidate {
    ticket: TicketRef,
    rule: ThreadRule,
    evidence: String,
}

enum Choice {
    Chosen {
        candidate: Candidate,
        reopen: bool,
        also: Vec<TicketId>,
    },
    /// Only inactive tickets too old to reopen; remembered for linking.
    Stale(Candidate),
    Nothing,
}

/// Decides which ticket `input` belongs to. See the module documentation for the rules.
///
/// Windows are measured from the message's received time (capped at `now` against clock skew),
/// so back-filling old mail threads as it would have when it arrived.
pub async fn decide<L: ThreadLookup>(
    input: &ThreadInput,
    lookup: &L,
    now: DateTime<Utc>,
    policy: &ThreadPolicy,
) -> Result<ThreadDecision, LookupError> {
    let at = input.received_at.min(now);
    let own_id = input.internet_message_id.as_ref();
    let mut stale: Option<Candidate> = None;

    let own_ids = input.ids_this_message_answers_for();
    let orphans = if own_ids.is_empty() {
        Vec::new()
    } else {
        lookup.tickets_replying_to(&own_ids).await?
    };

    let chosen = 'rules: {
        // A message naming itself (broken mailers, or a re-ingested copy) is no evidence.
        let mut seen = HashSet::new();
        let in_reply_to: Vec<&InternetMessageId> = input
            .in_reply_to
            .iter()
            .filter(|id| Some(*id) != own_id && seen.insert(*id))
            .collect();
        let references: Vec<&InternetMessageId> = input
            .references
            .iter()
            .filter(|id| Some(*id) != own_id && seen.insert(*id))
            .collect();
        if !in_reply_to.is_empty() || !references.is_empty() {
            let ids: Vec<InternetMessageId> = in_reply_to
                .iter()
                .chain(&references)
                .map(|id| (*id).clone())
                .collect();
            let matches = lookup.tickets_by_message_ids(&ids).await?;
            // In-Reply-To evidence first so a ticket found by both is explained by the parent.
            let mut candidates = Vec::new();
            for (header, rule, list) in [
                ("In-Reply-To", ThreadRule::InReplyTo, &in_reply_to),
                ("References", ThreadRule::References, &references),
            ] {
                for id in list.iter() {
                    for m in matches.iter().filter(|m| &m.message_id == *id) {
                        candidates.push(Candidate {
                            ticket: m.ticket.clone(),
                            rule,
                            evidence: format!("{header} {id}"),
                        });
                    }
                }
            }
            if let Some(c) = settle(choose(candidates, at, policy, input), &mut stale) {
                break 'rules Some(c);
            }
        }

        let candidates = orphans
            .iter()
            .map(|t| Candidate {
                ticket: t.clone(),
                rule: ThreadRule::ReferencedBy,
                evidence: "a reply stored earlier names this message".to_owned(),
            })
            .collect();
        if let Some(c) = settle(choose(candidates, at, policy, input), &mut stale) {
            break 'rules Some(c);
        }

        if let Some(conversation) = input.conversation_id.as_deref().filter(|c| !c.is_empty()) {
            let candidates = lookup
                .tickets_by_conversation(conversation)
                .await?
                .into_iter()
                .map(|ticket| Candidate {
                    ticket,
                    rule: ThreadRule::ConversationId,
                    evidence: format!("conversationId {conversation}"),
                })
                .collect();
            if let Some(c) = settle(choose(candidates, at, policy, input), &mut stale) {
                break 'rules Some(c);
            }
        }

        if let Some(number) = ticket_token(&input.subject) {
            let candidates = lookup
                .ticket_by_number(number)
                .await?
                .into_iter()
                .map(|ticket| Candidate {
                    ticket,
                    rule: ThreadRule::TicketToken,
                    evidence: format!("subject token [#{number}]"),
                })
                .collect();
            if let Some(c) = settle(choose(candidates, at, policy, input), &mut stale) {
                break 'rules Some(c);
            }
        }

        if let Some(from) = &input.from
            && is_reply_or_forward(&input.subject)
        {
            let normalized = normalize_subject(&input.subject);
            if !normalized.is_empty() {
                let since = at - policy.subject_window;
                let customer = from.key();
                // The lookup filters too; re-checking keeps the guard true whatever it returns,
                // because a wrong subject match merges two customers' conversations.
                let candidates = lookup
                    .tickets_by_subject(&normalized, from, since)
                    .await?
                    .into_iter()
                    .filter(|t| {
                        t.status.is_active()
                            && t.customer.key() == customer
                            && t.last_message_at >= since
                    })
                    .map(|ticket| Candidate {
                        ticket,
                        rule: ThreadRule::Subject,
                        evidence: format!("subject \"{normalized}\" from {from}"),
                    })
                    .collect();
                if let Choice::Chosen {
                    candidate, reopen, ..
                } = choose(candidates, at, policy, input)
                {
                    // Subject equality is weak evidence: never a reason to merge tickets.
                    break 'rules Some((candidate, reopen, Vec::new()));
                }
            }
        }
        None
    };

    Ok(build_decision(input, chosen, stale, &orphans))
}

/// Keeps the first stale candidate for linking; returns a usable choice.
fn settle(
    choice: Choice,
    stale: &mut Option<Candidate>,
) -> Option<(Candidate, bool, Vec<TicketId>)> {
    match choice {
        Choice::Chosen {
            candidate,
            reopen,
            also,
        } => Some((candidate, reopen, also)),
        Choice::Stale(candidate) => {
            stale.get_or_insert(candidate);
            None
        }
        Choice::Nothing => None,
    }
}

fn choose(
    candidates: Vec<Candidate>,
    at: DateTime<Utc>,
    policy: &ThreadPolicy,
    input: &ThreadInput,
) -> Choice {
    // One candidate per ticket, keeping the first (strongest) evidence.
    let mut seen = HashSet::new();
    let candidates: Vec<Candidate> = candidates
        .into_iter()
        .filter(|c| seen.insert(c.ticket.id))
        .collect();
    let reopen_since = at - policy.reopen_window;
    // Only tickets this message could have been threaded onto are merged into its target. An
    // archived ticket, or one closed before the reopen window, stays as it is: the policy
    // started a new ticket instead of reopening it, and a merge would undo that.
    let others = |chosen: TicketId| {
        let mut ids: Vec<TicketId> = candidates
            .iter()
            .filter(|c| {
                c.ticket.status.is_active()
                    || (c.ticket.status == TicketStatus::Closed
                        && c.ticket.last_message_at >= reopen_since)
            })
            .map(|c| c.ticket.id)
            .filter(|id| *id != chosen)
            .collect();
        ids.sort();
        ids
    };

    let oldest_active = candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.ticket.status.is_active())
        .min_by_key(|(_, c)| c.ticket.id)
        .map(|(i, _)| i);
    let freshest_closed = candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| {
            c.ticket.status == TicketStatus::Closed && c.ticket.last_message_at >= reopen_since
        })
        .max_by_key(|(_, c)| (c.ticket.last_message_at, std::cmp::Reverse(c.ticket.id)))
        .map(|(i, _)| i);

    let (index, reopen) = match (oldest_active, freshest_closed) {
        (Some(i), _) => (i, false),
        (None, Some(i)) => (i, !input.is_auto_reply),
        (None, None) => {
            let most_recent = candidates
                .into_iter()
                .max_by_key(|c| (c.ticket.last_message_at, std::cmp::Reverse(c.ticket.id)));
            return most_recent.map_or(Choice::Nothing, Choice::Stale);
        }
    };
    let also = others(candidates[index].ticket.id);
    let mut candidates = candidates;
    Choice::Chosen {
        candidate: candidates.swap_remove(index),
        reopen,
        also,
    }
}

fn build_decision(
    input: &ThreadInput,
    chosen: Option<(Candidate, bool, Vec<TicketId>)>,
    stale: Option<Candidate>,
    orphans: &[TicketRef],
) -> ThreadDecision {
    let mut detail = String::new();
    let (target, rule, reopen, also_matches, previous_ticket) = match chosen {
        Some((c, reopen, also)) => {
            let id = c.ticket.id;
            let _ = write!(detail, "{} → ticket {id}", c.evidence);
            if reopen {
                let _ = write!(detail, " (closed; reopened)");
            } else if c.ticket.status == TicketStatus::Closed {
                let _ = write!(detail, " (closed; auto-reply does not reopen)");
            }
            if !also.is_empty() {
                let _ = write!(detail, "; also matches {}", join(&also));
            }
            (ThreadTarget::Existing(id), c.rule, reopen, also, None)
        }
        None => {
            match &stale {
                Some(c) => {
                    let _ = write!(
                        detail,
                        "{} → ticket {} ({}, last message {}): new ticket linked to {}",
                        c.evidence,
                        c.ticket.id,
                        c.ticket.status.as_str(),
                        c.ticket.last_message_at.format("%Y-%m-%d"),
                        c.ticket.id
                    );
                }
                None => detail.push_str("no threading evidence: new ticket"),
            }
            (
                ThreadTarget::New,
                ThreadRule::NewTicket,
                false,
                Vec::new(),
                stale.as_ref().map(|c| c.ticket.id),
            )
        }
    };

    let mut adopt_orphans: Vec<TicketId> = orphans
        .iter()
        .map(|t| t.id)
        .filter(|id| ThreadTarget::Existing(*id) != target)
        .collect();
    adopt_orphans.sort();
    adopt_orphans.dedup();
    if !adopt_orphans.is_empty() {
        let _ = write!(
            detail,
            "; adopts earlier replies on {}",
            join(&adopt_orphans)
        );
    }
    if input.is_auto_reply {
        detail.push_str("; auto-reply");
    }

    ThreadDecision {
        target,
        rule,
        detail,
        reopen,
        also_matches,
        adopt_orphans,
        previous_ticket,
        suppress_auto_response: input.is_auto_reply,
    }
}

fn join(ids: &[TicketId]) -> String {
    let words: Vec<String> = ids.iter().map(|id| format!("ticket {id}")).collect();
    words.join(", ")
}

#[cfg(test)]
mod tests;
