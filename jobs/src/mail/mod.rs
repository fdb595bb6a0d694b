//! Pure mail logic: no I/O, no HTTP, no database (the threading engine reaches storage only through
//! the [`threading::ThreadLookup`] trait). Deterministic given its inputs, so rules test as tables.
//!
//! - [`headers`]: lenient Message-ID list parsing and a case-insensitive header view.
//! - [`subject`]: reply/forward prefix stripping and the `[#n]` ticket token.
//! - [`autoreply`]: auto-reply, bounce and loop detection.
//! - [`sanitize`]: HTML sanitising for display and plain-text fallbacks.
//! - [`threading`]: the rule engine deciding which ticket a message belongs to.

pub mod autoreply;
pub mod headers;
pub mod sanitize;
pub mod subject;
pub mod threading;
