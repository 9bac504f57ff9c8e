-- New abandoned carts, for the abandoned_cart activation's sensor.
--
-- Parameter (bound by the framework): :since, the latest load time the sensor has seen.
-- Returns one row: the earliest and latest event times and the latest load time of the
-- abandonments loaded after it (all NULL when none arrived). The sensor runs every window
-- from the earliest event's to the latest's; a checkout needs no run of its own (the audience
-- leaves out carts checked out since).
SELECT
    min(occurred_at) AS first_event_at,
    max(occurred_at) AS last_event_at,
    max(loaded_at) AS loaded_until
FROM cart_events
WHERE loaded_at > :since
  AND event_type = 'cart_abandoned'
