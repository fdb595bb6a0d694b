-- Microsoft limits each mailbox to 4 concurrent requests and 10,000 per 10 minutes per app.
-- These rows hold those limits across every worker process and host.

-- One row per (account, slot); a request holds a slot until its response is read. A holder
-- that dies leaves a slot whose lease expires.
CREATE TABLE graph_mailbox_slots (
    email_account_id    uuid NOT NULL,
    slot                integer NOT NULL,
    holder              uuid,
    expires_at          timestamptz,
    PRIMARY KEY (email_account_id, slot)
);

-- Fixed 10-minute windows of request counts.
CREATE TABLE graph_mailbox_budget (
    email_account_id    uuid NOT NULL,
    window_start        timestamptz NOT NULL,
    requests            integer NOT NULL DEFAULT 0,
    PRIMARY KEY (email_account_id, window_start)
);
