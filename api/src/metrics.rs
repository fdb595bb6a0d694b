//! `/metrics` in the Prometheus text format.
//!
//! Two sources: the process's own `metrics` recorder (counters this api process emits, such as
//! ops actions), and gauges computed from the database at scrape time (queue depth, oldest
//! pending age, accounts, message totals). The database gauges are rendered straight into the
//! response instead of being stored in the global recorder: the api runs no jobs, and a stored
//! gauge would keep a stale value for a queue or status that has since emptied (and, in the
//! test-suite, mix up many apps' databases in one process).

use std::fmt::Write as _;
use std::sync::OnceLock;

use jobs::queue::JobStatus;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use poem::http::{StatusCode, header};
use poem::web::Data;
use poem::web::headers::authorization::Bearer;
use poem::web::headers::{Authorization, HeaderMapExt};
use poem::{IntoResponse, Request, Response, handler};

use crate::AppState;

/// The process-wide recorder. Installed once: a process has one global recorder, and the
/// test-suite builds many apps in one process.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        if ::metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!(
                "a metrics recorder was already installed; /metrics shows only database gauges"
            );
        }
        handle
    })
}

/// The `/metrics` endpoint. Installs the recorder now rather than at the first scrape, so
/// what the process records before it is scraped is kept.
pub fn endpoint() -> impl poem::Endpoint<Output = Response> {
    handle();
    poem::get(metrics)
}

const ACCOUNT_STATUSES: [&str; 5] = ["pending", "active", "needs_reauth", "error", "disabled"];

/// The gauges add up every tenant's queue and mailboxes, so a scrape needs what reads across
/// tenants: a bearer token of the ops role (a scraper sends a long-lived one, minted with
/// `api mint-token --role ops --hours N`).
fn refuse_unless_ops(state: &AppState, req: &Request) -> Option<Response> {
    let refuse = |status: StatusCode, why: String| {
        let mut resp = Response::builder()
            .status(status)
            .content_type("text/plain; charset=utf-8");
        if status == StatusCode::UNAUTHORIZED {
            resp = resp.header(header::WWW_AUTHENTICATE, "Bearer");
        }
        Some(resp.body(format!("{why}\n")))
    };
    let Some(Authorization(bearer)) = req.headers().typed_get::<Authorization<Bearer>>() else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "metrics need `Authorization: Bearer <JWT>` with the ops role \
             (mint one with `api mint-token --role ops`)"
                .into(),
        );
    };
    match state.jwt.verify(bearer.token()) {
        Err(msg) => refuse(
            StatusCode::UNAUTHORIZED,
            format!("that token was not accepted: {msg}"),
        ),
        Ok(p) if !p.is_ops() => refuse(
            StatusCode::FORBIDDEN,
            format!(
                "metrics cover every tenant and need the ops role; this token has {}",
                p.role.as_str()
            ),
        ),
        Ok(_) => None,
    }
}

#[handler]
pub async fn metrics(Data(state): Data<&AppState>, req: &Request) -> Response {
    if let Some(refused) = refuse_unless_ops(state, req) {
        return refused;
    }
    match render(state).await {
        Ok(body) => body
            .with_content_type("text/plain; version=0.0.4; charset=utf-8")
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "computing metrics from the database failed");
            Response::builder()
                .status(StatusCode::SERVICE_UNAVAILABLE)
                .content_type("text/plain; charset=utf-8")
                .body("metrics unavailable: the database did not answer\n")
        }
    }
}

async fn render(state: &AppState) -> Result<String, jobs::queue::QueueError> {
    let counts = state.queue.queue_counts(None).await?;
    let oldest = state.queue.oldest_pending(None).await?;
    let accounts = state.queue.account_totals().await?;

    let mut out = handle().render();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }

    let mut queues: Vec<&str> = jobs::kinds::QUEUES.to_vec();
    for c in &counts {
        if !queues.contains(&c.queue.as_str()) {
            queues.push(&c.queue);
        }
    }

    header(
        &mut out,
        "graphdesk_queue_depth",
        "gauge",
        "Jobs in the queue table by queue and status (from the database at scrape time).",
    );
    for queue in &queues {
        for status in JobStatus::ALL {
            let n = counts
                .iter()
                .find(|c| c.queue == *queue && c.status == status.as_str())
                .map_or(0, |c| c.count);
            sample(
                &mut out,
                "graphdesk_queue_depth",
                &[("queue", queue), ("status", status.as_str())],
                n as f64,
            );
        }
    }

    header(
        &mut out,
        "graphdesk_queue_oldest_pending_seconds",
        "gauge",
        "Age of the oldest due pending job per queue; 0 when none waits.",
    );
    for queue in &queues {
        let age = oldest
            .iter()
            .find(|o| o.queue == *queue)
            .map_or(0.0, |o| o.age_seconds);
        sample(
            &mut out,
            "graphdesk_queue_oldest_pending_seconds",
            &[("queue", queue)],
            age,
        );
    }

    header(
        &mut out,
        "graphdesk_accounts",
        "gauge",
        "Connected mailboxes by status.",
    );
    for status in ACCOUNT_STATUSES {
        let n = accounts
            .by_status
            .iter()
            .find(|(s, _)| s == status)
            .map_or(0, |(_, n)| *n);
        sample(
            &mut out,
            "graphdesk_accounts",
            &[("status", status)],
            n as f64,
        );
    }

    header(
        &mut out,
        "graphdesk_messages_ingested_total",
        "counter",
        "Messages ingested into tickets, over every mailbox.",
    );
    sample(
        &mut out,
        "graphdesk_messages_ingested_total",
        &[],
        accounts.messages_ingested as f64,
    );
    header(
        &mut out,
        "graphdesk_duplicates_skipped_total",
        "counter",
        "Messages skipped as duplicates (already ingested through another mailbox or sync).",
    );
    sample(
        &mut out,
        "graphdesk_duplicates_skipped_total",
        &[],
        accounts.duplicates_skipped as f64,
    );
    header(
        &mut out,
        "graphdesk_duplicate_detection_ratio",
        "gauge",
        "Duplicates skipped / (messages ingested + duplicates skipped); 0 before any mail.",
    );
    let seen = accounts.messages_ingested + accounts.duplicates_skipped;
    let ratio = if seen == 0 {
        0.0
    } else {
        accounts.duplicates_skipped as f64 / seen as f64
    };
    sample(&mut out, "graphdesk_duplicate_detection_ratio", &[], ratio);
    Ok(out)
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: f64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape_label(v));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// The text format's label escaping: backslash, double quote and newline.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let mut out = String::new();
        sample(&mut out, "m", &[("q", "a\"b\\c\nd")], 1.5);
        assert_eq!(out, "m{q=\"a\\\"b\\\\c\\nd\"} 1.5\n");
    }
}
