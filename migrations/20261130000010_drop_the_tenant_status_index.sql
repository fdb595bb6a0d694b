-- Every claim and every completion wrote an entry into queue_jobs_tenant_status_idx
-- (tenant_id, status, queue), the one index on queue_jobs without a predicate, so every row
-- version of every job is in it. Its readers now have other paths:
--
-- - a tenant's pending jobs: the per-tenant pending index (queue_jobs_tenant_claim_idx);
-- - running jobs, per tenant or per worker (the dashboard's tenants page, the grant sync's
--   lapsed rows, the grants given back at shutdown): one walk of the lease index, which holds
--   the running jobs only, a few hundred where the tenant/status index held every job ever;
-- - the scheduler's check for a recent ValidateAccount of an account: a partial index of that
--   queue's jobs alone (below), which the hot path never writes;
-- - the dashboard's per-tenant counts by queue and status read the table, as its all-tenants
--   counts always did.
--
-- Without it, a claim of 100 plus its completion ran at 1.07-1.18x the rate with it (median
-- 1.14x, six alternating pgbench pairs of 5 s, 4 clients, 400,000 jobs over 100 tenants; the
-- server's CPU was the bottleneck), see docs/benchmarks.md, twenty-first round.
DROP INDEX queue_jobs_tenant_status_idx;

CREATE INDEX queue_jobs_validation_idx ON queue_jobs (email_account_id, created_at)
    WHERE queue = 'graphdesk.validate_account';

-- The grant sync as in 20261128000020, except how a lapsed row's running jobs are counted:
-- once per sync for all lapsed rows together, from the lease index, instead of a lookup per
-- row in the tenant/status index.
CREATE OR REPLACE FUNCTION queue_sync_tenant_grants(
    p_worker text, p_queues text[], p_lock bigint, p_default_limit integer,
    p_ttl_secs double precision, p_tenants uuid[], p_bounds integer[],
    p_discover integer, p_discover_from uuid, p_linger_secs double precision)
RETURNS TABLE (tenant_id uuid, slots integer)
LANGUAGE plpgsql VOLATILE
-- Each step of the skip scan must come from the per-tenant index. On a queue never analyzed
-- the planner took the queue's head index and sorted every pending job instead, at every
-- step: 1.5 s per sync over 100 tenants and 20,000 jobs, against a few milliseconds.
SET enable_sort = off
SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    q text;
    t uuid;
    found uuid[] := '{}';
    n integer := 0;
    wrapped boolean;
    due boolean;
    lapsed_worker text[] := '{}';
    lapsed_tenant uuid[] := '{}';
    lapsed_running integer[] := '{}';
BEGIN
    -- Which tenants have due jobs in the worker's queues: one index descent per tenant (a
    -- skip scan), outside the lock since it needs no consistency with the grants. Each step
    -- starts strictly after the last tenant found, so no tenant's backlog is walked through.
    FOREACH q IN ARRAY p_queues LOOP
        n := 0;
        SELECT j.tenant_id, j.run_at <= now() INTO t, due FROM queue_jobs j
        WHERE j.queue = q AND j.status = 'pending' AND j.tenant_id >= p_discover_from
        ORDER BY j.queue, j.tenant_id, j.priority DESC, j.run_at, j.id LIMIT 1;
        IF t IS NULL THEN
            -- Nothing from the starting point on: wrap around to the lowest tenant.
            SELECT j.tenant_id, j.run_at <= now() INTO t, due FROM queue_jobs j
            WHERE j.queue = q AND j.status = 'pending' AND j.tenant_id IS NOT NULL
            ORDER BY j.queue, j.tenant_id, j.priority DESC, j.run_at, j.id LIMIT 1;
            wrapped := true;
        ELSE
            wrapped := false;
        END IF;
        WHILE t IS NOT NULL AND n < p_discover LOOP
            n := n + 1;
            -- The tenant's first job in claim order is usually due itself; only when it is
            -- not (a retry waiting out its backoff ahead of the rest) is the tenant looked at
            -- again, still in the pending index, for any due job.
            IF due OR EXISTS (SELECT 1 FROM queue_jobs j
                              WHERE j.queue = q AND j.status = 'pending' AND j.tenant_id = t
                                AND j.run_at <= now()
                              ORDER BY j.queue, j.tenant_id, j.priority DESC, j.run_at, j.id
                              LIMIT 1) THEN
                found := found || t;
            END IF;
            SELECT j.tenant_id, j.run_at <= now() INTO t, due FROM queue_jobs j
            WHERE j.queue = q AND j.status = 'pending' AND j.tenant_id > t
            ORDER BY j.queue, j.tenant_id, j.priority DESC, j.run_at, j.id LIMIT 1;
            IF t IS NULL AND NOT wrapped THEN
                wrapped := true;
                SELECT j.tenant_id, j.run_at <= now() INTO t, due FROM queue_jobs j
                WHERE j.queue = q AND j.status = 'pending' AND j.tenant_id IS NOT NULL
                ORDER BY j.queue, j.tenant_id, j.priority DESC, j.run_at, j.id LIMIT 1;
            END IF;
            IF wrapped AND t >= p_discover_from THEN
                t := NULL;
            END IF;
        END LOOP;
    END LOOP;

    -- From here on every grant is decided on what the other workers hold now (each statement
    -- below takes its snapshot after the lock is granted).
    PERFORM pg_advisory_xact_lock(p_lock);
    -- What each lapsed row stands for: its worker's running jobs of its tenant. Lapsed rows
    -- are rare (a dead or cut-off worker), so the usual sync reads nothing here.
    IF EXISTS (SELECT 1 FROM queue_tenant_grants g WHERE g.expires_at < now()) THEN
        WITH lapsed AS MATERIALIZED (
            SELECT DISTINCT g.worker_id FROM queue_tenant_grants g WHERE g.expires_at < now()
        ), running AS MATERIALIZED (
            SELECT r.locked_by, r.tenant_id, count(*)::integer AS n FROM queue_jobs r
            WHERE r.status = 'running' AND r.tenant_id IS NOT NULL
              AND r.locked_by IN (SELECT l.worker_id FROM lapsed l)
            GROUP BY r.locked_by, r.tenant_id
        )
        SELECT coalesce(array_agg(r.locked_by), '{}'), coalesce(array_agg(r.tenant_id), '{}'),
               coalesce(array_agg(r.n), '{}')
        INTO lapsed_worker, lapsed_tenant, lapsed_running
        FROM running r;
    END IF;
    -- A lapsed row stays while its worker still runs jobs of the tenant: it stands for them.
    DELETE FROM queue_tenant_grants g
    WHERE g.expires_at < now()
      AND NOT EXISTS (SELECT 1 FROM unnest(lapsed_worker, lapsed_tenant) AS l(w, t)
                      WHERE l.w = g.worker_id AND l.t = g.tenant_id);

    RETURN QUERY
    WITH considered AS (
        SELECT c.tenant_id, max(c.bound) AS bound, bool_or(c.wants) AS wants,
               max(c.wanted_at) AS wanted_at
        FROM (SELECT m.tenant_id, m.bound, false AS wants, NULL::timestamptz AS wanted_at
              FROM unnest(p_tenants, p_bounds) AS m(tenant_id, bound)
              UNION ALL
              SELECT f.t, 0, true, NULL FROM unnest(found) AS f(t)
              UNION ALL
              SELECT g.tenant_id, 0, false, g.wanted_at FROM queue_tenant_grants g
              WHERE g.worker_id = p_worker) c
        GROUP BY c.tenant_id
    ), others AS (
        SELECT c.tenant_id,
               coalesce(sum(CASE WHEN g.expires_at >= now() THEN g.slots
                                 -- A lapsed row: its worker is dead or cannot reach the
                                 -- database, and claims nothing more; its running jobs count
                                 -- until the reaper returns them.
                                 ELSE (SELECT coalesce(sum(l.n), 0)
                                       FROM unnest(lapsed_worker, lapsed_tenant, lapsed_running)
                                           AS l(w, t, n)
                                       WHERE l.w = g.worker_id AND l.t = g.tenant_id)
                            END), 0)::integer AS held,
               count(g.worker_id) FILTER (WHERE g.wants AND g.expires_at >= now())::integer
                   AS rivals
        FROM considered c
        LEFT JOIN queue_tenant_grants g ON g.tenant_id = c.tenant_id AND g.worker_id <> p_worker
        GROUP BY c.tenant_id
    ), decided AS (
        SELECT c.tenant_id, c.bound, c.wants, c.wanted_at,
               CASE WHEN NOT c.wants
                         AND (o.rivals > 0
                              OR c.wanted_at IS NULL
                              OR c.wanted_at < now() - make_interval(secs => p_linger_secs))
               THEN 0
               ELSE greatest(0, least(
                   -- What the others leave free...
                   coalesce(tn.concurrency_limit, p_default_limit) - o.held,
                   -- ...up to a fair share among the workers that want this tenant, so that
                   -- a worker holding all of it gives way as its jobs finish.
                   ceil(coalesce(tn.concurrency_limit, p_default_limit)::numeric
                        / (1 + o.rivals))::integer))
               END AS slots
        FROM considered c
        JOIN others o ON o.tenant_id = c.tenant_id
        LEFT JOIN tenants tn ON tn.id = c.tenant_id
    ), released AS (
        DELETE FROM queue_tenant_grants g
        USING decided d
        WHERE g.tenant_id = d.tenant_id AND g.worker_id = p_worker
          AND greatest(d.slots, d.bound) = 0 AND NOT d.wants
    ), kept AS (
        INSERT INTO queue_tenant_grants AS g
            (tenant_id, worker_id, slots, wants, wanted_at, expires_at)
        SELECT d.tenant_id, p_worker, greatest(d.slots, d.bound), d.wants,
               CASE WHEN d.wants THEN now() ELSE d.wanted_at END,
               now() + make_interval(secs => p_ttl_secs)
        FROM decided d
        WHERE greatest(d.slots, d.bound) > 0 OR d.wants
        ON CONFLICT ON CONSTRAINT queue_tenant_grants_pkey DO UPDATE
            SET slots = excluded.slots, wants = excluded.wants,
                wanted_at = excluded.wanted_at, expires_at = excluded.expires_at
    )
    SELECT d.tenant_id, d.slots FROM decided d WHERE d.slots > 0;
END
$$;
