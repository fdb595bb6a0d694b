//! Microsoft Graph and identity-platform client.
//!
//! - [`client`]: [`GraphClient`], the mail operations, retries (Retry-After, backoff, one
//!   refresh on 401), `Prefer: IdType="ImmutableId"` on every request, paging and delta.
//! - [`oauth`]: [`IdentityClient`], the authorize URL, PKCE, code redemption and refresh.
//! - [`auth`]: the hooks the layers above plug in: [`AccessTokenSource`] (tokens from the
//!   database) and [`RequestGate`] (cross-process per-mailbox limits).
//! - [`error`]: [`GraphError`], [`TokenError`] and the [`ErrorClass`] the queue acts on.
//! - [`types`]: serde mirrors of Graph's JSON.
//!
//! The same code talks to Microsoft and to the simulator: only the base URLs differ.

pub mod auth;
pub mod client;
pub mod error;
pub mod oauth;
pub mod types;

#[cfg(test)]
mod http_tests;
#[cfg(test)]
mod stub;

use std::time::Duration;

pub use auth::{
    AccessTokenSource, GatePermit, LocalConcurrencyGate, NoGate, RequestGate, StaticToken,
};
pub use client::{
    BaseUrlError, DEFAULT_GRAPH_BASE_URL, DeltaOptions, DeltaRound, FolderRef, GraphClient,
    GraphConfig, ListMessagesQuery, Mailbox, RetryPolicy, WellKnownFolder,
};
pub use error::{
    ErrorClass, GateError, GraphError, TokenError, TokenErrorDetail, TokenSourceError,
    parse_retry_after,
};
pub use oauth::{
    DEFAULT_IDENTITY_BASE_URL, DEFAULT_SCOPES, IdentityClient, IdentityConfig, Pkce, TenantSegment,
    TokenSet,
};
pub use types::*;

/// The one HTTP client a process shares between Graph and the identity platform.
///
/// Redirects are off: a token endpoint or Graph call that redirects is an error to look at,
/// and a followed redirect could carry a bearer token or a client secret somewhere else.
pub fn build_http_client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(60))
        .pool_idle_timeout(Duration::from_secs(90))
        .user_agent(concat!("graphdesk/", env!("CARGO_PKG_VERSION")))
        .build()
}
