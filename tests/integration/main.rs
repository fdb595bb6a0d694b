//! The one integration-test binary. Every test uses a fresh database on a real PostgreSQL.

mod foundation;
mod queue;
