-- A delta round's progress: the nextLink of the last page committed, so a sync that crashed
-- mid-round resumes where it stopped instead of starting over.
ALTER TABLE helpdesk_sync_state ADD COLUMN next_link text;
ALTER TABLE helpdesk_sync_state ADD COLUMN last_error text;
ALTER TABLE helpdesk_sync_state ADD COLUMN round_started_at timestamptz;
