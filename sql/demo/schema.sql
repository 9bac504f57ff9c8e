-- Demo warehouse schema (DuckDB).
--
-- The shape of a typical CDP / CRM export that the audience SQL in sql/audiences/ is written
-- against. Columns are deliberately "as the CRM stores them": phones are free text (E.164,
-- national formats, junk), consents are an append-only history (latest row wins), suppressions
-- hold numbers in yet another textual format. Filled by sql/demo/generate.sql.

CREATE OR REPLACE TABLE customers (
    customer_id BIGINT PRIMARY KEY,
    first_name  VARCHAR NOT NULL,
    last_name   VARCHAR NOT NULL,
    phone       VARCHAR,              -- free text as typed into the CRM, may be NULL or invalid
    country     VARCHAR NOT NULL,     -- ISO 3166-1 alpha-2
    timezone    VARCHAR,              -- IANA name, may be NULL or not a real zone
    language    VARCHAR NOT NULL,     -- e.g. en, de, es, pt_BR
    created_at  TIMESTAMPTZ NOT NULL
);

-- Append-only consent history: one row per change per (customer, channel, purpose).
-- The row with the greatest recorded_at wins; on an exact tie an opt-out wins.
CREATE OR REPLACE TABLE channel_consents (
    customer_id BIGINT NOT NULL,
    channel     VARCHAR NOT NULL,     -- 'whatsapp' | 'sms'
    purpose     VARCHAR NOT NULL,     -- 'marketing' | 'transactional'
    opted_in    BOOLEAN NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL
);

CREATE OR REPLACE TABLE lapse_scores (
    customer_id BIGINT NOT NULL,
    lapse_risk  DOUBLE NOT NULL,      -- 0..1, higher = more likely to churn
    scored_at   TIMESTAMPTZ NOT NULL
);

-- Last customer-initiated message per channel (opens the WhatsApp 24-hour service window).
CREATE OR REPLACE TABLE last_inbound_messages (
    customer_id     BIGINT NOT NULL,
    channel         VARCHAR NOT NULL,
    last_inbound_at TIMESTAMPTZ NOT NULL  -- a few lie in the future (clock skew, bad data)
);

-- Numbers that must never be messaged. phone is free text in a different format from
-- customers.phone, so matching needs normalisation to E.164 first.
CREATE OR REPLACE TABLE suppressions (
    phone    VARCHAR NOT NULL,
    channel  VARCHAR,                 -- NULL = every channel, else 'sms' | 'whatsapp'
    reason   VARCHAR NOT NULL,
    added_at TIMESTAMPTZ NOT NULL
);

CREATE OR REPLACE TABLE orders (
    order_id    BIGINT NOT NULL,
    customer_id BIGINT NOT NULL,
    ordered_at  TIMESTAMPTZ NOT NULL,
    amount      DECIMAL(10, 2) NOT NULL,
    currency    VARCHAR NOT NULL      -- ISO 4217
);

-- Braze Currents' WhatsApp message events as they land in a warehouse (read by the status
-- source sql/statuses/braze_currents.sql). Empty in the demo, which sends through Meta and
-- Twilio, whose statuses come back as webhooks.
CREATE OR REPLACE TABLE braze_currents_whatsapp_events (
    id                  VARCHAR NOT NULL,  -- the event's id
    event_type          VARCHAR NOT NULL,  -- users.messages.whatsapp.{Send,Delivery,Read,Failure}
    external_user_id    VARCHAR,
    dispatch_id         VARCHAR,
    "time"              BIGINT NOT NULL,   -- Unix seconds
    provider_error_code VARCHAR
);

-- Shopping-cart events from the web and app tracker, landed by a streaming loader: one row per
-- event. `loaded_at` is when the row reached the warehouse, which is what an event-driven
-- activation's sensor watches (sql/events/cart_events.sql); `occurred_at` is when the customer
-- did it. `cdp-activation demo --live` keeps appending rows.
CREATE OR REPLACE TABLE cart_events (
    event_id    VARCHAR NOT NULL,
    customer_id BIGINT NOT NULL,
    cart_id     VARCHAR NOT NULL,
    event_type  VARCHAR NOT NULL,     -- 'cart_abandoned' | 'checkout_completed'
    item_name   VARCHAR NOT NULL,
    cart_value  DECIMAL(10, 2) NOT NULL,
    occurred_at TIMESTAMPTZ NOT NULL,
    loaded_at   TIMESTAMPTZ NOT NULL
);

-- Followers of the brand's WeChat Official Account: the openid WeChat gave each follower for
-- the account (28 characters), which template messages are addressed to.
CREATE OR REPLACE TABLE wechat_followers (
    customer_id BIGINT NOT NULL,
    openid      VARCHAR NOT NULL,
    followed_at TIMESTAMPTZ NOT NULL
);
