-- The claim with per-tenant limits, in one round trip.
--
-- Limited claims are serialised by one advisory transaction lock so the running count each
-- claim reads is exact across every process. The count must be read on a snapshot taken after
-- the lock is granted: inside a VOLATILE plpgsql function every statement takes a fresh
-- snapshot, so the lock and the claim are two statements here but a single call from the
-- worker, and the lock is held only for the claim itself and its commit.
--
-- Candidates are not row-locked: limited claims cannot race each other (the lock), and the
-- final UPDATE re-checks `status = 'pending'` on the latest row version, so a job cancelled
-- or taken by anything else meanwhile is skipped rather than claimed twice. Candidates are
-- over-sampled so one tenant at its limit at the head of the queue does not starve the
-- tenants behind it.
--
-- The plan must not depend on statistics (a queue table churns faster than ANALYZE runs, and
-- with no statistics the planner expects one candidate): the CTEs are materialised so the
-- running count is computed once for the candidates' tenants, never once per candidate.
CREATE FUNCTION queue_claim_limited(
    p_queue text, p_n integer, p_worker text, p_lease_secs double precision,
    p_candidates integer, p_default_limit integer, p_lock bigint)
RETURNS TABLE (id bigint, payload jsonb, attempts integer, max_attempts integer, tenant_id uuid)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
BEGIN
    PERFORM pg_advisory_xact_lock(p_lock);
    RETURN QUERY
    WITH candidates AS MATERIALIZED (
        SELECT c.id, c.tenant_id, c.priority, c.run_at,
               row_number() OVER (PARTITION BY c.tenant_id
                                  ORDER BY c.priority DESC, c.run_at, c.id) AS rn
        FROM (SELECT q.id, q.tenant_id, q.priority, q.run_at FROM queue_jobs q
              WHERE q.queue = p_queue AND q.status = 'pending' AND q.run_at <= now()
              ORDER BY q.priority DESC, q.run_at, q.id
              LIMIT p_candidates) c
    ), running AS MATERIALIZED (
        SELECT r.tenant_id, count(*) AS n FROM queue_jobs r
        WHERE r.status = 'running'
          AND r.tenant_id = ANY (ARRAY(SELECT DISTINCT c.tenant_id FROM candidates c))
        GROUP BY r.tenant_id
    ), picked AS (
        SELECT c.id FROM candidates c
        LEFT JOIN running r ON r.tenant_id = c.tenant_id
        LEFT JOIN tenants t ON t.id = c.tenant_id
        WHERE c.tenant_id IS NULL
           OR c.rn + coalesce(r.n, 0) <= coalesce(t.concurrency_limit, p_default_limit)
        ORDER BY c.priority DESC, c.run_at, c.id
        LIMIT p_n
    ), claimed AS (
        UPDATE queue_jobs j SET status = 'running', attempts = j.attempts + 1,
            locked_by = p_worker, locked_at = now(),
            lease_expires_at = now() + make_interval(secs => p_lease_secs), updated_at = now()
        FROM picked WHERE j.id = picked.id AND j.status = 'pending'
        RETURNING j.id, j.payload, j.attempts, j.max_attempts, j.tenant_id
    )
    SELECT * FROM claimed;
END
$$;
