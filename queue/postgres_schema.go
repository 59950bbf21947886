package queue

// pgSteps are the queue's schema steps, component "queue" of pgmigrate:
// each runs once, in order; a step, once released, is never changed, and
// a change of schema is a new step at the end.
//
// queue_messages holds one row per message: record is the message
// encoded as the bbolt Store encodes it (encodeRecord), and the other
// columns copy what the queries select by, so that no query decodes a
// record to find its rows. A row whose lease_owner is set and whose
// lease_until has not passed is being delivered by that owner; token
// names that attempt. queue_bodies holds each message's content in
// chunks: seq 0 is the head (all of it for a message not spooled), and
// seq 1… the rest, pgChunk bytes each but the last.
var pgSteps = []string{
	`CREATE SEQUENCE queue_token;
	CREATE TABLE queue_messages (
		id           text PRIMARY KEY,
		record       bytea NOT NULL,
		received     timestamptz NOT NULL,
		next_attempt timestamptz NOT NULL,
		held         boolean NOT NULL DEFAULT false,
		lease_owner  text,
		lease_until  timestamptz,
		token        bigint
	);
	CREATE INDEX queue_messages_due ON queue_messages (next_attempt, id) WHERE NOT held;
	CREATE INDEX queue_messages_received ON queue_messages (received);
	CREATE INDEX queue_messages_held ON queue_messages (id) WHERE held;
	CREATE INDEX queue_messages_leased ON queue_messages (lease_until) WHERE lease_owner IS NOT NULL;
	CREATE TABLE queue_bodies (
		id   text NOT NULL,
		seq  integer NOT NULL,
		data bytea NOT NULL,
		PRIMARY KEY (id, seq)
	);
	-- Message content is rarely worth compressing chunk by chunk, and
	-- uncompressed chunks are read by offset without decompressing.
	ALTER TABLE queue_bodies ALTER COLUMN data SET STORAGE EXTERNAL;`,
	// The IDs that Import stored, kept after their messages leave the
	// queue, so that a second import of the same file copies nothing.
	`CREATE TABLE queue_imported (
		id text PRIMARY KEY,
		at timestamptz NOT NULL DEFAULT now()
	);`,
	// The history: one row per message (head is its History without
	// events, outcome and left), its recipients apart for the lookup by
	// recipient, and its events in the order they were added. Lookups go
	// by index: by recipient, sender, user or Message-ID, newest first.
	`CREATE TABLE queue_history (
		id       text PRIMARY KEY,
		head     bytea NOT NULL,
		sender   text NOT NULL,
		username text NOT NULL,
		msg_id   text NOT NULL,
		received timestamptz NOT NULL,
		left_at  timestamptz,
		outcome  text NOT NULL DEFAULT ''
	);
	CREATE INDEX queue_history_received ON queue_history (received);
	CREATE INDEX queue_history_sender ON queue_history (sender, received);
	CREATE INDEX queue_history_user ON queue_history (username, received) WHERE username <> '';
	CREATE INDEX queue_history_msg_id ON queue_history (msg_id, received) WHERE msg_id <> '';
	CREATE INDEX queue_history_left ON queue_history (left_at) WHERE left_at IS NOT NULL;
	CREATE TABLE queue_history_rcpts (
		rcpt     text NOT NULL,
		received timestamptz NOT NULL,
		id       text NOT NULL,
		PRIMARY KEY (rcpt, received, id)
	);
	CREATE INDEX queue_history_rcpts_id ON queue_history_rcpts (id);
	CREATE TABLE queue_history_events (
		id    text NOT NULL,
		seq   bigint GENERATED ALWAYS AS IDENTITY,
		event bytea NOT NULL,
		PRIMARY KEY (id, seq)
	);`,
	// The webhook outbox: each post, due at next_try, about an event of
	// at.
	`CREATE TABLE queue_webhooks (
		id       text PRIMARY KEY,
		at       timestamptz NOT NULL,
		next_try timestamptz NOT NULL,
		post     bytea NOT NULL
	);
	CREATE INDEX queue_webhooks_due ON queue_webhooks (next_try);
	CREATE INDEX queue_webhooks_at ON queue_webhooks (at);`,
}
