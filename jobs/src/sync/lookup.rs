//! Threading lookups for one page of mail: everything the rule engine may ask is fetched in a
//! handful of set-based queries up front, then answered from memory, including the messages
//! decided earlier in the same page (a reply and its parent can arrive together).

use std::collections::HashMap;
use std::future::Future;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use crate::ids::{EmailAddress, InternetMessageId, TenantId, TicketId};
use crate::mail::threading::{
    LookupError, MessageIdMatch, ThreadInput, ThreadLookup, TicketRef, TicketStatus,
};

#[derive(Debug, Clone)]
struct KnownMessage {
    internet_id: Option<InternetMessageId>,
    in_reply_to: Vec<InternetMessageId>,
    references: Vec<InternetMessageId>,
    conversation_id: Option<String>,
    ticket: TicketId,
}

#[derive(Debug, Default)]
pub struct PageLookup {
    tickets: HashMap<TicketId, TicketRef>,
    subjects: HashMap<TicketId, String>,
    conversations: HashMap<TicketId, Option<String>>,
    messages: Vec<KnownMessage>,
    /// Merged ticket → its survivor, for ticket tokens: our replies from a ticket carry its
    /// token, and a customer answering one after a merge means the survivor.
    merged_into: HashMap<TicketId, TicketId>,
}

fn store_err(query: &'static str) -> impl FnOnce(sqlx::Error) -> LookupError {
    move |e| LookupError::Store {
        query,
        source: Box::new(e),
    }
}

#[derive(sqlx::FromRow)]
struct TicketRow {
    id: i64,
    status: String,
    customer_email: String,
    last_message_at: DateTime<Utc>,
    normalized_subject: String,
    conversation_id: Option<String>,
}

#[derive(sqlx::FromRow)]
struct MessageRow {
    internet_message_id: Option<String>,
    in_reply_to: Option<String>,
    references: Vec<String>,
    conversation_id: Option<String>,
    ticket_id: i64,
}

/// Surviving tickets only: a merged ticket's messages were moved to the survivor.
const TICKET_COLUMNS: &str =
    "t.id, t.status, t.customer_email, t.last_message_at, t.normalized_subject, t.conversation_id";

