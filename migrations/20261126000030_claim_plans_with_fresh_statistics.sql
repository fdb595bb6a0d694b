-- The limit-aware claim with plans that survive fresh statistics. Earlier revisions were
-- measured on queues that had never been analyzed (autovacuum is off on the benchmark
-- server); any real deployment analyzes queue_jobs as it churns. On a queue of 20,000 pending
-- jobs over 100 tenants, 75 of them at their limit, analyzed, one claim of 100 jobs took
-- 178 ms: the final UPDATE joined `picked` by a nested loop over a sequential scan of the
-- whole table (19,700 rows x 100). With `id = ANY(array)` it takes about 6 ms. The deep
-- claim's skip scan, ordered by tenant alone, was served from the (tenant_id, status, queue)
-- index on the same statistics; it now orders by the per-tenant pending index's whole key.
-- Tenants at their limit are now skipped by `NOT IN (subquery)`, a hashed lookup, instead
-- of `<> ALL (array)`, which compared every scanned job with every saturated tenant: at the
-- SQL level (pgbench, same queue, candidate selection alone) 2.2-2.9 ms against 3.1-4.3 ms.
-- Otherwise the function is 20261126000020's, restated because a function is replaced whole.
CREATE OR REPLACE FUNCTION queue_claim_limited(
    p_queue text, p_n integer, p_worker text, p_lease_secs double precision,
    p_candidates integer, p_default_limit integer, p_lock bigint,
    p_deep boolean,
    p_deep_from uuid, p_deep_tenants integer)
