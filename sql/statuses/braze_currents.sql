-- Braze WhatsApp message events, as Braze Currents exports them to the warehouse, read into
-- the ledger's delivery statuses (status source `braze_currents`; contract in
-- docs/connectors.md). Braze posts no per-message webhooks: this is how its sends get
-- delivered / read / failed. The dispatch id covers a whole API-triggered send of up to 50
-- users, so customer_id narrows each event to its own send.
SELECT
    'braze'                                     AS connector,
    dispatch_id                                 AS provider_message_id,
    external_user_id                            AS customer_id,
    CASE event_type
        WHEN 'users.messages.whatsapp.Send'     THEN 'sent'
        WHEN 'users.messages.whatsapp.Delivery' THEN 'delivered'
        WHEN 'users.messages.whatsapp.Read'     THEN 'read'
        WHEN 'users.messages.whatsapp.Failure'  THEN 'failed'
    END                                         AS status,
    to_timestamp("time")                        AS occurred_at,
    provider_error_code                         AS error_code
FROM braze_currents_whatsapp_events
WHERE to_timestamp("time") >= :since
  AND event_type IN (
      'users.messages.whatsapp.Send',
      'users.messages.whatsapp.Delivery',
      'users.messages.whatsapp.Read',
      'users.messages.whatsapp.Failure'
  )
