-- The W3C trace context of the frame that submitted the purchase, on the purchase itself: the
-- stream relay reads the purchases table and sends it as the Kafka record header `traceparent`,
-- so one trace spans both services. NULL when tracing is off. Adding a nullable column without a
-- default changes only the catalog.
ALTER TABLE purchases ADD COLUMN IF NOT EXISTS traceparent text;
