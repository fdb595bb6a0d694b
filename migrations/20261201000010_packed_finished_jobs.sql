-- A successful job leaves queue_jobs at its completion and is kept, for the dashboard and
-- retention, packed with the rest of its completion flush: one row here per queue per flush.
-- Updated in place, a finished job wrote a second row version and two index entries (the
-- primary key's and the finished index's) into a table that only grew; deleted and packed,
-- it writes a delete mark and a hundredth of a row and of its index entries. The row types
-- stay those of queue_jobs, so `queue_jobs_all` reads both as one table.
--
-- Jobs with an idempotency key stay in queue_jobs when done: their key's unique index must
-- keep answering for them until retention removes them.
CREATE TABLE queue_jobs_done (
    queue text NOT NULL,
    finished_at timestamptz NOT NULL,
    -- The smallest and largest id in `jobs`, so that a job is found by id without unpacking
    -- the history.
    job_ids int8range NOT NULL,
    -- The tenants of `jobs`, each once, so that a reader narrowed to one tenant passes over
    -- the rows without its jobs without unpacking them.
    tenant_ids uuid[] NOT NULL,
    jobs queue_jobs[] NOT NULL,
    -- cardinality(jobs), which counts without reading the packed jobs themselves.
    job_count int NOT NULL CHECK (job_count > 0)
);

-- Packed rows are written once and read rarely: compressing them would cost the completion
-- flush CPU for space retention gives back within days.
ALTER TABLE queue_jobs_done ALTER COLUMN jobs SET STORAGE EXTERNAL;

CREATE INDEX queue_jobs_done_finished_idx ON queue_jobs_done (finished_at);
CREATE INDEX queue_jobs_done_ids_idx ON queue_jobs_done USING gist (job_ids);

CREATE VIEW queue_jobs_all AS
    SELECT * FROM queue_jobs
    UNION ALL
    SELECT j.* FROM queue_jobs_done d CROSS JOIN LATERAL unnest(d.jobs) AS j;

-- The packed rows newest first, for a page of the ops job list.
CREATE INDEX queue_jobs_done_newest_idx ON queue_jobs_done (upper(job_ids));

-- A page of packed jobs, newest first: at most `p_limit` of `p_queue` (NULL: any) with an id
-- below `p_before` (NULL: any), matching the tenant, account and error text (an ILIKE
-- pattern body, already escaped) when those are given. The packed rows are walked newest
-- first and the walk stops once `p_limit` matches lie at or above the next row's largest id:
-- no row after it can hold a newer one. The newest page of a million packed jobs then
-- unpacks a row or two instead of all of them; a filter that matches few jobs still walks
-- as far as it must.
CREATE FUNCTION queue_jobs_done_page(p_queue text, p_tenant uuid, p_account uuid,
                                     p_error text, p_before bigint, p_limit int)
RETURNS SETOF queue_jobs
LANGUAGE plpgsql STABLE AS $$
DECLARE
    packed record;
    found queue_jobs[] := '{}';
BEGIN
    FOR packed IN
        SELECT d.job_ids, d.tenant_ids, d.jobs FROM queue_jobs_done d
        WHERE (p_queue IS NULL OR d.queue = p_queue)
          AND (p_before IS NULL OR lower(d.job_ids) < p_before)
        ORDER BY upper(d.job_ids) DESC
    LOOP
        CONTINUE WHEN p_tenant IS NOT NULL AND NOT p_tenant = ANY (packed.tenant_ids);
        EXIT WHEN (SELECT count(*) FROM unnest(found) f WHERE f.id >= upper(packed.job_ids))
                  >= p_limit;
        found := found || ARRAY(
            SELECT j FROM unnest(packed.jobs) j
            WHERE (p_before IS NULL OR j.id < p_before)
              AND (p_tenant IS NULL OR j.tenant_id = p_tenant)
              AND (p_account IS NULL OR j.email_account_id = p_account)
              AND (p_error IS NULL OR j.last_error ILIKE '%' || p_error || '%'));
    END LOOP;
    RETURN QUERY SELECT f.* FROM unnest(found) f ORDER BY f.id DESC LIMIT p_limit;
END
$$;
