-- Since the slot grants (20261128000010) no worker calls queue_claim_limited: claims take
-- only the slots granted to their process. The function stayed behind, and a test still
-- exercised it as if it were what workers run. Dropping it also stops a worker of a release
-- before the grants, left running during an upgrade, from claiming limited jobs outside the
-- grants (its claims now fail and it backs off) instead of overshooting tenants' limits.
DROP FUNCTION queue_claim_limited(text, integer, text, double precision, integer, integer,
                                  bigint, boolean, uuid, integer);
