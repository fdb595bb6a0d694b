//! graphdesk's application layer: domain types, the four typed jobs and their handlers, the
//! Microsoft Graph client, OAuth and the token vault, threading, storage and the queue.
//! It knows nothing of HTTP servers: `api` and `worker` are thin edges around it.
//!
//! Layout:
//! - [`ids`]: parsed newtypes (TenantId, AccountId, MicrosoftMessageId, ...).
//! - [`config`]: typed settings from the environment.
//! - [`db`]: pool, migrations, readiness.
//! - [`queue`]: the Postgres job queue and its apalis backend.
//! - [`kinds`]: the four typed jobs and their queues.
//! - [`mail`]: pure mail logic: headers, subjects, auto-reply detection, sanitising, threading.
//! - [`graph`]: the Microsoft Graph + identity-platform client.
//! - [`vault`]: AES-SIV token encryption at rest.

pub mod accounts;
pub mod audit;
pub mod config;
pub mod db;
pub mod graph;
pub mod handlers;
pub mod ids;
pub mod kinds;
pub mod mail;
pub mod queue;
pub mod scheduler;
pub mod sending;
pub mod sends;
pub mod services;
pub mod sync;
pub mod telemetry;
pub mod tickets;
pub mod vault;
pub mod webhooks;
