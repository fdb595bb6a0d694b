-- Tenant limits by slot grants. Until now every limited claim took one cluster-wide advisory
-- lock and counted the running jobs of every tenant, so limited claims ran one at a time and
-- each paid for the count, the window over its candidates and a head scan that passed over
-- tenants at their limit (docs/benchmarks.md: limits cost 32-45% of throughput). Now each
-- worker process holds, per tenant, a number of slots granted to it here, and claims only
-- within them, counting its own jobs in memory; its claims need no lock and no count, and run
-- beside each other's with SKIP LOCKED. Only the grants are serialised, a few times a second
-- per process (queue_sync_tenant_grants below), not every claim.
--
-- The limit holds because, per tenant, the slots of live grants plus the tenant's running jobs
-- that no live grant covers (a dead worker's, until the reaper takes them back) never exceed
-- the limit when a grant is made, and a worker never holds more of a tenant's jobs than its
-- row says. A row's `slots` is an upper bound on what its worker may hold until it next
-- syncs: the worker reports the most it can reach before it hears back (its current grant
-- or what it holds, whichever is larger), so a grant shrinks only once the jobs above the
-- new grant have finished.
CREATE TABLE queue_tenant_grants (
    tenant_id uuid NOT NULL,
    worker_id text NOT NULL,
    slots integer NOT NULL CHECK (slots >= 0),
    -- The worker saw the tenant's due jobs at its last sync: holders yield it a fair share.
    wants boolean NOT NULL,
    -- When the worker last saw them. It keeps its slots for a while after (while no other
    -- worker wants the tenant), so the tenant's next job starts without waiting for a sync.
    wanted_at timestamptz,
    -- A worker renews its rows at every sync (at least three times per lease); a dead
    -- worker's rows lapse with its jobs' leases, and its running jobs are then counted as
    -- uncovered until the reaper returns them.
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, worker_id)
);

-- p_tenants / p_bounds: the tenants the worker holds slots or jobs of, each with the most it
-- may hold until this call returns. p_queues: the queues it runs, where it looks for tenants
-- with due jobs (up to p_discover of them, from p_discover_from on, wrapping around).
-- p_linger_secs: how long the worker keeps a tenant's slots after it last saw the tenant's due
-- jobs, while no other worker wants them.
-- Returns every tenant now granted to the worker, with the slots it may fill from now on.
CREATE FUNCTION queue_sync_tenant_grants(
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
BEGIN
    -- Which tenants have due jobs in the worker's queues: one index descent per tenant (a
    -- skip scan), outside the lock since it needs no consistency with the grants. Each step
    -- starts strictly after the last tenant found, so no tenant's backlog is walked through.
    FOREACH q IN ARRAY p_queues LOOP
        n := 0;
        SELECT j.tenant_id INTO t FROM queue_jobs j
        WHERE j.queue = q AND j.status = 'pending' AND j.tenant_id >= p_discover_from
        ORDER BY j.tenant_id, j.priority DESC, j.run_at, j.id LIMIT 1;
        IF t IS NULL THEN
            -- Nothing from the starting point on: wrap around to the lowest tenant.
            SELECT j.tenant_id INTO t FROM queue_jobs j
            WHERE j.queue = q AND j.status = 'pending' AND j.tenant_id IS NOT NULL
            ORDER BY j.tenant_id, j.priority DESC, j.run_at, j.id LIMIT 1;
            wrapped := true;
        ELSE
            wrapped := false;
        END IF;
        WHILE t IS NOT NULL AND n < p_discover LOOP
            n := n + 1;
            IF EXISTS (SELECT 1 FROM queue_jobs j
                       WHERE j.queue = q AND j.status = 'pending' AND j.tenant_id = t
                         AND j.run_at <= now()) THEN
                found := found || t;
            END IF;
            SELECT j.tenant_id INTO t FROM queue_jobs j
            WHERE j.queue = q AND j.status = 'pending' AND j.tenant_id > t
            ORDER BY j.tenant_id, j.priority DESC, j.run_at, j.id LIMIT 1;
            IF t IS NULL AND NOT wrapped THEN
                wrapped := true;
                SELECT j.tenant_id INTO t FROM queue_jobs j
                WHERE j.queue = q AND j.status = 'pending' AND j.tenant_id IS NOT NULL
                ORDER BY j.tenant_id, j.priority DESC, j.run_at, j.id LIMIT 1;
            END IF;
            IF wrapped AND t >= p_discover_from THEN
                t := NULL;
            END IF;
        END LOOP;
    END LOOP;

    -- From here on every grant is decided on what the other workers hold now (each statement
    -- below takes its snapshot after the lock is granted).
    PERFORM pg_advisory_xact_lock(p_lock);
    DELETE FROM queue_tenant_grants g WHERE g.expires_at < now();

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
               coalesce(sum(g.slots), 0)::integer AS held,
               count(g.worker_id) FILTER (WHERE g.wants)::integer AS rivals
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
                   coalesce(tn.concurrency_limit, p_default_limit) - o.held - u.uncovered,
                   -- ...up to a fair share among the workers that want this tenant, so that
                   -- a worker holding all of it gives way as its jobs finish.
                   ceil(coalesce(tn.concurrency_limit, p_default_limit)::numeric
                        / (1 + o.rivals))::integer))
               END AS slots
        FROM considered c
        JOIN others o ON o.tenant_id = c.tenant_id
        LEFT JOIN tenants tn ON tn.id = c.tenant_id
        CROSS JOIN LATERAL (
            -- Running jobs no live grant covers: a dead worker's, until the reaper returns
            -- them.
            SELECT count(*)::integer AS uncovered FROM queue_jobs r
            WHERE r.tenant_id = c.tenant_id AND r.status = 'running'
              AND r.locked_by <> p_worker
              AND NOT EXISTS (SELECT 1 FROM queue_tenant_grants g
                              WHERE g.tenant_id = r.tenant_id AND g.worker_id = r.locked_by)) u
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
