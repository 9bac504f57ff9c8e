-- Win-back on WhatsApp: customers likely to lapse whose last order is at least 60 days old.
--
-- Parameters (bound by the framework, never pasted in):
--   :lapse_threshold  minimum lapse-risk score, 0..1 (activation default 0.7)
--   :as_of            the partition's point in time: only facts known then are used
--
-- Portable SQL (runs unchanged on DuckDB and PostgreSQL).
--
-- Returns one row per customer with the audience contract's columns: customer_id, phone,
-- country, consent per channel and purpose (latest record wins, an opt-out wins a tie;
-- no record = NULL = no consent), the last inbound WhatsApp time, and the template variables.
--
-- Consent is always the latest known, never "as of" the partition: a customer who opted out
-- since must not be messaged by a backfill.
WITH latest_consent AS (
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
last_order AS (
    SELECT customer_id, max(ordered_at) AS last_order_at, count(*) AS order_count
    FROM orders
    WHERE ordered_at <= :as_of
    GROUP BY customer_id
),
inbound AS (
    SELECT customer_id, max(last_inbound_at) AS whatsapp_last_inbound_at
    FROM last_inbound_messages
    WHERE channel = 'whatsapp'
    GROUP BY customer_id
)
SELECT
    c.customer_id,
    c.first_name,
    c.phone,
    c.country,
    c.timezone,
    c.language,
    s.lapse_risk,
    co.whatsapp_marketing_consent,
    co.sms_marketing_consent,
    i.whatsapp_last_inbound_at,
    lo.last_order_at,
    lo.order_count,
    CAST(CAST(:as_of AS DATE) - CAST(lo.last_order_at AS DATE) AS INTEGER) AS days_since_last_order,
    'COMEBACK-' || upper(substr(md5(CAST(c.customer_id AS VARCHAR)), 1, 6)) AS offer_code
FROM customers AS c
JOIN lapse_scores AS s ON s.customer_id = c.customer_id
JOIN last_order AS lo ON lo.customer_id = c.customer_id
LEFT JOIN consent AS co ON co.customer_id = c.customer_id
LEFT JOIN inbound AS i ON i.customer_id = c.customer_id
WHERE s.lapse_risk > :lapse_threshold
  AND lo.last_order_at < :as_of - INTERVAL '60 days'
