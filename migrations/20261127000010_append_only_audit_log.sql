-- The audit log is append-only for the application: a compromised or buggy handler must not be
-- able to rewrite or erase the record of what was done. The system role keeps DELETE because
-- the scheduler's retention clean-up (jobs/src/scheduler/sql.rs, purge_audit) removes rows past
-- their tenant's retention; nothing ever updates an audit row.
--
-- Only these two roles are touched: the login user that owns the table (and runs migrations)
-- keeps its owner's rights. A table created later still gets the roles' default privileges
-- (row_level_security migration); this revocation is for audit_log alone.
REVOKE UPDATE, DELETE, TRUNCATE ON audit_log FROM graphdesk_app;
REVOKE UPDATE, TRUNCATE ON audit_log FROM graphdesk_system;
