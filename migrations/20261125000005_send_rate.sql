-- Outlook accepts about 30 sends per minute per mailbox: counted here across every worker.
CREATE TABLE graph_send_rate (
    email_account_id    uuid NOT NULL,
    minute_start        timestamptz NOT NULL,
    sends               integer NOT NULL DEFAULT 0,
    PRIMARY KEY (email_account_id, minute_start)
);
