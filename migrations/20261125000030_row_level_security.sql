-- Tenant isolation enforced by PostgreSQL itself.
--
-- graphdesk_app: what api handlers and job handlers run as (each connection does SET ROLE).
-- It owns nothing and has no BYPASSRLS; every help-desk row it can see or write belongs to the
-- tenant named by the transaction-local setting app.tenant_id. With no tenant set it sees
-- nothing at all.
--
-- graphdesk_system: the explicit, separate path for cross-tenant work (the scheduler, the ops
-- dashboard, the queue, OAuth states before their tenant is known, webhook routing).
--
-- Roles are cluster-wide; creating them tolerates another database having done it first.
DO $$
BEGIN
    CREATE ROLE graphdesk_app NOLOGIN NOBYPASSRLS;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END $$;
DO $$
BEGIN
    CREATE ROLE graphdesk_system NOLOGIN NOBYPASSRLS;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END $$;

GRANT USAGE ON SCHEMA public TO graphdesk_app, graphdesk_system;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO graphdesk_app, graphdesk_system;
GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO graphdesk_app, graphdesk_system;
ALTER DEFAULT PRIVILEGES IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO graphdesk_app, graphdesk_system;
ALTER DEFAULT PRIVILEGES IN SCHEMA public
    GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO graphdesk_app, graphdesk_system;
-- The migration history is not the application's business.
REVOKE ALL ON _sqlx_migrations FROM graphdesk_app;
GRANT SELECT ON _sqlx_migrations TO graphdesk_app, graphdesk_system;

-- The tenant of the current transaction, or NULL.
CREATE FUNCTION graphdesk_current_tenant() RETURNS uuid
    LANGUAGE sql STABLE
    AS $$ SELECT nullif(current_setting('app.tenant_id', true), '')::uuid $$;

ALTER TABLE tenants ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON tenants TO graphdesk_app
    USING (id = graphdesk_current_tenant()) WITH CHECK (id = graphdesk_current_tenant());
CREATE POLICY system_access ON tenants TO graphdesk_system USING (true) WITH CHECK (true);

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY[
        'helpdesk_email_accounts', 'helpdesk_sync_state', 'helpdesk_tickets',
        'helpdesk_messages', 'helpdesk_message_sightings', 'helpdesk_outbound_sends',
        'oauth_states', 'audit_log', 'graph_subscriptions'
    ] LOOP
        CONTINUE WHEN to_regclass(t) IS NULL;
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format(
            'CREATE POLICY tenant_isolation ON %I TO graphdesk_app
                 USING (tenant_id = graphdesk_current_tenant())
                 WITH CHECK (tenant_id = graphdesk_current_tenant())', t);
        EXECUTE format(
            'CREATE POLICY system_access ON %I TO graphdesk_system USING (true) WITH CHECK (true)', t);
    END LOOP;
END $$;
