-- graphdesk schema: the help-desk store and the job queue share one database.
-- Every help-desk table carries tenant_id so Row Level Security can enforce isolation.

CREATE TABLE tenants (
    id                      uuid PRIMARY KEY,
    name                    text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    -- NULL: the deployment default (WORKER_TENANT_CONCURRENCY) applies.
    concurrency_limit       integer CHECK (concurrency_limit IS NULL OR concurrency_limit > 0),
    audit_retention_days    integer NOT NULL DEFAULT 90 CHECK (audit_retention_days > 0),
    created_at              timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE helpdesk_email_accounts (
    id                      uuid PRIMARY KEY,
    tenant_id               uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    email_address           text NOT NULL,
    display_name            text,
    -- The Microsoft Graph user id (GET /me id); stable across renames.
    ms_user_id              text,
    status                  text NOT NULL DEFAULT 'pending'
                            CHECK (status IN ('pending', 'active', 'needs_reauth', 'error', 'disabled')),
    status_reason           text,
    -- AES-SIV ciphertexts (nonce || ciphertext), bound to tenant, account and column.
    access_token_enc        bytea,
    refresh_token_enc       bytea,
    token_key_id            text,
    token_expires_at        timestamptz,
    granted_scopes          text,
    token_refreshed_at      timestamptz,
    sync_interval_seconds   integer NOT NULL DEFAULT 60 CHECK (sync_interval_seconds >= 10),
    sync_folders            text[] NOT NULL DEFAULT ARRAY['inbox'],
    -- The first sync ingests mail received on or after this instant only.
    sync_since              timestamptz,
    last_sync_started_at    timestamptz,
    last_sync_success_at    timestamptz,
    last_sync_error         text,
    messages_ingested       bigint NOT NULL DEFAULT 0,
    duplicates_skipped      bigint NOT NULL DEFAULT 0,
    throttled_until         timestamptz,
    validation              jsonb,
    validated_at            timestamptz,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, email_address),
    UNIQUE (tenant_id, id)
);

CREATE TABLE helpdesk_sync_state (
    tenant_id               uuid NOT NULL,
    email_account_id        uuid NOT NULL,
    folder                  text NOT NULL,
    delta_link              text,
    full_syncs              integer NOT NULL DEFAULT 0,
    last_synced_at          timestamptz,
    PRIMARY KEY (email_account_id, folder),
    FOREIGN KEY (tenant_id, email_account_id)
        REFERENCES helpdesk_email_accounts(tenant_id, id) ON DELETE CASCADE
);

CREATE TABLE helpdesk_tickets (
    -- The number agents and customers see: the token [#id] in reply subjects.
    id                      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id               uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    email_account_id        uuid NOT NULL,
    subject                 text NOT NULL,
    normalized_subject      text NOT NULL,
    customer_email          text NOT NULL,
    status                  text NOT NULL DEFAULT 'open'
                            CHECK (status IN ('open', 'pending', 'solved', 'closed', 'archived')),
    conversation_id         text,
    -- Set when threading evidence later proves two tickets are one conversation.
    merged_into_ticket_id   bigint REFERENCES helpdesk_tickets(id),
    microsoft_message_id    text,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now(),
    last_message_at         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, id),
    FOREIGN KEY (tenant_id, email_account_id)
        REFERENCES helpdesk_email_accounts(tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX helpdesk_tickets_account_idx ON helpdesk_tickets (email_account_id);
CREATE INDEX helpdesk_tickets_ms_message_idx ON helpdesk_tickets (tenant_id, microsoft_message_id);
CREATE INDEX helpdesk_tickets_conversation_idx ON helpdesk_tickets (tenant_id, conversation_id);
CREATE INDEX helpdesk_tickets_subject_idx ON helpdesk_tickets (tenant_id, normalized_subject, customer_email);
CREATE INDEX helpdesk_tickets_status_idx ON helpdesk_tickets (tenant_id, status, last_message_at DESC);

CREATE TABLE helpdesk_messages (
    id                      uuid PRIMARY KEY,
    tenant_id               uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    -- The mailbox that first saw this message; helpdesk_message_sightings records every mailbox.
    email_account_id        uuid NOT NULL,
    ticket_id               bigint NOT NULL,
    direction               text NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    microsoft_message_id    text NOT NULL,
    internet_message_id     text,
    in_reply_to             text,
    "references"            text[] NOT NULL DEFAULT '{}',
    conversation_id         text,
    subject                 text NOT NULL DEFAULT '',
    from_address            text NOT NULL DEFAULT '',
    from_name               text,
    to_recipients           jsonb NOT NULL DEFAULT '[]',
    cc_recipients           jsonb NOT NULL DEFAULT '[]',
    body_html               text,
    body_text               text,
    body_preview            text,
    received_at             timestamptz,
    sent_at                 timestamptz,
    is_auto_reply           boolean NOT NULL DEFAULT false,
    auto_reply_reason       text,
    -- Which threading rule put this message on its ticket (explainable threading).
    thread_rule             text NOT NULL,
    thread_detail           text,
    attachments             jsonb NOT NULL DEFAULT '[]',
    created_at              timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, email_account_id, microsoft_message_id),
    FOREIGN KEY (tenant_id, ticket_id) REFERENCES helpdesk_tickets(tenant_id, id) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, email_account_id)
        REFERENCES helpdesk_email_accounts(tenant_id, id) ON DELETE CASCADE
);
-- One message per internetMessageId per tenant: the same mail delivered to two monitored
-- mailboxes is one message on one ticket.
CREATE UNIQUE INDEX helpdesk_messages_internet_id_uniq
    ON helpdesk_messages (tenant_id, internet_message_id) WHERE internet_message_id IS NOT NULL;
