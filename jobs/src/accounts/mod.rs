//! Connected mailboxes: the connect flow, tokens at rest and their refresh, the cross-process
//! Graph request gate, and the connection test.

pub mod connect;
pub mod gate;
pub mod manage;
pub mod tokens;
pub mod validate;

pub use tokens::{AccountTokenSource, RefreshMode, graph_client, refresh_tokens};
