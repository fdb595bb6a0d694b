-- The limit-aware claim, rewritten for cost and fairness (same signature and lock as before).
--
-- Fairness: tenants already at their limit are filtered out of the candidate scan itself, so
-- a tenant with a backlog at the head of the queue no longer hides the tenants behind it (up
-- to a scan depth of 2,000 jobs, or ten times the candidates); the candidates can then be few
-- (the worker asks for about twice the batch).
--
-- Cost: the running jobs are counted once per tenant, and the per-candidate check is one
-- window pass over candidates and per-tenant counts (no join between two CTEs, which the
-- planner, seeing no statistics for CTEs, ran as a nested loop of candidates x tenants).
--
-- Plan stability: a queue table churns faster than ANALYZE runs, and stale statistics made
-- the planner hash-join the claim's UPDATE against every pending row. The claim only ever
-- wants index lookups of a few hundred rows, so the function pins that shape.
CREATE OR REPLACE FUNCTION queue_claim_limited(
    p_queue text, p_n integer, p_worker text, p_lease_secs double precision,
    p_candidates integer, p_default_limit integer, p_lock bigint)
RETURNS TABLE (id bigint, payload jsonb, attempts integer, max_attempts integer, tenant_id uuid)
LANGUAGE plpgsql VOLATILE
SET enable_hashjoin = off
SET enable_mergejoin = off
SET enable_bitmapscan = off
AS $$
#variable_conflict use_column
BEGIN
    -- Serialises limited claims so each reads running counts no other claim is changing; the
    -- next statement's snapshot is taken after the lock is granted (see 20261125000020).
    PERFORM pg_advisory_xact_lock(p_lock);
    RETURN QUERY
    WITH busy AS MATERIALIZED (
        SELECT r.tenant_id, count(*) AS n FROM queue_jobs r
        WHERE r.status = 'running' AND r.tenant_id IS NOT NULL
        GROUP BY r.tenant_id
    ), saturated AS MATERIALIZED (
        SELECT coalesce(array_agg(b.tenant_id), '{}') AS ids FROM busy b
        LEFT JOIN tenants t ON t.id = b.tenant_id
        WHERE b.n >= coalesce(t.concurrency_limit, p_default_limit)
    ), candidates AS MATERIALIZED (
        -- The scan is bounded: when nearly every tenant is at its limit (the steady state of
        -- a busy cluster) an unbounded one would walk the whole backlog on every claim.
        SELECT h.id, h.tenant_id, h.priority, h.run_at
        FROM (SELECT q.id, q.tenant_id, q.priority, q.run_at FROM queue_jobs q
              WHERE q.queue = p_queue AND q.status = 'pending' AND q.run_at <= now()
              ORDER BY q.priority DESC, q.run_at, q.id
              LIMIT greatest(p_candidates * 10, 2000)) h
        WHERE h.tenant_id IS NULL OR h.tenant_id <> ALL ((SELECT s.ids FROM saturated s)::uuid[])
        ORDER BY h.priority DESC, h.run_at, h.id
        LIMIT p_candidates
    ), ranked AS (
        -- Per tenant: its running count first, then its candidates in claim order; a
        -- candidate fits while the running total up to it stays within the tenant's cap.
        SELECT x.id, x.tenant_id, x.priority, x.run_at,
               sum(x.weight) OVER (PARTITION BY x.tenant_id
                                   ORDER BY x.id IS NOT NULL, x.priority DESC, x.run_at, x.id)
                   AS used,
               max(x.cap) OVER (PARTITION BY x.tenant_id) AS cap
        FROM (SELECT c.id, c.tenant_id, 1::bigint AS weight, c.priority, c.run_at,
                     NULL::integer AS cap
              FROM candidates c
              UNION ALL
              SELECT NULL, b.tenant_id, b.n, NULL, NULL, NULL FROM busy b
              UNION ALL
              SELECT NULL, t.id, 0, NULL, NULL, t.concurrency_limit FROM tenants t
              WHERE t.id = ANY (ARRAY(SELECT DISTINCT c.tenant_id FROM candidates c))) x
    ), picked AS (
        SELECT r.id FROM ranked r
        WHERE r.id IS NOT NULL
          AND (r.tenant_id IS NULL OR r.used <= coalesce(r.cap, p_default_limit))
        ORDER BY r.priority DESC, r.run_at, r.id
        LIMIT p_n
    )
    -- Candidates are not row-locked: limited claims cannot race each other (the lock), and
    -- the status re-check on the latest row version skips a job anything else took meanwhile.
    -- It is written with coalesce so it cannot match the partial indexes on pending jobs: after
    -- an ANALYZE of an idle queue the planner would take those for empty and scan one as the
    -- outer side of the join (jobs/src/queue/runtime.rs has the same note above `flush`).
    UPDATE queue_jobs j SET status = 'running', attempts = j.attempts + 1,
        locked_by = p_worker, locked_at = now(),
        lease_expires_at = now() + make_interval(secs => p_lease_secs), updated_at = now()
    FROM picked p WHERE j.id = p.id AND coalesce(j.status, '') = 'pending'
    RETURNING j.id, j.payload, j.attempts, j.max_attempts, j.tenant_id;
END
$$;
