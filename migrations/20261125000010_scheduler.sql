-- The scheduler's leader lease and Microsoft Graph change-notification subscriptions.

-- One row per singleton duty. Any replica may take the lease once it expired; only the holder
-- renews it. Taking and renewing is one UPDATE, so two replicas can never both win.
CREATE TABLE scheduler_leases (
    name                    text PRIMARY KEY,
    holder                  text,
    expires_at              timestamptz NOT NULL DEFAULT '-infinity',
    acquired_at             timestamptz,
    renewed_at              timestamptz
);
INSERT INTO scheduler_leases (name) VALUES ('scheduler');

-- One Graph subscription per watched mailbox folder. The clientState Graph echoes in every
-- notification is a per-subscription random secret; only its SHA-256 is stored, which is all
-- the webhook endpoint needs to check it.
CREATE TABLE graph_subscriptions (
    subscription_id         text PRIMARY KEY,
    tenant_id               uuid NOT NULL,
    email_account_id        uuid NOT NULL,
    folder                  text NOT NULL,
    resource                text NOT NULL,
    client_state_hash       bytea NOT NULL CHECK (length(client_state_hash) = 32),
    expires_at              timestamptz NOT NULL,
    created_at              timestamptz NOT NULL DEFAULT now(),
    renewed_at              timestamptz,
    -- Set by a `reauthorizationRequired` lifecycle event: the scheduler renews it next.
    reauthorize_requested_at timestamptz,
    -- Set by a `subscriptionRemoved` lifecycle event: Graph dropped it; the scheduler recreates.
    removed_at              timestamptz,
    UNIQUE (email_account_id, folder),
    FOREIGN KEY (tenant_id, email_account_id)
        REFERENCES helpdesk_email_accounts(tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX graph_subscriptions_expiry_idx ON graph_subscriptions (expires_at);