CREATE INDEX helpdesk_messages_ms_message_idx ON helpdesk_messages (microsoft_message_id);
CREATE INDEX helpdesk_messages_ticket_idx ON helpdesk_messages (ticket_id, received_at);
CREATE INDEX helpdesk_messages_in_reply_to_idx ON helpdesk_messages (tenant_id, in_reply_to);
CREATE INDEX helpdesk_messages_references_idx ON helpdesk_messages USING gin ("references");

CREATE TABLE helpdesk_message_sightings (
    tenant_id               uuid NOT NULL,
    email_account_id        uuid NOT NULL,
    microsoft_message_id    text NOT NULL,
    message_id              uuid NOT NULL REFERENCES helpdesk_messages(id) ON DELETE CASCADE,
    folder                  text NOT NULL,
    removed_at              timestamptz,
    first_seen_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, email_account_id, microsoft_message_id),
    FOREIGN KEY (tenant_id, email_account_id)
        REFERENCES helpdesk_email_accounts(tenant_id, id) ON DELETE CASCADE
);

CREATE TABLE helpdesk_outbound_sends (
    id                      uuid PRIMARY KEY,
    tenant_id               uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    ticket_id               bigint NOT NULL,
    email_account_id        uuid NOT NULL,
    idempotency_key         text NOT NULL,
    -- sha256 of the canonical request, so a reused key with another body is detected.
    request_hash            text NOT NULL,
    status                  text NOT NULL DEFAULT 'queued'
                            CHECK (status IN ('queued', 'draft_created', 'sent', 'confirmed', 'failed')),
    to_recipients           jsonb NOT NULL,
    cc_recipients           jsonb NOT NULL DEFAULT '[]',
    subject                 text NOT NULL,
    body_html               text NOT NULL,
    reply_to_message_id     uuid REFERENCES helpdesk_messages(id),
    draft_id                text,
    internet_message_id     text,
    sent_message_id         text,
    message_id              uuid REFERENCES helpdesk_messages(id),
    failure_reason          text,
    job_id                  bigint,
    created_by              text NOT NULL,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now(),
    sent_at                 timestamptz,
    UNIQUE (tenant_id, idempotency_key),
    FOREIGN KEY (tenant_id, ticket_id) REFERENCES helpdesk_tickets(tenant_id, id) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, email_account_id)
        REFERENCES helpdesk_email_accounts(tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX helpdesk_outbound_sends_ticket_idx ON helpdesk_outbound_sends (ticket_id);

-- OAuth `state` values: single use, bound to tenant and user, expiring.
CREATE TABLE oauth_states (
    -- sha256 of the state; the state itself only travels through the browser.
    state_hash              text PRIMARY KEY,
    tenant_id               uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    user_subject            text NOT NULL,
    -- The PKCE verifier, encrypted like the tokens.
    code_verifier_enc       bytea NOT NULL,
    created_at              timestamptz NOT NULL DEFAULT now(),
    expires_at              timestamptz NOT NULL,
    consumed_at             timestamptz
);
CREATE INDEX oauth_states_created_idx ON oauth_states (created_at);

CREATE TABLE audit_log (
    id                      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id               uuid REFERENCES tenants(id) ON DELETE CASCADE,
    actor                   text NOT NULL,
    action                  text NOT NULL,
    entity_type             text NOT NULL,
    entity_id               text NOT NULL,
    details                 jsonb NOT NULL DEFAULT '{}',
    created_at              timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_tenant_time_idx ON audit_log (tenant_id, created_at);

-- The job queue. One table for every queue; apalis workers read it through graphdesk's own
-- backend (see ARCHITECTURE.md for why not apalis-postgres).
CREATE TABLE queue_jobs (
    id                      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue                   text NOT NULL,
    tenant_id               uuid,
    email_account_id        uuid,
    payload                 jsonb NOT NULL,
    status                  text NOT NULL DEFAULT 'pending'
                            CHECK (status IN ('pending', 'running', 'done', 'dead', 'cancelled')),
    priority                smallint NOT NULL DEFAULT 0,
    attempts                integer NOT NULL DEFAULT 0,
    max_attempts            integer NOT NULL CHECK (max_attempts > 0),
    run_at                  timestamptz NOT NULL DEFAULT now(),
    locked_by               text,
    locked_at               timestamptz,
    lease_expires_at        timestamptz,
    idempotency_key         text,
    -- At most one pending job per coalesce key (e.g. one SyncMailbox per account and folder).
    coalesce_key            text,
    last_error              text,
    -- One entry per failed or deferred attempt: {attempt, at, kind, error}.
    errors                  jsonb NOT NULL DEFAULT '[]',
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now(),
    finished_at             timestamptz
);
CREATE UNIQUE INDEX queue_jobs_idempotency_uniq ON queue_jobs (queue, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE UNIQUE INDEX queue_jobs_coalesce_uniq ON queue_jobs (queue, coalesce_key)
    WHERE coalesce_key IS NOT NULL AND status = 'pending';
CREATE INDEX queue_jobs_claim_idx ON queue_jobs (queue, priority DESC, run_at, id)
    WHERE status = 'pending';
CREATE INDEX queue_jobs_running_idx ON queue_jobs (tenant_id, lease_expires_at)
    WHERE status = 'running';
CREATE INDEX queue_jobs_lease_idx ON queue_jobs (lease_expires_at) WHERE status = 'running';
CREATE INDEX queue_jobs_finished_idx ON queue_jobs (finished_at)
    WHERE status IN ('done', 'dead', 'cancelled');
CREATE INDEX queue_jobs_tenant_status_idx ON queue_jobs (tenant_id, status, queue);
