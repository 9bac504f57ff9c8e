-- Abandoned carts of one window: customers who left a cart in [:window_start, :window_end),
-- within the last hour, and have not checked out since.
--
-- Parameters (bound by the framework, never pasted in):
--   :window_start, :window_end  the partition's window (UTC), e.g. 10:15 to 10:30
--   :as_of                      the window's end, or now while it is open
--
-- Portable SQL (runs unchanged on DuckDB and PostgreSQL). One row per customer: their latest
-- abandoned cart of the window, with the audience contract's columns (consent per channel
-- and purpose, latest record wins, an opt-out wins a tie) and the template's variables.
-- The ledger's key (activation, window, customer, step) messages a customer once a window,
-- however often the sensor runs it; `ledger_recent_sends` leaves out anyone messaged a
-- marketing message in the last day, so two carts in two windows are not two reminders.
WITH carts AS (
    SELECT
        customer_id,
        item_name,
        cart_value,
        occurred_at,
        row_number() OVER (PARTITION BY customer_id ORDER BY occurred_at DESC) AS recency
    FROM cart_events
    WHERE event_type = 'cart_abandoned'
      AND occurred_at >= :window_start
      AND occurred_at < :window_end
      AND occurred_at >= :as_of - INTERVAL '1 hour'
),
latest_cart AS (
    SELECT customer_id, item_name, cart_value, occurred_at AS abandoned_at
    FROM carts
    WHERE recency = 1
),
latest_consent AS (
    SELECT
        customer_id,
        channel,
        purpose,
        opted_in,
        row_number() OVER (
            PARTITION BY customer_id, channel, purpose
            ORDER BY recorded_at DESC, opted_in ASC
        ) AS recency
    FROM channel_consents
),
consent AS (
    SELECT
        customer_id,
        bool_or(opted_in) FILTER (WHERE channel = 'whatsapp' AND purpose = 'marketing')
            AS whatsapp_marketing_consent,
        bool_or(opted_in) FILTER (WHERE channel = 'sms' AND purpose = 'marketing')
            AS sms_marketing_consent
    FROM latest_consent
    WHERE recency = 1
    GROUP BY customer_id
),
recently_messaged AS (
    SELECT DISTINCT customer_id
    FROM ledger_recent_sends
    WHERE purpose = 'marketing' AND sends_24h > 0
)
SELECT
    c.customer_id,
    c.first_name,
    c.phone,
    c.country,
    c.timezone,
    co.whatsapp_marketing_consent,
    co.sms_marketing_consent,
    lc.item_name,
    lc.abandoned_at
FROM latest_cart AS lc
JOIN customers AS c ON c.customer_id = lc.customer_id
LEFT JOIN consent AS co ON co.customer_id = c.customer_id
WHERE NOT EXISTS (
        SELECT 1
        FROM cart_events AS e
        WHERE e.customer_id = lc.customer_id
          AND e.event_type = 'checkout_completed'
          AND e.occurred_at > lc.abandoned_at
    )
  AND CAST(c.customer_id AS VARCHAR) NOT IN (SELECT customer_id FROM recently_messaged)