impl PageLookup {
    /// Prefetches every ticket and message the page's inputs could point at.
    pub async fn prefetch(
        conn: &mut PgConnection,
        tenant: TenantId,
        inputs: &[ThreadInput],
        subject_since: DateTime<Utc>,
    ) -> Result<Self, LookupError> {
        let mut ids: Vec<String> = Vec::new();
        let mut conversations: Vec<String> = Vec::new();
        let mut tokens: Vec<i64> = Vec::new();
        let mut subjects: Vec<String> = Vec::new();
        let mut customers: Vec<String> = Vec::new();
        for input in inputs {
            ids.extend(
                input
                    .internet_message_id
                    .iter()
                    .map(|i| i.as_str().to_string()),
            );
            ids.extend(input.in_reply_to.iter().map(|i| i.as_str().to_string()));
            ids.extend(input.references.iter().map(|i| i.as_str().to_string()));
            conversations.extend(input.conversation_id.clone());
            tokens.extend(crate::mail::subject::ticket_token(&input.subject).map(|t| t.get()));
            if let Some(from) = &input.from {
                subjects.push(crate::mail::subject::normalize_subject(&input.subject));
                customers.push(from.key());
            }
        }
        ids.sort();
        ids.dedup();
        let messages: Vec<MessageRow> = sqlx::query_as(
            "SELECT m.internet_message_id, m.in_reply_to, m.\"references\", m.conversation_id,
                    m.ticket_id
             FROM helpdesk_messages m
             WHERE m.tenant_id = $1
               AND (m.internet_message_id = ANY($2) OR m.in_reply_to = ANY($2)
                    OR m.\"references\" && $2
                    OR ($3::text[] <> '{}' AND m.conversation_id = ANY($3)))
             UNION ALL
             SELECT s.internet_message_id, NULL, '{}', NULL, s.ticket_id
             FROM helpdesk_outbound_sends s
             WHERE s.tenant_id = $1 AND s.internet_message_id = ANY($2)",
        )
        .bind(tenant.as_uuid())
        .bind(&ids)
        .bind(&conversations)
        .fetch_all(&mut *conn)
        .await
        .map_err(store_err("page messages"))?;
        let ticket_ids: Vec<i64> = messages.iter().map(|m| m.ticket_id).collect();
        let merged_tokens: Vec<(i64, i64)> = if tokens.is_empty() {
            Vec::new()
        } else {
            sqlx::query_as(
                "SELECT id, merged_into_ticket_id FROM helpdesk_tickets
                 WHERE tenant_id = $1 AND id = ANY($2) AND merged_into_ticket_id IS NOT NULL",
            )
            .bind(tenant.as_uuid())
            .bind(&tokens)
            .fetch_all(&mut *conn)
            .await
            .map_err(store_err("merged ticket tokens"))?
        };
        tokens.extend(merged_tokens.iter().map(|(_, survivor)| *survivor));
        let tickets: Vec<TicketRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {TICKET_COLUMNS} FROM helpdesk_tickets t
             WHERE t.tenant_id = $1 AND t.merged_into_ticket_id IS NULL
               AND (t.id = ANY($2) OR t.id = ANY($3) OR t.conversation_id = ANY($4)
                    OR (t.last_message_at >= $7 AND (t.normalized_subject, lower(t.customer_email))
                        IN (SELECT * FROM unnest($5::text[], $6::text[]))))"
        )))
        .bind(tenant.as_uuid())
        .bind(&ticket_ids)
        .bind(&tokens)
        .bind(&conversations)
        .bind(&subjects)
        .bind(&customers)
        .bind(subject_since)
        .fetch_all(&mut *conn)
        .await
        .map_err(store_err("page tickets"))?;
        let mut lookup = Self {
            merged_into: merged_tokens
                .into_iter()
                .map(|(merged, survivor)| (TicketId::new(merged), TicketId::new(survivor)))
                .collect(),
            ..Self::default()
        };
        for t in tickets {
            let Ok(customer) = EmailAddress::parse(&t.customer_email) else {
                continue;
            };
            let id = TicketId::new(t.id);
            lookup.subjects.insert(id, t.normalized_subject);
            lookup.conversations.insert(id, t.conversation_id);
            lookup.tickets.insert(
                id,
                TicketRef {
                    id,
                    status: t.status.parse().unwrap_or(TicketStatus::Open),
                    customer,
                    last_message_at: t.last_message_at,
                },
            );
        }
        for m in messages {
            lookup.messages.push(KnownMessage {
                internet_id: m
                    .internet_message_id
                    .as_deref()
                    .and_then(|i| InternetMessageId::parse(i).ok()),
                in_reply_to: m
                    .in_reply_to
                    .as_deref()
                    .and_then(|i| InternetMessageId::parse(i).ok())
                    .into_iter()
                    .collect(),
                references: m
                    .references
                    .iter()
                    .filter_map(|r| InternetMessageId::parse(r).ok())
                    .collect(),
                conversation_id: m.conversation_id,
                ticket: TicketId::new(m.ticket_id),
            });
        }
        Ok(lookup)
    }

    /// Makes a message decided earlier in this page visible to the ones after it.
    pub fn add_message(
        &mut self,
        input: &ThreadInput,
        ticket: TicketRef,
        normalized_subject: &str,
    ) {
        self.subjects
            .entry(ticket.id)
            .or_insert_with(|| normalized_subject.to_string());
        self.conversations
            .entry(ticket.id)
            .or_insert_with(|| input.conversation_id.clone());
        self.tickets.insert(ticket.id, ticket.clone());
        self.messages.push(KnownMessage {
            internet_id: input.internet_message_id.clone(),
            in_reply_to: input.in_reply_to.clone(),
            references: input.references.clone(),
            conversation_id: input.conversation_id.clone(),
            ticket: ticket.id,
        });
    }

    /// Folds `merged` tickets into `survivor` (their messages now live there).
    pub fn merge(&mut self, survivor: TicketId, merged: &[TicketId]) {
        for m in &mut self.messages {
            if merged.contains(&m.ticket) {
                m.ticket = survivor;
            }
        }
        for id in merged {
            self.tickets.remove(id);
        }
        for target in self.merged_into.values_mut() {
            if merged.contains(target) {
                *target = survivor;
            }
        }
        self.merged_into
            .extend(merged.iter().map(|m| (*m, survivor)));
    }

    pub fn ticket(&self, id: TicketId) -> Option<&TicketRef> {
        self.tickets.get(&id)
    }

    pub fn update_ticket(&mut self, ticket: TicketRef) {
        self.tickets.insert(ticket.id, ticket);
    }

    fn live(&self, id: TicketId) -> Option<TicketRef> {
        self.tickets.get(&id).cloned()
    }
}

