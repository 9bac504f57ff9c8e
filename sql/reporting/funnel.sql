-- The activation funnel: audience → eligible → sent → delivered → read → converted, per
-- activation, day (partition), country and channel, over the tables cdp-activation exports
-- to the warehouse (the `send_log` and `activation_funnel` assets):
--   activation_decision_counts  each real run's decisions, counted (audience, eligible)
--   activation_send_log         one row per send, in its latest state (sent, delivered, read)
--   activation_conversions      conversions from each experiment's conversion_sql
-- Created as the view `activation_funnel` by the `activation_funnel` asset. Portable SQL
-- (DuckDB and PostgreSQL). One row per stage, long format: `customers` at that stage.
--
-- The audience has no channel (excluded customers have none): its rows say channel 'any'.
-- A customer converts when a conversion of theirs falls within the activation's conversion
-- window after their first message was sent.
WITH decided AS (
    SELECT activation, partition_key, country, channel, decision, customers
    FROM activation_decision_counts
    WHERE step = 'initial'
),
first_sends AS (
    SELECT activation, partition_key, country, channel, customer_id, state, delivery_status,
           sent_at
    FROM activation_send_log
    WHERE step = 'initial' AND state = 'sent'
),
converted AS (
    SELECT s.activation, s.partition_key, s.country, s.channel, s.customer_id
    FROM first_sends AS s
    JOIN activation_conversions AS c
      ON c.activation = s.activation
     AND c.customer_id = s.customer_id
     AND c.converted_at >= s.sent_at
     AND c.converted_at < s.sent_at + c.window_days * INTERVAL '1 day'
    GROUP BY s.activation, s.partition_key, s.country, s.channel, s.customer_id
),
stages AS (
    SELECT activation, partition_key, country, 'any' AS channel, 1 AS stage_order,
           'audience' AS stage, sum(customers) AS customers
    FROM decided
    GROUP BY activation, partition_key, country
    UNION ALL
    SELECT activation, partition_key, country, channel, 2, 'eligible', sum(customers)
    FROM decided
    WHERE decision IN ('send', 'defer')
    GROUP BY activation, partition_key, country, channel
    UNION ALL
    SELECT activation, partition_key, country, channel, 3, 'sent', count(*)
    FROM first_sends
    GROUP BY activation, partition_key, country, channel
    UNION ALL
    SELECT activation, partition_key, country, channel, 4, 'delivered', count(*)
    FROM first_sends
    WHERE delivery_status IN ('delivered', 'read')
    GROUP BY activation, partition_key, country, channel
    UNION ALL
    SELECT activation, partition_key, country, channel, 5, 'read', count(*)
    FROM first_sends
    WHERE delivery_status = 'read'
    GROUP BY activation, partition_key, country, channel
    UNION ALL
    SELECT activation, partition_key, country, channel, 6, 'converted', count(*)
    FROM converted
    GROUP BY activation, partition_key, country, channel
)
SELECT activation, partition_key, country, channel, stage_order, stage,
       CAST(customers AS BIGINT) AS customers
FROM stages
