-- Demo warehouse generator (DuckDB). Run after sql/demo/schema.sql.
--
-- Inputs (DuckDB variables, set by cdp_activation.demo_data with SET VARIABLE):
--   getvariable('customers')  BIGINT       number of customers to make
--   getvariable('seed')       BIGINT       changes every pseudo-random choice
--   getvariable('as_of')      TIMESTAMPTZ  "now" of the demo: every time is relative to it
--
-- Determinism: no random(). Every choice is hash(seed, row key, salt) where the salt names the
-- column or decision, so a value depends only on (seed, row, salt) and never on thread count,
-- scan order or chunking. Row identifiers (customer_id, order_id) are computed, not numbered
-- with row_number(), for the same reason. The same (customers, seed, as_of) always yields the
-- same table contents (row order inside a table is not promised).
--
-- Everything is set-based: one INSERT ... SELECT per table, so DuckDB runs it in parallel and
-- spills to disk when it must. Statements are separated by semicolons and no semicolon appears
-- anywhere else, so a caller may split the file naively.

-- ---------------------------------------------------------------------------------------------
-- Helpers (TEMP: they live in this connection only and are not stored in the warehouse).
-- ---------------------------------------------------------------------------------------------

-- Pseudo-random integer in [0, m) for one key and a salt.
CREATE OR REPLACE TEMP MACRO demo_r(k, salt, m) AS
    (hash(getvariable('seed')::BIGINT, k::BIGINT, salt) % m)::BIGINT;

-- Same for a two-part key, e.g. (customer, channel/purpose) or (customer, order number).
CREATE OR REPLACE TEMP MACRO demo_r2(k1, k2, salt, m) AS
    (hash(getvariable('seed')::BIGINT, k1::BIGINT, k2::BIGINT, salt) % m)::BIGINT;

CREATE OR REPLACE TEMP MACRO demo_as_of() AS getvariable('as_of')::TIMESTAMPTZ;

CREATE OR REPLACE TEMP MACRO demo_ago(secs) AS demo_as_of() - to_seconds(secs::BIGINT);

-- Households: about 0.25% of customers reuse the phone (and surname and country) of the
-- customer just before them, so about 0.5% of customers share an identical phone string.
-- A customer can be either the sharing one or the shared-with one, never both.
CREATE OR REPLACE TEMP MACRO demo_hh_flag(i) AS demo_r(i, 'household', 10000) < 25;

CREATE OR REPLACE TEMP MACRO demo_hh_member(i) AS
    i > 1 AND demo_hh_flag(i) AND NOT demo_hh_flag(i - 1);

CREATE OR REPLACE TEMP MACRO demo_hh_partner(i) AS
    i < getvariable('customers')::BIGINT AND demo_hh_member(i + 1);

-- The customer whose identity seeds the phone, surname and country.
CREATE OR REPLACE TEMP MACRO demo_phone_key(i) AS
    CASE WHEN demo_hh_member(i) THEN i - 1 ELSE i END;

-- How the CRM holds the phone: 90% E.164, 6% national format, 3% junk, 1% NULL.
-- Household phones are always E.164 so both rows hold the identical string.
CREATE OR REPLACE TEMP MACRO demo_phone_kind(i) AS
    CASE
        WHEN demo_hh_member(i) OR demo_hh_partner(i) THEN 'e164'
        WHEN demo_r(i, 'phone_kind', 1000) < 900 THEN 'e164'
        WHEN demo_r(i, 'phone_kind', 1000) < 960 THEN 'national'
        WHEN demo_r(i, 'phone_kind', 1000) < 990 THEN 'invalid'
        ELSE 'null'
    END;

-- Subscriber digits: a bijection of the phone key modulo m (2654435761 is prime to 2, 3 and
-- 5, so it is invertible modulo any power of ten and modulo 1.2e8), shifted by a
-- seed-dependent offset. Unlike a hash this never gives two customers the same number by
-- accident (for up to m customers), so the only shared numbers are the households above.
CREATE OR REPLACE TEMP MACRO demo_serial(pk, m) AS
    lpad(
        ((pk * 2654435761 + demo_r(0, 'phone_offset', m)) % m)::VARCHAR,
        length((m - 1)::VARCHAR)::INTEGER,
        '0'
    );

