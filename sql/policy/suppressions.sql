-- The suppression list: numbers never to message, as stored (any format; normalised to E.164
-- by the framework). channel NULL = every channel.
SELECT phone, channel
FROM suppressions
