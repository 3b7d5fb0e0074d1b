-- The W3C trace context of the frame that submitted the purchase, sent with its event as a Kafka
-- record header (`traceparent`), so one trace spans both services. NULL when tracing is off.
ALTER TABLE purchase_outbox ADD COLUMN IF NOT EXISTS traceparent text;
