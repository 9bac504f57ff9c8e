-- Order shipped on WeChat (transactional): followers of the Official Account who ordered in
-- the :days_back days before :as_of get a template message (a service notice) about their
-- latest order, addressed by the openid WeChat gave them for the account. Following the
-- account is what WeChat asks before a service notice; the warehouse's consent history has no
-- WeChat records, so being a follower is the consent here.
--
-- Parameters (bound by the framework, never pasted in):
--   :days_back  how many days of orders to follow up (activation default 7)
--   :as_of      the partition's point in time
--
-- Transactional messages need transactional consent, per channel (latest record wins, an
-- opt-out wins a tie). Portable SQL: runs unchanged on DuckDB and PostgreSQL.
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
    WHERE purpose = 'transactional'
),
consent AS (
    SELECT
        customer_id,
        bool_or(opted_in) FILTER (WHERE channel = 'sms') AS sms_transactional_consent
    FROM latest_consent
    WHERE recency = 1
    GROUP BY customer_id
),
latest_order AS (
    SELECT
        customer_id,
        order_id,
        ordered_at,
        row_number() OVER (PARTITION BY customer_id ORDER BY ordered_at DESC, order_id DESC)
            AS recency
    FROM orders
    WHERE ordered_at <= :as_of
)
SELECT
    c.customer_id,
    c.first_name,
    c.phone,
    c.country,
    c.timezone,
    c.language,
    f.openid AS wechat_openid,
    f.openid IS NOT NULL AS wechat_transactional_consent,
    co.sms_transactional_consent,
    'your order' AS item_name,
    lo.ordered_at,
    'ORD-' || CAST(lo.order_id AS VARCHAR) AS order_ref
FROM customers AS c
JOIN latest_order AS lo ON lo.customer_id = c.customer_id AND lo.recency = 1
LEFT JOIN consent AS co ON co.customer_id = c.customer_id
LEFT JOIN wechat_followers AS f ON f.customer_id = c.customer_id
WHERE CAST(:as_of AS DATE) - CAST(lo.ordered_at AS DATE) <= :days_back
