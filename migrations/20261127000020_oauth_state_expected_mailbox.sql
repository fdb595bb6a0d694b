-- The mailbox a sign-in was started for: a reconnect of an existing account, or a connect with
-- a login_hint. The callback refuses a sign-in as any other mailbox (login_hint only pre-fills
-- Microsoft's sign-in; the person may still sign in as someone else). NULL: a connect without
-- a hint, which connects whoever signs in.
ALTER TABLE oauth_states ADD COLUMN expected_mailbox text;