impl ThreadLookup for PageLookup {
    fn tickets_by_message_ids(
        &self,
        ids: &[InternetMessageId],
    ) -> impl Future<Output = Result<Vec<MessageIdMatch>, LookupError>> + Send {
        let found: Vec<MessageIdMatch> = self
            .messages
            .iter()
            .filter_map(|m| {
                let id = m.internet_id.as_ref()?;
                if !ids.contains(id) {
                    return None;
                }
                Some(MessageIdMatch {
                    message_id: id.clone(),
                    ticket: self.live(m.ticket)?,
                })
            })
            .collect();
        async move { Ok(found) }
    }

    fn tickets_replying_to(
        &self,
        ids: &[InternetMessageId],
    ) -> impl Future<Output = Result<Vec<TicketRef>, LookupError>> + Send {
        let found: Vec<TicketRef> = self
            .messages
            .iter()
            .filter(|m| {
                m.in_reply_to
                    .iter()
                    .chain(&m.references)
                    .any(|r| ids.contains(r))
            })
            .filter_map(|m| self.live(m.ticket))
            .collect();
        async move { Ok(found) }
    }

    fn tickets_by_conversation(
        &self,
        conversation_id: &str,
    ) -> impl Future<Output = Result<Vec<TicketRef>, LookupError>> + Send {
        let mut found: Vec<TicketRef> = self
            .conversations
            .iter()
            .filter(|(_, c)| c.as_deref() == Some(conversation_id))
            .filter_map(|(id, _)| self.live(*id))
            .collect();
        found.extend(
            self.messages
                .iter()
                .filter(|m| m.conversation_id.as_deref() == Some(conversation_id))
                .filter_map(|m| self.live(m.ticket)),
        );
        found.sort_by_key(|t| t.id);
        found.dedup_by_key(|t| t.id);
        async move { Ok(found) }
    }

    fn ticket_by_number(
        &self,
        id: TicketId,
    ) -> impl Future<Output = Result<Option<TicketRef>, LookupError>> + Send {
        let found = self.live(self.merged_into.get(&id).copied().unwrap_or(id));
        async move { Ok(found) }
    }

    fn tickets_by_subject(
        &self,
        normalized_subject: &str,
        customer: &EmailAddress,
        since: DateTime<Utc>,
    ) -> impl Future<Output = Result<Vec<TicketRef>, LookupError>> + Send {
        let key = customer.key();
        let found: Vec<TicketRef> = self
            .subjects
            .iter()
            .filter(|(_, s)| s.as_str() == normalized_subject)
            .filter_map(|(id, _)| self.live(*id))
            .filter(|t| t.customer.key() == key && t.last_message_at >= since)
            .collect();
        async move { Ok(found) }
    }
}
