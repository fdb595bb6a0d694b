-- A job's error history keeps its newest 50 entries. Retries are bounded by max_attempts, but
-- deferrals spend no attempt (a mailbox whose request slots stay full, a send-rate minute), so
-- nothing else bounds how many entries a long-waiting job collects, and the history is read
-- whole by the dashboard and carried in the row.
CREATE FUNCTION queue_errors_append(history jsonb, entry jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN jsonb_array_length(history) >= 50
                THEN jsonb_path_query_array(history, '$[last - 48 to last]')
                     || jsonb_build_array(entry)
                ELSE history || jsonb_build_array(entry) END
$$;
