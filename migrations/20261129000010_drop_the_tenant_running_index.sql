-- Every claim wrote an entry into queue_jobs_running_idx (tenant_id, lease_expires_at) for
-- each job it took, at one of as many insertion points as there are tenants, and nothing
-- needed it any more: the reaper reads the lease-ordered running index, and a tenant's
-- running jobs (the dashboard's counts, the grant sync's lapsed rows) come from the
-- (tenant_id, status, queue) index, which every row is in anyway. With it gone, a claim of
-- 100 plus its completion ran at 1.02-1.26x the rate with it (median 1.11x, eight
-- alternating pgbench pairs of 5 s, 4 clients, 400,000 jobs over 100 tenants; PostgreSQL
-- was the bottleneck), see docs/benchmarks.md, twentieth round.
DROP INDEX queue_jobs_running_idx;
