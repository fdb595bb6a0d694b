//! The worker's optional Prometheus listener (`WORKER_METRICS_ADDR`).
//!
//! Job outcomes, token refreshes, syncs, sends and Graph responses are counted in the process
//! that does the work; without a recorder installed here the `metrics` facade drops them.

use std::net::SocketAddr;

use anyhow::Context;
use jobs::config::{ConfigError, env_opt};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// Email-to-ticket latency spans seconds (change notifications) to an hour (a mailbox that was
/// throttled or disconnected); a first sync of old mail lands in `+Inf`.
const EMAIL_TO_TICKET_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];
/// A probe takes milliseconds, a full sync of a large mailbox minutes (the job timeout is 5).
const JOB_DURATION_BUCKETS: &[f64] = &[
    0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// Installs the recorder and starts serving `GET /metrics` when `WORKER_METRICS_ADDR` is
/// set. Histograms get buckets rather than the exporter's default summaries, because
/// quantiles computed per process cannot be added up across worker replicas.
pub fn install_from_env() -> anyhow::Result<Option<SocketAddr>> {
    let Some(raw) = env_opt("WORKER_METRICS_ADDR") else {
        return Ok(None);
    };
    let addr: SocketAddr = raw.trim().parse().map_err(|e| ConfigError::Invalid {
        name: "WORKER_METRICS_ADDR",
        reason: format!("{e} (expected host:port, e.g. 127.0.0.1:9187)"),
    })?;
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            Matcher::Full("graphdesk_email_to_ticket_seconds".into()),
            EMAIL_TO_TICKET_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full("graphdesk_job_duration_seconds".into()),
            JOB_DURATION_BUCKETS,
        )?
        .install()
        .with_context(|| format!("serving metrics on {addr} (WORKER_METRICS_ADDR)"))?;
    Ok(Some(addr))
}
