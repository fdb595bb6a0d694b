-- Diagnostic Probe jobs record each execution here: ops use a probe to check the pipeline end to
-- end, and the test-suite and benchmarks use it to count executions and measure concurrency.
CREATE TABLE queue_probe_runs (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id          bigint NOT NULL,
    attempt         integer NOT NULL,
    tenant_id       uuid,
    marker          text,
    worker_id       text NOT NULL,
    started_at      timestamptz NOT NULL,
    finished_at     timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX queue_probe_runs_job_idx ON queue_probe_runs (job_id);