RETURNS TABLE (id bigint, payload jsonb, attempts integer, max_attempts integer, tenant_id uuid)
LANGUAGE plpgsql VOLATILE
SET enable_hashjoin = off
SET enable_mergejoin = off
SET enable_bitmapscan = off
SET enable_sort = off
SET jit = off
AS $$
#variable_conflict use_column
BEGIN
    -- Serialises limited claims so each reads running counts no other claim is changing; the
    -- next statement's snapshot is taken after the lock is granted (see 20261125000020).
    PERFORM pg_advisory_xact_lock(p_lock);
    RETURN QUERY
    WITH RECURSIVE busy AS MATERIALIZED (
        -- Per tenant, its load on the scale of the default limit: its running jobs, plus
        -- (default - its own limit) when it has an override. A tenant has room while its
        -- load is below the default, so no candidate needs its own limit looked up.
        SELECT x.tenant_id, sum(x.n) AS n
        FROM (SELECT r.tenant_id, 1 AS n FROM queue_jobs r
              WHERE r.status = 'running' AND r.tenant_id IS NOT NULL
              UNION ALL
              SELECT t.id, p_default_limit - t.concurrency_limit FROM tenants t
              WHERE t.concurrency_limit IS NOT NULL) x
        GROUP BY x.tenant_id
    ), upper_half(tenant_id, k) AS (
        -- Deep claims only: the tenants with a pending job in this queue, one index descent
        -- each (a skip scan), however long any one tenant's backlog is. At most
        -- p_deep_tenants of them, from p_deep_from (the worker picks it at random) up to the
        -- highest tenant id and then on from the lowest, so that with many tenants each deep
        -- claim stays cheap and over several of them every tenant gets its turn.
        -- Each descent orders by the whole key of the per-tenant pending index, which no other
        -- index serves without a sort: by tenant alone, fresh statistics chose the (tenant_id,
        -- status, queue) index, which walks through every finished job of each tenant.
        (SELECT q.tenant_id, 1 FROM queue_jobs q
         WHERE p_deep AND q.queue = p_queue AND q.status = 'pending' AND q.tenant_id >= p_deep_from
         ORDER BY q.tenant_id, q.priority DESC, q.run_at, q.id LIMIT 1)
        UNION ALL
        SELECT (SELECT q.tenant_id FROM queue_jobs q
                WHERE q.queue = p_queue AND q.status = 'pending' AND q.tenant_id > w.tenant_id
                ORDER BY q.tenant_id, q.priority DESC, q.run_at, q.id LIMIT 1), w.k + 1
        FROM upper_half w WHERE w.tenant_id IS NOT NULL AND w.k < p_deep_tenants
    ), lower_half(tenant_id, k) AS (
        (SELECT q.tenant_id, (SELECT count(u.tenant_id) FROM upper_half u) + 1 FROM queue_jobs q
         WHERE p_deep AND q.queue = p_queue AND q.status = 'pending' AND q.tenant_id IS NOT NULL
           AND q.tenant_id < p_deep_from
           AND (SELECT count(u.tenant_id) FROM upper_half u) < p_deep_tenants
         ORDER BY q.tenant_id, q.priority DESC, q.run_at, q.id LIMIT 1)
        UNION ALL
        SELECT (SELECT q.tenant_id FROM queue_jobs q
                WHERE q.queue = p_queue AND q.status = 'pending' AND q.tenant_id > w.tenant_id
                  AND q.tenant_id < p_deep_from
                ORDER BY q.tenant_id, q.priority DESC, q.run_at, q.id LIMIT 1), w.k + 1
        FROM lower_half w WHERE w.tenant_id IS NOT NULL AND w.k < p_deep_tenants
    ), waiting AS (
        SELECT u.tenant_id FROM upper_half u UNION ALL SELECT l.tenant_id FROM lower_half l
    ), candidates AS MATERIALIZED (
        -- The usual claim: the head of the queue, bounded, minus tenants at their limit.
        (SELECT h.id, h.tenant_id, h.priority, h.run_at
         FROM (SELECT q.id, q.tenant_id, q.priority, q.run_at FROM queue_jobs q
               WHERE NOT p_deep AND q.queue = p_queue AND q.status = 'pending'
                 AND q.run_at <= now()
               ORDER BY q.priority DESC, q.run_at, q.id
               LIMIT greatest(p_candidates * 10, 2000)) h
         -- NOT IN over a subquery is a hashed lookup; `<> ALL (array)` compared each
         -- scanned job with every saturated tenant (1,300 jobs x 75 tenants per claim).
         WHERE h.tenant_id IS NULL
            OR h.tenant_id NOT IN (SELECT b.tenant_id FROM busy b WHERE b.n >= p_default_limit)
         ORDER BY h.priority DESC, h.run_at, h.id
         LIMIT p_candidates)
        UNION ALL
        -- The deep claim: up to its limit from each tenant with room...
        SELECT c.id, w.tenant_id, c.priority, c.run_at
        FROM waiting w
        LEFT JOIN tenants t ON t.id = w.tenant_id
        CROSS JOIN LATERAL (
            SELECT q.id, q.priority, q.run_at FROM queue_jobs q
            -- A range, not `=`: with `=` the planner drops tenant_id from the ORDER BY as a
            -- constant, and the head index needs no sort again.
            WHERE q.queue = p_queue AND q.tenant_id >= w.tenant_id AND q.tenant_id <= w.tenant_id
              AND q.status = 'pending' AND q.run_at <= now()
            ORDER BY q.tenant_id, q.priority DESC, q.run_at, q.id
            LIMIT coalesce(t.concurrency_limit, p_default_limit)) c
        WHERE w.tenant_id IS NOT NULL
          AND w.tenant_id NOT IN (SELECT b.tenant_id FROM busy b WHERE b.n >= p_default_limit)
        UNION ALL
        -- ...and jobs without a tenant, which no limit applies to.
        (SELECT q.id, q.tenant_id, q.priority, q.run_at FROM queue_jobs q
         WHERE p_deep AND q.queue = p_queue AND q.tenant_id IS NULL AND q.status = 'pending'
           AND q.run_at <= now()
         ORDER BY q.tenant_id, q.priority DESC, q.run_at, q.id
         LIMIT p_n)
    ), ranked AS (
        -- Per tenant: its load first, then its candidates in claim order; a candidate fits
        -- while the running total up to it stays within the default limit.
        SELECT x.id, x.tenant_id, x.priority, x.run_at,
               sum(x.weight) OVER (PARTITION BY x.tenant_id
                                   ORDER BY x.id IS NOT NULL, x.priority DESC, x.run_at, x.id)
                   AS used
        FROM (SELECT c.id, c.tenant_id, 1::bigint AS weight, c.priority, c.run_at
              FROM candidates c
              UNION ALL
              SELECT NULL, b.tenant_id, b.n, NULL, NULL FROM busy b) x
    ), picked AS (
        SELECT r.id FROM ranked r
        WHERE r.id IS NOT NULL AND (r.tenant_id IS NULL OR r.used <= p_default_limit)
        ORDER BY r.priority DESC, r.run_at, r.id
        LIMIT p_n
    )
    -- Candidates are not row-locked: limited claims cannot race each other (the lock), and
    -- the status re-check on the latest row version skips a job anything else took meanwhile.
    -- The rows are found by `id = ANY(array)`, which only the primary key serves: joined to
    -- `picked`, fresh statistics planned a nested loop over a sequential scan of the table.
    UPDATE queue_jobs j SET status = 'running', attempts = j.attempts + 1,
        locked_by = p_worker, locked_at = now(),
        lease_expires_at = now() + make_interval(secs => p_lease_secs), updated_at = now()
    WHERE j.id = ANY (ARRAY(SELECT p.id FROM picked p)) AND coalesce(j.status, '') = 'pending'
    RETURNING j.id, j.payload, j.attempts, j.max_attempts, j.tenant_id;
END
$$;
