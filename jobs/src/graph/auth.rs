//! The two hooks the Graph client needs from the layers above it: where access tokens come
//! from (the database and the refresh single-flight live there) and whether a mailbox may take
//! another request now (cross-process limits live in Postgres).
//!
//! Both return boxed futures so that one `GraphClient` can hold them as trait objects.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use futures::future::BoxFuture;
use secrecy::SecretString;

use super::error::{GateError, TokenSourceError};

/// Hands out access tokens for one mailbox's account.
pub trait AccessTokenSource: Send + Sync {
    /// A currently valid access token (refreshing first if it is near expiry).
    fn access_token(&self) -> BoxFuture<'_, Result<SecretString, TokenSourceError>>;

    /// Graph answered 401 to `rejected`. Return a different, fresh token: refresh unless
    /// another process already replaced `rejected` (compare, then refresh under the row lock).
    fn force_refresh<'a>(
        &'a self,
        rejected: &'a SecretString,
    ) -> BoxFuture<'a, Result<SecretString, TokenSourceError>>;
}

/// A fixed token, for tests, one-off tools and the simulator. `force_refresh` hands the same
/// token back, so a second 401 surfaces as [`GraphError::Unauthorized`](super::GraphError).
#[derive(Clone)]
pub struct StaticToken(pub SecretString);

impl fmt::Debug for StaticToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StaticToken([REDACTED])")
    }
}

impl AccessTokenSource for StaticToken {
    fn access_token(&self) -> BoxFuture<'_, Result<SecretString, TokenSourceError>> {
        Box::pin(async move { Ok(self.0.clone()) })
    }

    fn force_refresh<'a>(
        &'a self,
        _rejected: &'a SecretString,
    ) -> BoxFuture<'a, Result<SecretString, TokenSourceError>> {
        Box::pin(async move { Ok(self.0.clone()) })
    }
}

/// Admission for one request to one mailbox. Hold the permit until the response is read.
pub trait RequestGate: Send + Sync {
    fn acquire(&self) -> BoxFuture<'_, Result<GatePermit, GateError>>;
}

/// Proof of admission; dropping it gives the slot back (whatever the gate put inside is
/// dropped with it, e.g. a semaphore permit or a lease guard).
pub struct GatePermit {
    _guard: Option<Box<dyn Any + Send>>,
}

impl GatePermit {
    /// A permit that releases nothing.
    #[must_use]
    pub fn unit() -> Self {
        Self { _guard: None }
    }

    /// A permit that releases `guard` when dropped.
    #[must_use]
    pub fn holding(guard: impl Any + Send) -> Self {
        Self {
            _guard: Some(Box::new(guard)),
        }
    }
}

impl fmt::Debug for GatePermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatePermit").finish_non_exhaustive()
    }
}

/// Admits everything: the default until the queue layer plugs in its Postgres-backed limits.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoGate;

impl RequestGate for NoGate {
    fn acquire(&self) -> BoxFuture<'_, Result<GatePermit, GateError>> {
        Box::pin(async { Ok(GatePermit::unit()) })
    }
}

/// An in-process concurrency cap; useful in tests and single-process tools. Cross-process
/// limits need a database-backed gate.
#[derive(Debug, Clone)]
pub struct LocalConcurrencyGate {
    semaphore: Arc<tokio::sync::Semaphore>,
}

impl LocalConcurrencyGate {
    #[must_use]
    pub fn new(max_concurrent: usize) -> Self {
        Self {
            semaphore: Arc::new(tokio::sync::Semaphore::new(max_concurrent.max(1))),
        }
    }
}

impl RequestGate for LocalConcurrencyGate {
    fn acquire(&self) -> BoxFuture<'_, Result<GatePermit, GateError>> {
        Box::pin(async move {
            let permit = Arc::clone(&self.semaphore)
                .acquire_owned()
                .await
                .map_err(|e| GateError::Failed(Box::new(e)))?;
            Ok(GatePermit::holding(permit))
        })
    }
}
