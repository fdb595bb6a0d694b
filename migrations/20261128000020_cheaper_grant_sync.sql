-- Two costs of the grant sync, which every worker process with tenant limits runs several
-- times a second. On the benchmark's server (autovacuum off, so every finished job leaves dead
-- index entries behind until vacuum) a sync over 100 tenants took 15-30 ms, most of the extra
-- PostgreSQL CPU that limits cost per job:
--
-- 1. Discovery checked each tenant for a due job with an EXISTS that the planner served from
--    the (tenant_id, status, queue) index, which keeps an entry for every status a job ever
--    had: about 200 buffers per tenant. The skip scan already reads each tenant's first
--    pending job from the pending-only index; that row now says whether the tenant has a due
--    job in the common case, and the fallback check reads the same index (its ORDER BY
--    matches it and sorts are off in the function).
--
-- 2. Every sync counted, per tenant, the running jobs no live grant covers (a dead worker's),
--    walking the running-jobs index through the dead entry each completed job leaves: about
--    27 buffers per tenant per sync. Instead, a lapsed grant row now stays while its worker
--    still has running jobs of the tenant, and such a row counts exactly those jobs (live rows
--    count their slots, which bound their worker's jobs). A lapsed row is deleted once its
--    worker runs nothing of the tenant, so the count runs only for dead or unreachable
--    workers. What no longer counts: running jobs of a worker that never held a grant, which
--    is one running with limits off (it ignores limits whatever others count).
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
    -- A lapsed row stays while its worker still runs jobs of the tenant: it stands for them.
    DELETE FROM queue_tenant_grants g
    WHERE g.expires_at < now()
      AND NOT EXISTS (SELECT 1 FROM queue_jobs r
                      WHERE r.tenant_id = g.tenant_id AND r.status = 'running'
                        AND r.locked_by = g.worker_id);

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
                                 ELSE (SELECT count(*) FROM queue_jobs r
                                       WHERE r.tenant_id = g.tenant_id AND r.status = 'running'
                                         AND r.locked_by = g.worker_id)
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
