-- Conversions for an experiment's results: every order placed in [:start, :end).
--
-- Parameters (bound by the framework): :start and :end, the span the results need (from the
-- earliest decision to the latest decision plus the conversion window).
--
-- Returns customer_id and converted_at; a customer converts when one of their rows falls
-- within the conversion window after the decision that assigned their variant.
SELECT customer_id, ordered_at AS converted_at
FROM orders
WHERE ordered_at >= :start AND ordered_at < :end
