-- bench/usage.sql: fill a Tally database's spend rollups as a month of
-- charges would, for the SummarizeUsage figure of bench/usage.sh.
--
--   psql -v charges=10000000 -v accounts=10000 -v days=30 -v combos=5 \
--        -v month=2026-10-01 -d DB -f bench/usage.sql
--
-- What it generates (and what it does not): :accounts customer accounts
-- (USD; every two share an external_ref "bench-usage-<n>") and one revenue
-- account; the dimension set {product,team,sku} (what tallyd
-- --usage-dimensions product,team,sku registers); and the usage_daily rows
-- that :charges charges over :days days from :month would leave: every
-- account is charged on every day under :combos (product, team, sku)
-- combinations (8 products, 4 teams, 25 skus), so accounts x days x combos
-- rows (1,500,000 with the defaults) whose charges counts add up to exactly
-- :charges, with 1% of the rows also holding one refund. usage_daily_totals
-- is then computed from usage_daily exactly as the write path adds it (sums
-- per revenue account, day and dimension values). The :charges transfers,
-- entries and keys themselves are NOT generated: SummarizeUsage never reads
-- them, and writing 10,000,000 of them would take far longer than the query
-- being measured. Only INSERTs.
\set ON_ERROR_STOP on
\timing on
BEGIN;
CREATE TEMP TABLE usage_params AS
SELECT :charges::bigint AS n, :accounts::bigint AS a, :days::bigint AS d, :combos::bigint AS c, :'month'::date AS m0,
       'e0000000-0000-0000-0000-000000000001'::uuid AS rev;
DO $$ BEGIN
  IF (SELECT c FROM usage_params) NOT BETWEEN 1 AND 8 THEN RAISE EXCEPTION 'combos must be 1-8'; END IF;
END $$;

INSERT INTO accounts (account_id, currency, type, floor)
SELECT rev, 'USD', 2, 2 FROM usage_params;
INSERT INTO accounts (account_id, currency, type, external_ref, floor)
SELECT ('c' || lpad(to_hex(i), 31, '0'))::uuid, 'USD', 1, 'bench-usage-' || (i / 2), 1
FROM usage_params p, generate_series(0, p.a - 1) AS i;

INSERT INTO usage_dimension_sets (keys) VALUES ('{product,team,sku}') ON CONFLICT (keys) DO NOTHING;

-- Row r = (account i, day dd, combo j); the products of one (account, day)
-- differ ((i + j) % 8 with j < 8), so every row has its own primary key.
INSERT INTO usage_daily (account_id, day, revenue_account_id, set_id, dim1, dim2, dim3, currency,
                         charged, refunded, charges, refunds)
SELECT ('c' || lpad(to_hex(i), 31, '0'))::uuid, p.m0 + dd::int, p.rev, s.set_id,
       'product-' || ((i + j) % 8), 'team-' || ((i * 7 + j) % 4), 'sku-' || ((i * 13 + dd * 3 + j) % 25), 'USD',
       y.cnt * (10 + x.r % 90), CASE WHEN x.r % 100 = 0 AND y.cnt > 0 THEN 10 + x.r % 90 ELSE 0 END,
       y.cnt, CASE WHEN x.r % 100 = 0 AND y.cnt > 0 THEN 1 ELSE 0 END
FROM usage_params p
CROSS JOIN (SELECT set_id FROM usage_dimension_sets WHERE keys = '{product,team,sku}') s
CROSS JOIN generate_series(0, p.a - 1) AS i
CROSS JOIN generate_series(0, p.d - 1) AS dd
CROSS JOIN generate_series(0, p.c - 1) AS j
CROSS JOIN LATERAL (SELECT (i * p.d + dd) * p.c + j AS r) x
CROSS JOIN LATERAL (SELECT p.n / (p.a * p.d * p.c) + CASE WHEN x.r < p.n % (p.a * p.d * p.c) THEN 1 ELSE 0 END AS cnt) y;

INSERT INTO usage_daily_totals (revenue_account_id, day, set_id, dim1, dim2, dim3, currency,
                                charged, refunded, charges, refunds)
SELECT revenue_account_id, day, set_id, dim1, dim2, dim3, currency,
       sum(charged), sum(refunded), sum(charges), sum(refunds)
FROM usage_daily GROUP BY revenue_account_id, day, set_id, dim1, dim2, dim3, currency;
COMMIT;
ANALYZE usage_daily;
ANALYZE usage_daily_totals;
SELECT (SELECT count(*) FROM usage_daily) AS usage_daily_rows,
       (SELECT count(*) FROM usage_daily_totals) AS usage_daily_totals_rows,
       (SELECT sum(charges) FROM usage_daily) AS charges,
       pg_size_pretty(pg_total_relation_size('usage_daily')) AS usage_daily_size;
