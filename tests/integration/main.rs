//! The one integration-test binary. Every test uses a fresh database on a real PostgreSQL.

mod accounts;
mod chaos;
mod dashboard;
mod foundation;
mod gate;
mod graph_client;
mod metrics_worker;
mod queue;
mod scheduler;
mod security;
mod send;
mod send_new;
mod sync;
