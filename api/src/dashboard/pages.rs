//! The dashboard's HTML. maud escapes every interpolated value, so job arguments, error texts
//! and mailbox names cannot inject markup; the only `PreEscaped` content is the static CSS.

use chrono::{DateTime, Utc};
use jobs::queue::{
    AccountHealth, ConcurrencyLimit, JobRecord, TENANT_LIST_MAX, TenantConcurrency,
    ThroughputBucket,
};
use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::service::{self, Overview};
use super::{FilterParams, Session};
use crate::auth::Role;
use crate::routes::ops::{reconnect_url, summarize};

const CSS: &str = r#"
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1f2937;background:#f5f6f8}
header{background:#1e293b;color:#e2e8f0;padding:10px 24px;display:flex;align-items:center;gap:24px}
header a{color:#e2e8f0;text-decoration:none;font-weight:500}
header a.brand{font-weight:700;font-size:16px}
header .who{margin-left:auto;font-size:12px;color:#94a3b8;display:flex;gap:12px;align-items:center}
header form{margin:0}
main{padding:20px 24px;max-width:1280px}
h1{font-size:20px;margin:0 0 16px}
h2{font-size:15px;margin:24px 0 8px}
table{border-collapse:collapse;background:#fff;width:100%;box-shadow:0 1px 2px rgba(0,0,0,.06)}
th,td{padding:6px 8px;border-bottom:1px solid #e5e7eb;text-align:left;vertical-align:top}
th{background:#f1f5f9;font-weight:600;font-size:12px;text-transform:uppercase;color:#475569}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.err{color:#b91c1c;font-family:ui-monospace,monospace;font-size:12px;word-break:break-word}
pre{background:#0f172a;color:#e2e8f0;padding:12px;border-radius:4px;overflow:auto;font-size:12px}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600}
.s-pending{background:#e0f2fe;color:#075985}.s-running{background:#fef9c3;color:#854d0e}
.s-done{background:#dcfce7;color:#166534}.s-dead{background:#fee2e2;color:#991b1b}
.s-cancelled{background:#e5e7eb;color:#374151}
.s-active{background:#dcfce7;color:#166534}.s-needs_reauth{background:#fecaca;color:#7f1d1d}
.s-error{background:#fee2e2;color:#991b1b}.s-disabled{background:#e5e7eb;color:#374151}
tr.needs-reauth td{background:#fff1f2}
.flash{background:#ecfdf5;border:1px solid #a7f3d0;color:#065f46;padding:8px 12px;border-radius:4px;margin-bottom:16px}
.problem{background:#fef2f2;border:1px solid #fecaca;color:#991b1b;padding:8px 12px;border-radius:4px;margin-bottom:16px}
form.inline{display:inline}
.filters{display:flex;flex-wrap:wrap;gap:8px;align-items:end;background:#fff;padding:12px;margin-bottom:12px;box-shadow:0 1px 2px rgba(0,0,0,.06)}
.filters label{display:flex;flex-direction:column;font-size:12px;color:#475569;gap:2px}
input,select{font:inherit;padding:4px 6px;border:1px solid #cbd5e1;border-radius:4px}
button{font:inherit;padding:4px 12px;border-radius:4px;border:1px solid #1e40af;background:#1d4ed8;color:#fff;cursor:pointer}
button.danger{background:#b91c1c;border-color:#991b1b}
button.quiet{background:#334155;border-color:#475569;font-size:12px}
.actions{display:flex;gap:16px;flex-wrap:wrap;margin:12px 0}
.actions form{background:#fff;padding:10px 12px;box-shadow:0 1px 2px rgba(0,0,0,.06)}
.charts{display:flex;gap:24px;flex-wrap:wrap}
.chart{background:#fff;padding:10px 12px;box-shadow:0 1px 2px rgba(0,0,0,.06)}
.chart h3{margin:0 0 6px;font-size:13px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;background:#fff;padding:12px;margin:0}
dt{color:#475569}dd{margin:0}
.muted{color:#64748b}
.pager{margin-top:12px}
.nowrap{white-space:nowrap}
#accounts{font-size:13px}
#accounts td.err{min-width:180px}
"#;

fn layout(s: Option<&Session>, title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · graphdesk ops" }
                style { (PreEscaped(CSS)) }
            }
            body {
                header {
                    a.brand href="/dashboard" { "graphdesk ops" }
                    @if let Some(s) = s {
                        a href="/dashboard" { "Overview" }
                        a href="/dashboard/jobs" { "Jobs" }
                        a href="/dashboard/accounts" { "Accounts" }
                        a href="/dashboard/tenants" { "Tenants" }
                        span.who {
                            span #who { (s.principal.subject) " · " (s.principal.role.as_str())
                                @if s.principal.role == Role::Admin { " · tenant " (s.principal.tenant) } }
                            form method="post" action="/dashboard/logout" {
                                input type="hidden" name="csrf" value=(s.csrf);
                                button.quiet type="submit" { "Log out" }
                            }
                        }
                    }
                }
                main {
                    @if let Some(msg) = s.and_then(|s| s.flash.as_deref()) {
                        div.flash #flash role="status" { (msg) }
                    }
                    (body)
                }
            }
        }
    }
}

pub fn message_page(title: &str, message: &str) -> Markup {
    layout(
        None,
        title,
        html! {
            h1 { (title) }
            p.problem #message { (message) }
            p { a href="/dashboard/login" { "Log in with another token" } }
        },
    )
}

pub fn error_page(s: &Session, title: &str, message: &str) -> Markup {
    layout(
        Some(s),
        title,
        html! {
            h1 { (title) }
            p.problem #message { (message) }
        },
    )
}

pub fn login_page(error: Option<&str>, csrf: &str) -> Markup {
    layout(
        None,
        "Log in",
        html! {
            h1 { "Log in" }
            @if let Some(e) = error { p.problem #message { (e) } }
            form method="post" action="/dashboard/login" style="background:#fff;padding:16px;max-width:640px" {
                input type="hidden" name="csrf" value=(csrf);
                p.muted { "Paste an ops or admin token (" code { "api mint-token --tenant <uuid> --role ops" } ")." }
                label for="token" { "Token" }
                br;
                input #token type="password" name="token" autocomplete="off" required style="width:100%";
                p { button #login type="submit" { "Log in" } }
            }
        },
    )
}

pub fn overview(s: &Session, o: &Overview) -> Markup {
    let queues = summarize(&o.counts, &o.oldest);
    layout(
        Some(s),
        "Overview",
        html! {
            h1 { "Overview" }
            table #queues {
                thead { tr {
                    th { "Queue" } th.num { "Pending" } th.num { "Running" } th.num { "Done" }
                    th.num { "Dead" } th.num { "Cancelled" } th.num { "Oldest pending" }
                } }
                tbody {
                    @for q in &queues {
                        tr data-queue=(q.queue) {
                            td { a href={ "/dashboard/jobs?queue=" (q.queue) } { (q.queue) } }
                            td.num { (q.pending) }
                            td.num { (q.running) }
                            td.num { (q.done) }
                            td.num {
                                @if q.dead > 0 {
                                    a.err href={ "/dashboard/jobs?status=dead&queue=" (q.queue) } { (q.dead) }
                                } @else { "0" }
                            }
                            td.num { (q.cancelled) }
                            td.num { @match q.oldest_pending_seconds {
                                Some(secs) => (human_secs(secs)),
                                None => span.muted { "–" },
                            } }
                        }
                    }
                }
            }
            h2 { "Last hour" }
            div.charts {
                (bar_chart("chart-done", "Jobs done per 5 minutes", &o.throughput, |b| b.done, "#16a34a"))
                (bar_chart("chart-failed", "Failed attempts per 5 minutes", &o.throughput, |b| b.failed, "#dc2626"))
            }
        },
    )
}

/// A small SVG bar chart; each bar has a tooltip with its bucket and value.
fn bar_chart(
    id: &str,
    title: &str,
    buckets: &[ThroughputBucket],
    value: impl Fn(&ThroughputBucket) -> i64,
    color: &str,
) -> Markup {
    const W: f64 = 360.0;
    const H: f64 = 110.0;
    const AXIS: f64 = 16.0;
    let max = buckets.iter().map(&value).max().unwrap_or(0).max(1);
    let n = buckets.len().max(1) as f64;
    let slot = W / n;
    let total: i64 = buckets.iter().map(&value).sum();
    html! {
        div.chart #(id) {
            h3 { (title) " · " span.total { (total) } }
            svg width=(W) height=(H + AXIS) viewBox={ "0 0 " (W) " " (H + AXIS) } role="img" aria-label=(title) {
                line x1="0" y1=(H) x2=(W) y2=(H) stroke="#cbd5e1" {}
                text x="0" y=(H + 12.0) font-size="10" fill="#64748b" { (max) " max" }
                @if let (Some(first), Some(last)) = (buckets.first(), buckets.last()) {
                    text x=(W) y=(H + 12.0) font-size="10" fill="#64748b" text-anchor="end" {
                        (first.bucket_start.format("%H:%M")) "–" (last.bucket_start.format("%H:%M")) " UTC"
                    }
                }
                @for (i, b) in buckets.iter().enumerate() {
                    @let v = value(b);
                    @let h = (v as f64 / max as f64) * (H - 4.0);
                    rect x=(format!("{:.1}", i as f64 * slot + 2.0)) y=(format!("{:.1}", H - h))
                         width=(format!("{:.1}", (slot - 4.0).max(1.0))) height=(format!("{:.1}", h))
                         fill=(color) data-value=(v) {
                        title { (b.bucket_start.format("%H:%M")) " UTC: " (v) }
                    }
                }
            }
        }
    }
}

pub fn jobs(s: &Session, f: &FilterParams, jobs: &[JobRecord], next: Option<i64>) -> Markup {
    let is_ops = s.principal.role == Role::Ops;
    layout(
        Some(s),
        "Jobs",
        html! {
            h1 { "Jobs" }
            form.filters #filters method="get" action="/dashboard/jobs" {
                label { "State"
                    select name="status" {
                        option value="" { "any" }
                        @for st in jobs::queue::JobStatus::ALL {
                            option value=(st.as_str()) selected[f.status == st.as_str()] { (st.as_str()) }
                        }
                    }
                }
                label { "Queue"
                    select name="queue" {
                        option value="" { "any" }
                        @for q in jobs::kinds::QUEUES {
                            option value=(q) selected[f.queue == q] { (q) }
                        }
                    }
                }
                @if is_ops {
                    label { "Tenant" input name="tenant" value=(f.tenant) placeholder="tenant uuid" size="36"; }
                }
                label { "Account" input name="account" value=(f.account) placeholder="account uuid" size="36"; }
                label { "Error contains" input #error-filter name="error" value=(f.error); }
                button #apply-filter type="submit" { "Filter" }
            }
            table #jobs {
                thead { tr {
                    th.num { "Id" } th { "Queue" } th { "State" } th.num { "Attempts" }
                    @if is_ops { th { "Tenant" } }
                    th { "Last error" } th { "Updated" }
                } }
                tbody {
                    @for j in jobs {
                        tr data-job-id=(j.id) {
                            td.num { a href={ "/dashboard/jobs/" (j.id) } { (j.id) } }
                            td { (j.queue) }
                            td { (status_badge(&j.status)) }
                            td.num { (j.attempts) "/" (j.max_attempts) }
                            @if is_ops { td.muted { (opt_uuid(j.tenant_id)) } }
                            td.err { (truncate(j.last_error.as_deref().unwrap_or(""), 160)) }
                            td { (ago(j.updated_at)) }
                        }
                    }
                    @if jobs.is_empty() {
                        tr { td.muted colspan="7" { "No jobs match." } }
                    }
                }
            }
            p.pager {
                @if !f.before_id.trim().is_empty() {
                    a href={ "/dashboard/jobs?" (f.query(None)) } { "← Newest" } " "
                }
                @if let Some(before) = next {
                    a #older href={ "/dashboard/jobs?" (f.query(Some(before))) } { "Older →" }
                }
            }
            div.actions {
                form #bulk-retry method="post" action="/dashboard/jobs/retry" {
                    input type="hidden" name="csrf" value=(s.csrf);
                    input type="hidden" name="queue" value=(f.queue);
                    input type="hidden" name="tenant" value=(f.tenant);
                    input type="hidden" name="account" value=(f.account);
                    input type="hidden" name="error" value=(f.error);
                    span.muted { "Every dead or cancelled job matching this filter (any page): " }
                    button #bulk-retry-button type="submit" { "Retry all matching" }
                }
                @if is_ops {
                    form #purge method="post" action="/dashboard/jobs/purge" {
                        input type="hidden" name="csrf" value=(s.csrf);
                        label { "Purge finished jobs older than "
                            input name="days" type="number" min="1" max=(service::MAX_PURGE_DAYS) value="7" style="width:5em";
                            " days " }
                        button.danger type="submit" { "Purge" }
                    }
                }
            }
        },
    )
}

pub fn job(s: &Session, j: &JobRecord) -> Markup {
    let arguments = serde_json::to_string_pretty(&service::redact(j.payload.clone()))
        .unwrap_or_else(|_| "{}".into());
    let errors = j.errors.as_array().cloned().unwrap_or_default();
    layout(
        Some(s),
        &format!("Job {}", j.id),
        html! {
            h1 { "Job " (j.id) " " span #job-status { (status_badge(&j.status)) } }
            div.actions {
                @if matches!(j.status.as_str(), "dead" | "cancelled") {
                    form #retry method="post" action={ "/dashboard/jobs/" (j.id) "/retry" } {
                        input type="hidden" name="csrf" value=(s.csrf);
                        button #retry-button type="submit" { "Retry" }
                    }
                }
                @if j.status == "pending" {
                    form #cancel method="post" action={ "/dashboard/jobs/" (j.id) "/cancel" } {
                        input type="hidden" name="csrf" value=(s.csrf);
                        button.danger #cancel-button type="submit" { "Cancel" }
                    }
                }
            }
            dl {
                dt { "Queue" } dd { a href={ "/dashboard/jobs?queue=" (j.queue) } { (j.queue) } }
                dt { "Tenant" } dd { (opt_uuid(j.tenant_id)) }
                dt { "Account" } dd { (opt_uuid(j.email_account_id)) }
                dt { "Attempts" } dd #attempts { (j.attempts) " of " (j.max_attempts) }
                dt { "Run at" } dd { (ts(Some(j.run_at))) }
                dt { "Created" } dd { (ts(Some(j.created_at))) }
                dt { "Updated" } dd { (ts(Some(j.updated_at))) }
                dt { "Finished" } dd { (ts(j.finished_at)) }
                @if let Some(w) = &j.locked_by { dt { "Locked by" } dd { (w) } }
                @if let Some(k) = &j.idempotency_key { dt { "Idempotency key" } dd { (k) } }
                dt { "Last error" } dd.err #last-error { (j.last_error.as_deref().unwrap_or("–")) }
            }
            h2 { "Arguments" }
            pre #arguments { (arguments) }
            h2 { "Attempts with errors" }
            table #errors {
                thead { tr { th.num { "Attempt" } th { "At" } th { "Kind" } th { "Error" } } }
                tbody {
                    @for e in &errors {
                        tr {
                            td.num { (json_text(&e["attempt"])) }
                            td { (json_text(&e["at"])) }
                            td { (json_text(&e["kind"])) }
                            td.err { (json_text(&e["error"])) }
                        }
                    }
                    @if errors.is_empty() { tr { td.muted colspan="4" { "No failed attempts." } } }
                }
            }
        },
    )
}

pub fn accounts(s: &Session, accounts: &[AccountHealth]) -> Markup {
    layout(
        Some(s),
        "Accounts",
        html! {
            h1 { "Accounts" }
            table #accounts {
                thead { tr {
                    th { "Mailbox" } th { "Tenant" } th { "Status" } th { "Sync lag" }
                    th { "Last success" } th { "Last error" } th { "Token expires" }
                    th { "Throttled" } th.num { "Ingested" } th.num { "Duplicates" } th {}
                } }
                tbody {
                    @for a in accounts {
                        tr.needs-reauth[a.status == "needs_reauth"] data-account-id=(a.id) {
                            td { (a.email_address) }
                            td.muted title=(a.tenant_id) { (short_uuid(a.tenant_id)) }
                            td {
                                (status_badge(&a.status))
                                @if let Some(r) = &a.status_reason { br; span.muted { (r) } }
                            }
                            td.nowrap { @match a.sync_lag_seconds {
                                Some(secs) => (human_secs(secs)),
                                None => span.muted { "never synced" },
                            } }
                            td.nowrap { (ts_short(a.last_sync_success_at)) }
                            td.err { (truncate(a.last_sync_error.as_deref().unwrap_or(""), 160)) }
                            td.nowrap { (token_expiry(a.token_expires_at)) }
                            td.nowrap { @match a.throttled_until {
                                Some(t) if t > Utc::now() => span.err title=(t.to_rfc3339()) { "until " (t.format("%H:%M:%S")) },
                                _ => span.muted { "no" },
                            } }
                            td.num { (a.messages_ingested) }
                            td.num { (a.duplicates_skipped) }
                            td { a.reconnect href=(reconnect_url(a.id)) { "Reconnect" } }
                        }
                    }
                    @if accounts.is_empty() { tr { td.muted colspan="11" { "No mailboxes connected." } } }
                }
            }
        },
    )
}

pub fn tenants(s: &Session, tenants: &[TenantConcurrency]) -> Markup {
    let ops = s.principal.role == Role::Ops;
    layout(
        Some(s),
        "Tenants",
        html! {
            h1 { "Tenants" }
            p.muted {
                "How many of each tenant's jobs may run at once across every worker. Without a limit of its own a tenant gets the workers' default (WORKER_TENANT_CONCURRENCY). A change applies from the next claim; running jobs are not interrupted."
                @if !ops { " Only the ops role can change a limit." }
            }
            table #tenants {
                thead { tr {
                    th { "Tenant" } th { "Id" } th.num { "Running" } th.num { "Pending" }
                    th { "Limit" }
                    @if ops { th { "Change" } }
                } }
                tbody {
                    @for t in tenants {
                        tr data-tenant-id=(t.tenant) {
                            td { (t.name) }
                            td.muted title=(t.tenant) { (short_uuid(t.tenant.as_uuid())) }
                            td.num { (t.running) }
                            td.num { (t.pending) }
                            td.limit { @match t.limit {
                                Some(l) => (l.get()),
                                None => span.muted { "default" },
                            } }
                            @if ops { td {
                                form.inline method="post" action={ "/dashboard/tenants/" (t.tenant) "/concurrency" } {
                                    input type="hidden" name="csrf" value=(s.csrf);
                                    input type="number" name="limit" min="1" max=(ConcurrencyLimit::MAX) required
                                        value=[t.limit.map(ConcurrencyLimit::get)] style="width:6em" aria-label={ "Limit for " (t.name) };
                                    " "
                                    button.quiet type="submit" { "Set" }
                                }
                                @if t.limit.is_some() {
                                    " "
                                    form.inline method="post" action={ "/dashboard/tenants/" (t.tenant) "/concurrency" } {
                                        input type="hidden" name="csrf" value=(s.csrf);
                                        button.quiet type="submit" name="clear" value="1" { "Use default" }
                                    }
                                }
                            } }
                        }
                    }
                    @if tenants.is_empty() { tr { td.muted colspan="6" { "No tenants." } } }
                }
            }
            @if tenants.len() >= TENANT_LIST_MAX {
                p.muted { "Showing the " (TENANT_LIST_MAX) " busiest tenants." }
            }
        },
    )
}

fn status_badge(status: &str) -> Markup {
    html! { span class={ "badge s-" (status) } { (status) } }
}

fn opt_uuid(id: Option<uuid::Uuid>) -> String {
    id.map_or_else(|| "–".to_string(), |u| u.to_string())
}

fn short_uuid(id: uuid::Uuid) -> String {
    id.to_string()[..8].to_string() + "…"
}

fn json_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max).collect();
        t.push('…');
        t
    }
}

fn ts(t: Option<DateTime<Utc>>) -> Markup {
    match t {
        Some(t) => html! { span title=(t.to_rfc3339()) { (t.format("%Y-%m-%d %H:%M:%S UTC")) } },
        None => html! { span.muted { "–" } },
    }
}

fn ts_short(t: Option<DateTime<Utc>>) -> Markup {
    match t {
        Some(t) => html! { span title=(t.to_rfc3339()) { (t.format("%m-%d %H:%M")) } },
        None => html! { span.muted { "never" } },
    }
}

fn ago(t: DateTime<Utc>) -> Markup {
    let secs = (Utc::now() - t).num_milliseconds() as f64 / 1000.0;
    html! { span title=(t.to_rfc3339()) { (human_secs(secs)) " ago" } }
}

fn token_expiry(t: Option<DateTime<Utc>>) -> Markup {
    match t {
        None => html! { span.muted { "–" } },
        Some(t) => {
            let secs = (t - Utc::now()).num_seconds() as f64;
            if secs <= 0.0 {
                html! { span.err title=(t.to_rfc3339()) { "expired " (human_secs(-secs)) " ago" } }
            } else {
                html! { span title=(t.to_rfc3339()) { "in " (human_secs(secs)) } }
            }
        }
    }
}

/// "45s", "3m 12s", "2h 5m", "4d 2h".
pub fn human_secs(secs: f64) -> String {
    let s = secs.max(0.0).round() as i64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {}h", s / 86400, (s % 86400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_secs(-3.0), "0s");
        assert_eq!(human_secs(45.2), "45s");
        assert_eq!(human_secs(192.0), "3m 12s");
        assert_eq!(human_secs(7500.0), "2h 5m");
        assert_eq!(human_secs(352_800.0), "4d 2h");
    }
}