-- National significant number of the mobile of phone key pk, from ranges that libphonenumber
-- (the Python phonenumbers package) accepts as valid mobile (fixed-line-or-mobile in MX and
-- US, where the two cannot be told apart) for the customer's own region. GB uses 71-73 only:
-- parts of 74-79 are pagers, unallocated, or Jersey, Guernsey and Isle of Man numbers (+44 too,
-- but another region). The prefix is picked by hash, the rest is demo_serial.
CREATE OR REPLACE TEMP MACRO demo_nsn(country, pk) AS
    CASE country
        WHEN 'GB' THEN ['71', '72', '73'][1 + demo_r(pk, 'phone_prefix', 3)]
                       || demo_serial(pk, 100000000)
        WHEN 'DE' THEN ['150', '151', '152', '155', '157', '159', '160', '162', '163', '170',
                        '171', '172', '173', '174', '175', '176', '177', '178', '179']
                           [1 + demo_r(pk, 'phone_prefix', 19)]
                       || demo_serial(pk, 100000000)
        WHEN 'ES' THEN ['60', '61', '62', '63', '64', '65', '66', '67', '68', '69',
                        '71', '72', '73', '74'][1 + demo_r(pk, 'phone_prefix', 14)]
                       || demo_serial(pk, 10000000)
        WHEN 'BR' THEN ['11', '21', '31', '41', '51', '61', '71', '81', '19', '47']
                           [1 + demo_r(pk, 'phone_prefix', 10)]
                       || '9' || demo_serial(pk, 100000000)
        WHEN 'IN' THEN '9' || demo_serial(pk, 1000000000)
        WHEN 'MX' THEN ['55', '56', '33', '81'][1 + demo_r(pk, 'phone_prefix', 4)]
                       || demo_serial(pk, 100000000)
        WHEN 'ZA' THEN ['60', '61', '62', '63', '64', '65', '66', '67', '68', '71', '72', '73',
                        '74', '76', '78', '79', '81', '82', '83', '84']
                           [1 + demo_r(pk, 'phone_prefix', 20)]
                       || demo_serial(pk, 10000000)
        -- US: one of 15 area codes, then a 7-digit local number whose exchange starts with
        -- 2-9: 15 x 8e6 numbers, all drawn from one serial so they never collide either
        ELSE ['212', '213', '206', '303', '305', '312', '404', '415', '512', '617', '646',
              '702', '713', '718', '917'][1 + demo_serial(pk, 120000000)::BIGINT // 8000000]
             || (2000000 + demo_serial(pk, 120000000)::BIGINT % 8000000)::VARCHAR
    END;

-- The customer's own country's national notation, as people type it.
CREATE OR REPLACE TEMP MACRO demo_national(country, nsn) AS
    CASE country
        WHEN 'GB' THEN '0' || substr(nsn, 1, 4) || ' ' || substr(nsn, 5)
        WHEN 'DE' THEN '0' || substr(nsn, 1, 3) || ' ' || substr(nsn, 4)
        WHEN 'ES' THEN substr(nsn, 1, 3) || ' ' || substr(nsn, 4, 2) || ' ' || substr(nsn, 6, 2)
                       || ' ' || substr(nsn, 8)
        WHEN 'BR' THEN '(' || substr(nsn, 1, 2) || ') ' || substr(nsn, 3, 5) || '-'
                       || substr(nsn, 8)
        WHEN 'IN' THEN '0' || substr(nsn, 1, 5) || ' ' || substr(nsn, 6)
        WHEN 'MX' THEN substr(nsn, 1, 2) || ' ' || substr(nsn, 3, 4) || ' ' || substr(nsn, 7)
        WHEN 'ZA' THEN '0' || substr(nsn, 1, 2) || ' ' || substr(nsn, 3, 3) || ' ' || substr(nsn, 6)
        ELSE '(' || substr(nsn, 1, 3) || ') ' || substr(nsn, 4, 3) || '-' || substr(nsn, 7)
    END;

-- Junk found in real CRM phone columns. None of it parses as a valid number in any region.
CREATE OR REPLACE TEMP MACRO demo_junk(calling_code, d) AS
    ['', 'n/a', '+' || calling_code || ' 12', '12345', 'call me', '0000', 'unknown',
     '+' || calling_code][1 + d % 8];

-- Lapse risk, uniform on [0, 0.9999] in steps of 0.0001: about 30% above 0.7.
CREATE OR REPLACE TEMP MACRO demo_lapse(i) AS demo_r(i, 'lapse', 10000) / 1e4;

-- Days between as_of and the last order: grows with lapse risk (risk > 0.7 means > 80 days).
CREATE OR REPLACE TEMP MACRO demo_last_order_days(i) AS
    floor(demo_lapse(i) * 120)::BIGINT + demo_r(i, 'last_order', 30);

CREATE OR REPLACE TEMP MACRO demo_order_gap_days(i) AS 10 + demo_r(i, 'order_gap', 50);

CREATE OR REPLACE TEMP MACRO demo_order_count(i) AS demo_r(i, 'order_count', 7);

-- Account age: from 2 days to about 4 years, always older than the customer's first order.
CREATE OR REPLACE TEMP MACRO demo_age_seconds(i) AS
    (demo_last_order_days(i) + greatest(demo_order_count(i) - 1, 0) * demo_order_gap_days(i)
     + 2 + demo_r(i, 'age', 700)) * 86400
    + demo_r(i, 'age_s', 86400);

-- ---------------------------------------------------------------------------------------------
-- Reference data.
-- ---------------------------------------------------------------------------------------------

CREATE OR REPLACE TEMP TABLE demo_countries AS
SELECT *, sum(weight) OVER (ORDER BY ord) - weight AS bucket_lo
FROM (VALUES
    (1, 'GB', 25, '44', 'Europe/London', 'en', 'GBP', 1.0),
    (2, 'DE', 15, '49', 'Europe/Berlin', 'de', 'EUR', 1.2),
    (3, 'ES', 12, '34', 'Europe/Madrid', 'es', 'EUR', 1.2),
    (4, 'BR', 15, '55', 'America/Sao_Paulo', 'pt_BR', 'BRL', 6.0),
    (5, 'IN', 13, '91', 'Asia/Kolkata', 'en', 'INR', 100.0),
    (6, 'MX', 10, '52', 'America/Mexico_City', 'es', 'MXN', 20.0),
    (7, 'ZA', 5, '27', 'Africa/Johannesburg', 'en', 'ZAR', 20.0),
    (8, 'US', 5, '1', 'America/New_York', 'en', 'USD', 1.3)
) AS t(ord, country, weight, calling_code, timezone, language, currency, price_scale);

-- One row per percentage point, so a customer's country is an equality join on hash % 100.
CREATE OR REPLACE TEMP TABLE demo_country_buckets AS
SELECT country, unnest(range(bucket_lo::BIGINT, (bucket_lo + weight)::BIGINT)) AS bucket
FROM demo_countries;

-- ---------------------------------------------------------------------------------------------
-- customers
-- ---------------------------------------------------------------------------------------------

INSERT INTO customers
WITH ids AS (
    SELECT i, demo_phone_key(i) AS pk, demo_phone_kind(i) AS phone_kind
    FROM range(1, getvariable('customers')::BIGINT + 1) AS t(i)
),
base AS (
    SELECT ids.*, c.*, demo_nsn(c.country, pk) AS nsn
    FROM ids
    JOIN demo_country_buckets AS b ON b.bucket = demo_r(ids.pk, 'country', 100)
    JOIN demo_countries AS c ON c.country = b.country
)
SELECT
    i AS customer_id,
    ['Oliver', 'Amelia', 'Jack', 'Isla', 'Harry', 'Ava', 'Lukas', 'Mia', 'Leon', 'Emma',
     'Hugo', 'Lucia', 'Mateo', 'Sofia', 'Pablo', 'Martina', 'Miguel', 'Helena', 'Arthur',
     'Alice', 'Aarav', 'Ananya', 'Vivaan', 'Diya', 'Aditya', 'Saanvi', 'Santiago', 'Valentina',
     'Diego', 'Camila', 'Sipho', 'Thandiwe', 'Liam', 'Olivia', 'Noah', 'Charlotte', 'Ethan',
     'Zanele', 'Rafael', 'Beatriz'][1 + demo_r(i, 'first_name', 40)] AS first_name,
    ['Smith', 'Jones', 'Taylor', 'Brown', 'Williams', 'Muller', 'Schmidt', 'Schneider',
     'Fischer', 'Weber', 'Garcia', 'Fernandez', 'Gonzalez', 'Rodriguez', 'Lopez', 'Silva',
     'Santos', 'Oliveira', 'Souza', 'Pereira', 'Sharma', 'Patel', 'Singh', 'Kumar', 'Gupta',
     'Hernandez', 'Martinez', 'Ramirez', 'Flores', 'Torres', 'Nkosi', 'Dlamini', 'Naidoo',
     'Botha', 'Khumalo', 'Johnson', 'Miller', 'Davis', 'Wilson', 'Moore']
        [1 + demo_r(pk, 'last_name', 40)] AS last_name,
    CASE phone_kind
        WHEN 'e164' THEN '+' || calling_code || nsn
        WHEN 'national' THEN demo_national(country, nsn)
        WHEN 'invalid' THEN demo_junk(calling_code, demo_r(i, 'junk', 1000))
    END AS phone,
    country,
    CASE
        WHEN demo_r(i, 'timezone', 1000) < 5 THEN NULL
        WHEN demo_r(i, 'timezone', 1000) < 10
            THEN ['Mars/Olympus', 'Europe/Londn', 'GMT+25', 'Local'][1 + demo_r(i, 'bad_tz', 4)]
        ELSE timezone
    END AS timezone,
    language,
    demo_ago(demo_age_seconds(i)) AS created_at
FROM base;

-- ---------------------------------------------------------------------------------------------
-- channel_consents: append-only history, latest row wins, an opt-out wins an exact tie.
-- 8% of customers have no consent rows at all. Otherwise each (channel, purpose) has 1 row
-- (70%), 2 rows (18%) or 3 rows (12%). Of the groups with several rows 45% changed their mind
-- (earlier rows hold the opposite of the latest) and 1% end in an exact recorded_at tie
-- between an opt-in and an opt-out. Final opt-in rates are chosen so that about 60% of all
-- customers end opted in to whatsapp marketing and 70% to sms marketing.
-- ---------------------------------------------------------------------------------------------

INSERT INTO channel_consents
WITH combos(ci, channel, purpose, in_permille) AS (
    VALUES (0, 'whatsapp', 'marketing', 652), (1, 'whatsapp', 'transactional', 850),
           (2, 'sms', 'marketing', 761), (3, 'sms', 'transactional', 900)
),
groups AS (
    SELECT
        c.customer_id AS i,
        c.created_at,
        epoch(demo_as_of()) - epoch(c.created_at) AS span_s,
        k.ci, k.channel, k.purpose,
        CASE
            WHEN demo_r2(c.customer_id, k.ci, 'consent_rows', 100) < 70 THEN 1
            WHEN demo_r2(c.customer_id, k.ci, 'consent_rows', 100) < 88 THEN 2
            ELSE 3
        END AS n,
        demo_r2(c.customer_id, k.ci, 'consent_in', 1000) < k.in_permille AS final_in,
        demo_r2(c.customer_id, k.ci, 'consent_changed', 100) < 45 AS changed,
        demo_r2(c.customer_id, k.ci, 'consent_tie', 100) < 1 AS tie
    FROM customers AS c
    CROSS JOIN combos AS k
    WHERE demo_r(c.customer_id, 'consent_none', 100) >= 8
),
expanded AS (
    SELECT
        g.*,
        r.k,
        -- a tie copies the latest row's slot to the row before it
        CASE WHEN g.tie AND g.n > 1 AND r.k = g.n - 1 THEN g.n ELSE r.k END AS slot
    FROM groups AS g
    JOIN range(1, 4) AS r(k) ON r.k <= g.n
)
SELECT
    i AS customer_id,
    channel,
    purpose,
    CASE
        WHEN k = n THEN final_in
        WHEN n > 1 AND (changed OR (tie AND k = n - 1)) THEN NOT final_in
        ELSE final_in
    END AS opted_in,
    -- row k lies in the k-th of n equal slices of the customer's lifetime, so times ascend
    created_at + to_seconds(
        floor(span_s * (slot - 1 + demo_r2(i, ci * 10 + slot, 'consent_at', 1000000) / 1e6) / n)
        ::BIGINT
    ) AS recorded_at
FROM expanded;

-- ---------------------------------------------------------------------------------------------
-- lapse_scores: one per customer, scored 1 to 7 hours before as_of.
-- ---------------------------------------------------------------------------------------------

INSERT INTO lapse_scores
SELECT
    i AS customer_id,
    demo_lapse(i) AS lapse_risk,
    demo_ago(3600 + demo_r(i, 'scored_at', 6 * 3600)) AS scored_at
FROM range(1, getvariable('customers')::BIGINT + 1) AS t(i);

-- ---------------------------------------------------------------------------------------------
-- last_inbound_messages. whatsapp: 0.1% in the future (bad data), 5% within the 24 hours
-- before as_of (open service window), 20% older, the rest never wrote in. sms: 8% at any
-- time in the last year.
-- ---------------------------------------------------------------------------------------------

INSERT INTO last_inbound_messages
SELECT customer_id, channel, last_inbound_at
FROM (
    SELECT
        i AS customer_id,
        'whatsapp' AS channel,
        CASE
            WHEN b < 1 THEN demo_as_of() + to_seconds(60 + demo_r(i, 'wa_inbound_s', 72 * 3600))
            WHEN b < 51 THEN demo_ago(60 + demo_r(i, 'wa_inbound_s', 86400 - 120))
            WHEN b < 251 THEN demo_ago(86400 + 3600 + demo_r(i, 'wa_inbound_s', 180 * 86400))
        END AS last_inbound_at
    FROM (
        SELECT i, demo_r(i, 'wa_inbound', 1000) AS b
        FROM range(1, getvariable('customers')::BIGINT + 1) AS t(i)
    )
    UNION ALL
    SELECT
        i,
        'sms',
        CASE
            WHEN demo_r(i, 'sms_inbound', 1000) < 80
                THEN demo_ago(60 + demo_r(i, 'sms_inbound_s', 365 * 86400))
        END
    FROM range(1, getvariable('customers')::BIGINT + 1) AS t(i)
)
WHERE last_inbound_at IS NOT NULL;

-- ---------------------------------------------------------------------------------------------
-- suppressions: 1% of customers with a usable phone, written in a different notation from
-- the customer row (national vs E.164, '00' international prefix, spaced international), so
-- matching needs normalisation to E.164. 12% of the rows are channel-specific and 10% of the
-- suppressed customers have a second, channel-specific row in yet another notation.
-- ---------------------------------------------------------------------------------------------

INSERT INTO suppressions
WITH picked AS (
    SELECT
        c.customer_id AS i,
        c.country,
        k.calling_code,
        demo_phone_kind(c.customer_id) AS phone_kind,
        demo_nsn(c.country, demo_phone_key(c.customer_id)) AS nsn,
        CASE WHEN demo_r(c.customer_id, 'suppressed_twice', 10) = 0 THEN 2 ELSE 1 END AS n
    FROM customers AS c
    JOIN demo_countries AS k ON k.country = c.country
    WHERE demo_r(c.customer_id, 'suppressed', 1000) < 10
),
usable AS (
    SELECT p.*, r.k
    FROM picked AS p
    JOIN range(1, 3) AS r(k) ON r.k <= p.n
    WHERE p.phone_kind IN ('e164', 'national')
),
rendered AS (
    SELECT
        *,
        (demo_r2(i, k, 'suppression_format', 3) + k - 1) % 3 AS form
    FROM usable
)
SELECT
    CASE form
        -- the "other" notation: national where the CRM has E.164, E.164 where it has national
        WHEN 0 THEN CASE phone_kind
            WHEN 'e164' THEN demo_national(country, nsn)
            ELSE '+' || calling_code || nsn
        END
        -- international call prefix (US dialling uses 011, so US numbers keep a spaced +1)
        WHEN 1 THEN CASE country
            WHEN 'US' THEN '+1 ' || demo_national(country, nsn)
            ELSE '00' || calling_code || ' ' || nsn
        END
        ELSE '+' || calling_code || ' ' || substr(nsn, 1, 3) || ' ' || substr(nsn, 4)
    END AS phone,
    CASE
        WHEN k = 2 THEN ['sms', 'whatsapp'][1 + demo_r(i, 'suppression_channel', 2)]
        WHEN demo_r(i, 'suppression_scope', 100) < 12
            THEN ['whatsapp', 'sms'][1 + demo_r(i, 'suppression_channel', 2)]
    END AS channel,
    ['stop_keyword', 'user_request', 'complaint', 'carrier_blocked', 'legal_hold']
        [1 + demo_r2(i, k, 'suppression_reason', 5)] AS reason,
    demo_ago(3600 + demo_r2(i, k, 'suppression_added', 400 * 86400)) AS added_at
FROM rendered;

-- ---------------------------------------------------------------------------------------------
-- orders: 0 to 6 per customer. The last one is demo_last_order_days before as_of, which grows
-- with lapse risk, and earlier ones are spaced by a per-customer gap. order_id is computed
-- from (customer, order number), so it is stable across runs and thread counts.
-- ---------------------------------------------------------------------------------------------

INSERT INTO orders
WITH buyers AS (
    SELECT
        c.customer_id AS i,
        k.currency,
        k.price_scale,
        demo_order_count(c.customer_id) AS n,
        demo_last_order_days(c.customer_id) AS last_days,
        demo_order_gap_days(c.customer_id) AS gap_days
    FROM customers AS c
    JOIN demo_countries AS k ON k.country = c.country
)
SELECT
    i * 8 + r.k AS order_id,
    i AS customer_id,
    demo_ago((last_days + (n - r.k) * gap_days) * 86400 + demo_r2(i, r.k, 'order_s', 86400))
        AS ordered_at,
    ((5 + demo_r2(i, r.k, 'order_amount', 19500) / 100) * price_scale)::DECIMAL(10, 2) AS amount,
    currency
FROM buyers
JOIN range(1, 7) AS r(k) ON r.k <= buyers.n;

-- ---------------------------------------------------------------------------------------------
-- cart_events: about 1% of customers abandoned a cart in the two hours before as_of, each
-- loaded 5 to 35 s later; a third of them came back and checked out 10 to 40 minutes after.
-- ---------------------------------------------------------------------------------------------

INSERT INTO cart_events
WITH abandoned AS (
    SELECT
        customer_id AS i,
        demo_ago(300 + demo_r(customer_id, 'cart_at', 7200)) AS occurred_at
    FROM customers
    WHERE demo_r(customer_id, 'cart', 100) = 0
),
events AS (
    SELECT i, 'cart_abandoned' AS event_type, occurred_at FROM abandoned
    UNION ALL
    SELECT i, 'checkout_completed', occurred_at + to_seconds(600 + demo_r(i, 'checkout_s', 1800))
    FROM abandoned
    WHERE demo_r(i, 'checkout', 3) = 0
      AND occurred_at + to_seconds(600 + demo_r(i, 'checkout_s', 1800)) < demo_as_of()
)
SELECT
    'ev-' || i || '-' || event_type AS event_id,
    i AS customer_id,
    'cart-' || i AS cart_id,
    event_type,
    ['running shoes', 'rain jacket', 'espresso machine', 'headphones', 'backpack',
     'yoga mat'][1 + demo_r(i, 'cart_item', 6)] AS item_name,
    (19 + demo_r(i, 'cart_value', 18000) / 100)::DECIMAL(10, 2) AS cart_value,
    occurred_at,
    least(occurred_at + to_seconds(5 + demo_r(i, 'cart_loaded', 30)), demo_as_of()) AS loaded_at
FROM events;

-- ---------------------------------------------------------------------------------------------
-- wechat_followers: about 5% of customers follow the Official Account.
-- ---------------------------------------------------------------------------------------------

INSERT INTO wechat_followers
SELECT
    customer_id,
    'o' || lpad(CAST(customer_id AS VARCHAR), 27, '0') AS openid,
    demo_ago(3600 + demo_r(customer_id, 'wechat_followed', 700 * 86400)) AS followed_at
FROM customers
WHERE demo_r(customer_id, 'wechat', 20) = 0;
