"""SQL of the analyst views that the snapshot writer creates over the snapshot tables.

Every statement is idempotent (`CREATE OR REPLACE`), so opening a file written by an
older version of plantstream replaces its views with these. `VIEWS` keeps them in
creation order, because a view can only be created after the views it reads.
docs/analytics.md describes the columns and formulas for analysts.

Time model (ISO 22400-2). Each machine is observed from its first to its last known
time: state interval starts and ends and the production reports of its work center
that are not cancelled. Open intervals (`ended_at` null) end at the window end. Every
instant of the window falls into exactly one category, by this precedence when
intervals overlap:

1. `planned_down`: any state other than `running` whose row has `planned = true`
   (breaks, planned maintenance, no order). It leaves the planned busy time.
2. `unplanned_down`: state `down` or `maintenance` without `planned = true`. It is an
   availability loss.
3. `running`: state `running`. This is the actual production time.
4. `idle`: everything else (state `idle` or `setup` without the planned flag, and gaps
   with no state row). Idle is not planned, so it stays in the planned busy time and
   lowers availability like a stop. A machine that waits for material during planned
   time loses output as surely as one that is broken.

Because the categories never overlap, overlapping down intervals count once. Down time
covered by two reasons is attributed to the interval that started first (ties go to the
reason that sorts first), which `downtime_by_reason` shows.

A machine with production reports but no `machine_states` row at all has no known time
model: its time columns, availability, performance and OEE are null, not 0, and
`has_state_data` is false. Its quantities and quality still count.
"""

from __future__ import annotations

__all__ = ["MACROS", "VIEWS"]

# DuckDB (2.0) divides DECIMAL by DECIMAL in DOUBLE, which would make a scaled BOM
# standard inexact, and it multiplies two DECIMAL(38, 9) values into a DECIMAL(38, 18),
# which raises an overflow error once the product reaches 1e20. These macros scale
# quantities as HUGEINT counts of 1e-9 units instead and round half away from zero to 9
# decimal places. A result is exact whenever it fits DECIMAL(38, 9), and null when it
# does not, because a single error would fail every query on the view.

# The count of 1e-9 units in a quantity. Integer and fractional part are converted
# apart, because the DECIMAL(38, 9) product `quantity * 1e9` overflows above 1e20.
QUANTITY_UNITS = """
CREATE OR REPLACE MACRO quantity_units(quantity) AS
    CAST(trunc(CAST(quantity AS DECIMAL(38, 9))) AS HUGEINT) * 1000000000
        + CAST(
            (
                CAST(quantity AS DECIMAL(38, 9))
                - trunc(CAST(quantity AS DECIMAL(38, 9)))
            ) * 1000000000
            AS HUGEINT
        )
"""

# Null when the units pass 10^38 - 1, the largest DECIMAL(38, 9) value in units.
UNITS_QUANTITY = """
CREATE OR REPLACE MACRO units_quantity(units) AS
    CASE WHEN abs(units) <= 99999999999999999999999999999999999999
        THEN CAST(CAST(units AS DECIMAL(38, 0)) * 0.000000001 AS DECIMAL(38, 9))
    END
"""

# Adds `addend` to a quotient and remainder pair modulo `divisor`, for an addend and a
# remainder below the divisor. Comparing with divisor - addend instead of adding first
# keeps every value below the divisor, so nothing overflows HUGEINT.
DIVMOD_ADD = """
CREATE OR REPLACE MACRO divmod_add(pair, addend, divisor) AS {
    'quotient': pair.quotient
        + CASE WHEN pair.remainder >= divisor - addend THEN 1 ELSE 0 END,
    'remainder': CASE WHEN pair.remainder >= divisor - addend
        THEN pair.remainder - (divisor - addend)
        ELSE pair.remainder + addend
    END
}
"""

# Quotient and remainder of a * b by divisor, for 0 <= a, b < divisor. When a * b fits
# HUGEINT, one division does it. Otherwise a binary long multiplication walks the bits
# of b from the top (127 bits cover every positive HUGEINT): each step doubles the pair
# and adds a where b has a one. Because a and b are below the divisor, only a divisor
# above about 1.3e19 units (a planned quantity above 1.3e10) can lead to these steps.
PRODUCT_DIVMOD = """
CREATE OR REPLACE MACRO product_divmod(a, b, divisor) AS
    CASE WHEN a <= 170141183460469231731687303715884105727 // greatest(b, 1)
        THEN {'quotient': a * b // divisor, 'remainder': a * b % divisor}
        ELSE list_reduce(
            range(126, -1, -1),
            lambda pair, bit: divmod_add(
                divmod_add(
                    {'quotient': pair.quotient * 2, 'remainder': pair.remainder},
                    pair.remainder,
                    divisor
                ),
                CASE WHEN (b >> bit) & 1 = 1 THEN a ELSE 0 END,
                divisor
            ),
            {'quotient': CAST(0 AS HUGEINT), 'remainder': CAST(0 AS HUGEINT)}
        )
    END
"""

# Product and sum of non-negative unit counts, or null once the result passes 10^38 - 1
# units, the largest DECIMAL(38, 9) value, instead of an overflow error.
CHECKED_PRODUCT = """
CREATE OR REPLACE MACRO checked_product(x, y) AS
    CASE WHEN x <= 99999999999999999999999999999999999999 // greatest(y, 1)
        THEN x * y
    END
"""

CHECKED_SUM = """
CREATE OR REPLACE MACRO checked_sum(x, y) AS
    CASE WHEN x <= 99999999999999999999999999999999999999 - y THEN x + y END
"""

# The quotient of the pair rounded half up, from its remainder.
ROUND_DIVMOD = """
CREATE OR REPLACE MACRO round_divmod(pair, divisor) AS
    pair.quotient
        + CASE WHEN pair.remainder >= divisor - pair.remainder THEN 1 ELSE 0 END
"""

# round(a * b / divisor) for a, b >= 0 and divisor > 0, or null above 10^38 - 1.
# With a = a_whole * divisor + a_rest and b = b_whole * divisor + b_rest, the result is
#     a_whole * b_whole * divisor + a_whole * b_rest + a_rest * b_whole
#     + round(a_rest * b_rest / divisor).
# No term exceeds the result, so checking each one rejects only results that do not
# fit. Pass columns, not expressions: a macro repeats an argument wherever it is used.
SCALE_SPLIT = """
CREATE OR REPLACE MACRO scale_split(a_whole, a_rest, b_whole, b_rest, divisor) AS
    checked_sum(
        checked_sum(
            checked_product(checked_product(a_whole, b_whole), divisor),
            checked_sum(
                checked_product(a_whole, b_rest), checked_product(a_rest, b_whole)
            )
        ),
        round_divmod(product_divmod(a_rest, b_rest, divisor), divisor)
    )
"""

SCALE_UNITS = """
CREATE OR REPLACE MACRO scale_units(a, b, divisor) AS
    scale_split(a // divisor, a % divisor, b // divisor, b % divisor, divisor)
"""

# Aggregate sum of non-negative unit counts, or null when a count is null or the sum
# passes 10^38 - 1 units. A plain sum() raises an overflow error once it passes HUGEINT.
# Every part above and below 10^18 is below 10^20, so summing the parts apart fits
# HUGEINT for fewer than 10^18 rows.
CHECKED_UNITS_SUM = """
CREATE OR REPLACE MACRO checked_units_sum(units) AS
    CASE WHEN bool_and(units IS NOT NULL)
        THEN checked_sum(
            checked_product(
                sum(units // 1000000000000000000), 1000000000000000000
            ),
            sum(units % 1000000000000000000)
        )
    END
"""

# One row per stretch of machine time with a single category, which the other machine
# views aggregate. The sweep counts, at every boundary, how many intervals of each
# category are open, which is O(n log n) per machine instead of joining intervals
# pairwise.
MACHINE_TIME_SEGMENTS = """
CREATE OR REPLACE VIEW machine_time_segments AS
WITH reports AS (
    SELECT plant, work_center AS machine, occurred_at
    FROM production
    WHERE NOT coalesce(cancelled, false) AND work_center IS NOT NULL
),
known_times AS (
    SELECT plant, machine, started_at AS t FROM machine_states
    UNION ALL
    SELECT plant, machine, ended_at FROM machine_states WHERE ended_at IS NOT NULL
    UNION ALL
    SELECT plant, machine, occurred_at FROM reports WHERE occurred_at IS NOT NULL
),
windows AS (
    SELECT plant, machine, min(t) AS window_start, max(t) AS window_end
    FROM known_times
    GROUP BY plant, machine
),
intervals AS (
    SELECT
        s.plant,
        s.machine,
        CASE
            WHEN s.state <> 'running' AND coalesce(s.planned, false) THEN 'planned_down'
            WHEN s.state IN ('down', 'maintenance') THEN 'unplanned_down'
            WHEN s.state = 'running' THEN 'running'
        END AS category,
        greatest(s.started_at, w.window_start) AS started_at,
        least(coalesce(s.ended_at, w.window_end), w.window_end) AS ended_at
    FROM machine_states AS s
    JOIN windows AS w USING (plant, machine)
),
boundaries AS (
    SELECT plant, machine, started_at AS t, category, 1 AS delta
    FROM intervals
    WHERE category IS NOT NULL AND ended_at > started_at
    UNION ALL
    SELECT plant, machine, ended_at, category, -1
    FROM intervals
    WHERE category IS NOT NULL AND ended_at > started_at
    UNION ALL
    SELECT plant, machine, window_start, NULL, 0 FROM windows
    UNION ALL
    SELECT plant, machine, window_end, NULL, 0 FROM windows
),
points AS (
    SELECT
        plant,
        machine,
        t,
        coalesce(sum(delta) FILTER (WHERE category = 'planned_down'), 0)
            AS planned_delta,
        coalesce(sum(delta) FILTER (WHERE category = 'unplanned_down'), 0)
            AS unplanned_delta,
        coalesce(sum(delta) FILTER (WHERE category = 'running'), 0)
            AS running_delta
    FROM boundaries
    GROUP BY plant, machine, t
),
open_counts AS (
    SELECT
        plant,
        machine,
        t AS started_at,
        lead(t) OVER by_time AS ended_at,
        sum(planned_delta) OVER by_time AS planned_open,
        sum(unplanned_delta) OVER by_time AS unplanned_open,
        sum(running_delta) OVER by_time AS running_open
    FROM points
    WINDOW by_time AS (PARTITION BY plant, machine ORDER BY t)
)
SELECT
    plant,
    machine,
    started_at,
    ended_at,
    CASE
        WHEN planned_open > 0 THEN 'planned_down'
        WHEN unplanned_open > 0 THEN 'unplanned_down'
        WHEN running_open > 0 THEN 'running'
        ELSE 'idle'
    END AS category,
    CAST(
        CAST(epoch_us(ended_at) - epoch_us(started_at) AS DECIMAL(38, 0)) * 0.000001
        AS DECIMAL(38, 6)
    ) AS duration_s
FROM open_counts
WHERE ended_at IS NOT NULL
"""

# Time columns are DECIMAL(38, 6) seconds, exact to the microsecond. Ratios are DOUBLE.
# `oee` uses the capped performance, so it equals availability * performance * quality
# whenever all three are defined, and is 0 when planned busy time passed without output.
#
# Quantities of different units of measure are never added. A machine whose reports use
# one unit gets quantities in that `uom` and quality GQ / PQ (`quality_basis` 'count').
# A machine with several units gets null quantities, and its quality weighs each report
# by its ideal time: PRI x GQ over PRI x PQ, summed (`quality_basis` 'ideal_time').
# Unless performance is capped, oee is then the good output's ideal time over the
# planned busy time. When a report of such a machine has no ideal cycle time, quality
# and oee are null.
#
# A machine whose ideal time (PRI x PQ summed over its reports) does not fit
# DECIMAL(38, 9) gets null ideal times, performance and oee instead of an overflow
# error, which would fail every query on the view.
OEE = """
CREATE OR REPLACE VIEW oee AS
WITH state_machines AS (
    SELECT DISTINCT plant, machine FROM machine_states
),
machine_time AS (
    SELECT
        plant,
        machine,
        min(started_at) AS window_start,
        max(ended_at) AS window_end,
        sum(duration_s) AS window_s,
        coalesce(sum(duration_s) FILTER (WHERE category = 'planned_down'), 0)
            AS planned_s,
        coalesce(sum(duration_s) FILTER (WHERE category = 'unplanned_down'), 0)
            AS unplanned_s,
        coalesce(sum(duration_s) FILTER (WHERE category = 'running'), 0) AS running_s,
        coalesce(sum(duration_s) FILTER (WHERE category = 'idle'), 0) AS idle_s
    FROM machine_time_segments
    GROUP BY plant, machine
),
reports AS (
    SELECT
        plant,
        work_center AS machine,
        uom,
        coalesce(good_quantity, 0) AS good,
        coalesce(scrap_quantity, 0) AS scrap,
        coalesce(good_quantity, 0) + coalesce(scrap_quantity, 0)
            + coalesce(rework_quantity, 0) AS produced,
        ideal_cycle_time_s,
        occurred_at
    FROM production
    WHERE NOT coalesce(cancelled, false) AND work_center IS NOT NULL
),
report_units AS (
    SELECT
        *,
        quantity_units(ideal_cycle_time_s) AS cycle_units,
        quantity_units(produced) AS produced_units,
        quantity_units(good) AS good_units
    FROM reports
),
-- PRI x PQ and PRI x GQ per report, in 1e-9 s. A report without an ideal cycle time
-- adds 0, and one whose product passes DECIMAL(38, 9) gets null.
report_ideal_times AS (
    SELECT
        *,
        CASE WHEN ideal_cycle_time_s IS NULL THEN 0
            ELSE scale_units(cycle_units, produced_units, 1000000000)
        END AS ideal_units,
        CASE WHEN ideal_cycle_time_s IS NULL THEN 0
            ELSE scale_units(cycle_units, good_units, 1000000000)
        END AS good_ideal_units
    FROM report_units
),
output AS (
    SELECT
        plant,
        machine,
        min(occurred_at) AS first_report_at,
        max(occurred_at) AS last_report_at,
        count(DISTINCT uom) AS units,
        any_value(uom) AS uom,
        bool_or(produced > 0) AS has_output,
        CAST(sum(produced) AS DECIMAL(38, 9)) AS produced_quantity,
        CAST(sum(good) AS DECIMAL(38, 9)) AS good_quantity,
        CAST(sum(scrap) AS DECIMAL(38, 9)) AS scrap_quantity,
        -- Null when a report's ideal time or their sum does not fit DECIMAL(38, 9).
        units_quantity(checked_units_sum(ideal_units)) AS ideal_time_s,
        units_quantity(checked_units_sum(good_ideal_units)) AS good_ideal_time_s,
        count(*) FILTER (WHERE ideal_cycle_time_s IS NULL) AS reports_without_ideal_time
    FROM report_ideal_times
    GROUP BY plant, machine
),
totals AS (
    SELECT
        m.plant,
        m.machine,
        coalesce(t.window_start, o.first_report_at) AS window_start,
        coalesce(t.window_end, o.last_report_at) AS window_end,
        s.machine IS NOT NULL AS has_state_data,
        CASE WHEN s.machine IS NOT NULL
            THEN CAST(t.window_s - t.planned_s AS DECIMAL(38, 6))
        END AS planned_busy_time_s,
        CASE WHEN s.machine IS NOT NULL
            THEN CAST(t.running_s AS DECIMAL(38, 6))
        END AS actual_production_time_s,
        CASE WHEN s.machine IS NOT NULL
            THEN CAST(t.unplanned_s AS DECIMAL(38, 6))
        END AS unplanned_down_time_s,
        CASE WHEN s.machine IS NOT NULL
            THEN CAST(t.planned_s AS DECIMAL(38, 6))
        END AS planned_down_time_s,
        CASE WHEN s.machine IS NOT NULL
            THEN CAST(t.idle_s AS DECIMAL(38, 6))
        END AS idle_time_s,
        coalesce(o.units, 0) AS units,
        CASE WHEN o.units = 1 THEN o.uom END AS uom,
        coalesce(o.has_output, false) AS has_output,
        -- Added across units, these sums would have no meaning.
        CASE WHEN coalesce(o.units, 0) <= 1
            THEN coalesce(o.produced_quantity, 0)
        END AS produced_quantity,
        CASE WHEN coalesce(o.units, 0) <= 1 THEN coalesce(o.good_quantity, 0) END
            AS good_quantity,
        CASE WHEN coalesce(o.units, 0) <= 1 THEN coalesce(o.scrap_quantity, 0) END
            AS scrap_quantity,
        -- A machine without reports has an ideal time of 0. A null from `output` means
        -- the ideal time does not fit DECIMAL(38, 9), so it must stay null.
        CASE WHEN o.machine IS NULL THEN 0 ELSE o.ideal_time_s END AS ideal_time_s,
        CASE WHEN o.machine IS NULL THEN 0 ELSE o.good_ideal_time_s END
            AS good_ideal_time_s,
        coalesce(o.reports_without_ideal_time, 0) AS reports_without_ideal_time
    FROM (
        SELECT plant, machine FROM machine_time
        UNION
        SELECT plant, machine FROM output
    ) AS m
    LEFT JOIN machine_time AS t USING (plant, machine)
    LEFT JOIN output AS o USING (plant, machine)
    LEFT JOIN state_machines AS s USING (plant, machine)
),
ratios AS (
    SELECT
        *,
        CASE WHEN planned_busy_time_s > 0
            THEN CAST(actual_production_time_s AS DOUBLE)
                / CAST(planned_busy_time_s AS DOUBLE)
        END AS availability,
        CASE WHEN actual_production_time_s > 0
            THEN CAST(ideal_time_s AS DOUBLE) / CAST(actual_production_time_s AS DOUBLE)
        END AS raw_performance,
        quality_basis(
            units <= 1, reports_without_ideal_time = 0, produced_quantity, ideal_time_s
        ) AS quality_basis
    FROM totals
)
SELECT
    plant,
    machine,
    window_start,
    window_end,
    planned_busy_time_s,
    actual_production_time_s,
    unplanned_down_time_s,
    planned_down_time_s,
    idle_time_s,
    produced_quantity,
    good_quantity,
    scrap_quantity,
    uom,
    ideal_time_s,
    good_ideal_time_s,
    availability,
    -- least() skips NULL arguments, so the cap must not turn a missing ratio into 1.
    CASE WHEN raw_performance IS NOT NULL THEN least(raw_performance, 1.0) END
        AS performance,
    quality_ratio(
        quality_basis, produced_quantity, good_quantity, ideal_time_s, good_ideal_time_s
    ) AS quality,
    quality_basis,
    CASE
        WHEN planned_busy_time_s IS NULL OR planned_busy_time_s <= 0 THEN NULL
        WHEN NOT has_output THEN 0.0
        -- least() would skip an ideal time that is null because it overflowed.
        WHEN ideal_time_s IS NULL THEN NULL
        ELSE CAST(least(ideal_time_s, actual_production_time_s) AS DOUBLE)
            / CAST(planned_busy_time_s AS DOUBLE)
            * quality_ratio(
                quality_basis,
                produced_quantity,
                good_quantity,
                ideal_time_s,
                good_ideal_time_s
            )
    END AS oee,
    -- A null ideal time overflowed DECIMAL(38, 9): 1e29 s or more, longer than any
    -- running time, so the cycle time is surely set too long.
    CASE WHEN ideal_time_s IS NULL AND actual_production_time_s IS NOT NULL THEN true
        ELSE ideal_time_s > actual_production_time_s
    END AS performance_flag,
    raw_performance,
    reports_without_ideal_time,
    has_state_data
FROM ratios
"""

# Sums times and quantities over machines and computes the ratios again from the sums.
# The performance numerator is each machine's ideal time capped at its actual production
# time, so a machine with a wrong ideal cycle time cannot lift the plant above 1.
# Quantities and quality follow the unit rule of `oee`, applied to all reports of the
# plant: a machine with several units, or two machines with different ones, make the
# plant's quantities null and its quality a ratio of ideal times. A machine with a null
# ideal time makes the plant's ideal times null, and its performance and oee too unless
# the machine has no state data, because sum() would skip it and understate them.
OEE_BY_PLANT = """
CREATE OR REPLACE VIEW oee_by_plant AS
WITH machine_ideal_times AS (
    SELECT
        *,
        quantity_units(ideal_time_s) AS ideal_units,
        quantity_units(good_ideal_time_s) AS good_ideal_units,
        CASE WHEN ideal_time_s IS NOT NULL
            THEN least(ideal_time_s, actual_production_time_s)
        END AS capped_ideal_time_s
    FROM oee
),
sums AS (
    SELECT
        plant,
        count(*) AS machines,
        min(window_start) AS window_start,
        max(window_end) AS window_end,
        sum(planned_busy_time_s) AS planned_busy_time_s,
        sum(actual_production_time_s) AS actual_production_time_s,
        sum(unplanned_down_time_s) AS unplanned_down_time_s,
        sum(planned_down_time_s) AS planned_down_time_s,
        sum(idle_time_s) AS idle_time_s,
        -- A machine with several units has null quantities and a null uom.
        NOT bool_or(produced_quantity IS NULL) AND count(DISTINCT uom) <= 1
            AS single_unit,
        any_value(uom) AS uom,
        bool_or(produced_quantity IS NULL OR produced_quantity > 0) AS has_output,
        sum(produced_quantity) AS produced_quantity,
        sum(good_quantity) AS good_quantity,
        sum(scrap_quantity) AS scrap_quantity,
        sum(reports_without_ideal_time) AS reports_without_ideal_time,
        units_quantity(checked_units_sum(ideal_units)) AS ideal_time_s,
        units_quantity(checked_units_sum(good_ideal_units)) AS good_ideal_time_s,
        CASE
            WHEN bool_and(capped_ideal_time_s IS NOT NULL)
                FILTER (WHERE has_state_data)
            THEN sum(capped_ideal_time_s) FILTER (WHERE has_state_data)
        END AS capped_ideal_time_s,
        count(*) FILTER (WHERE performance_flag) AS flagged_machines
    FROM machine_ideal_times
    GROUP BY plant
),
ratios AS (
    SELECT
        *,
        CASE WHEN planned_busy_time_s > 0
            THEN CAST(actual_production_time_s AS DOUBLE)
                / CAST(planned_busy_time_s AS DOUBLE)
        END AS availability,
        CASE WHEN actual_production_time_s > 0
            THEN CAST(capped_ideal_time_s AS DOUBLE)
                / CAST(actual_production_time_s AS DOUBLE)
        END AS performance,
        quality_basis(
            single_unit, reports_without_ideal_time = 0, produced_quantity, ideal_time_s
        ) AS quality_basis
    FROM sums
),
qualities AS (
    SELECT
        *,
        quality_ratio(
            quality_basis,
            produced_quantity,
            good_quantity,
            ideal_time_s,
            good_ideal_time_s
        ) AS quality
    FROM ratios
)
SELECT
    plant,
    machines,
    window_start,
    window_end,
    planned_busy_time_s,
    actual_production_time_s,
    unplanned_down_time_s,
    planned_down_time_s,
    idle_time_s,
    CASE WHEN single_unit THEN produced_quantity END AS produced_quantity,
    CASE WHEN single_unit THEN good_quantity END AS good_quantity,
    CASE WHEN single_unit THEN scrap_quantity END AS scrap_quantity,
    CASE WHEN single_unit THEN uom END AS uom,
    ideal_time_s,
    good_ideal_time_s,
    availability,
    performance,
    quality,
    quality_basis,
    CASE
        WHEN planned_busy_time_s IS NULL OR planned_busy_time_s <= 0 THEN NULL
        WHEN NOT has_output THEN 0.0
        ELSE CAST(capped_ideal_time_s AS DOUBLE)
            / CAST(planned_busy_time_s AS DOUBLE) * quality
    END AS oee,
    flagged_machines > 0 AS performance_flag,
    flagged_machines
FROM qualities
"""

# Attributes each down segment to one state row: among the rows of the segment's
# category that cover it, the one that started first, then the reason that sorts first.
DOWNTIME_BY_REASON = """
CREATE OR REPLACE VIEW downtime_by_reason AS
WITH down_segments AS (
    SELECT plant, machine, started_at, ended_at, category, duration_s
    FROM machine_time_segments
    WHERE category IN ('planned_down', 'unplanned_down')
),
candidates AS (
    SELECT
        d.plant,
        d.machine,
        d.started_at AS segment_start,
        d.category,
        d.duration_s,
        s.reason,
        s.started_at AS interval_start
    FROM down_segments AS d
    JOIN machine_states AS s
        ON s.plant = d.plant
        AND s.machine = d.machine
        AND s.started_at <= d.started_at
        AND (s.ended_at IS NULL OR s.ended_at >= d.ended_at)
        AND CASE
            WHEN s.state <> 'running' AND coalesce(s.planned, false) THEN 'planned_down'
            WHEN s.state IN ('down', 'maintenance') THEN 'unplanned_down'
        END = d.category
),
attributed AS (
    SELECT plant, machine, category, duration_s, reason
    FROM candidates
    QUALIFY row_number() OVER (
        PARTITION BY plant, machine, segment_start
        ORDER BY interval_start, reason NULLS LAST
    ) = 1
)
SELECT
    plant,
    machine,
    category = 'planned_down' AS planned,
    reason,
    CAST(sum(duration_s) AS DECIMAL(38, 6)) AS down_time_s,
    count(*) AS segments
FROM attributed
GROUP BY plant, machine, category, reason
"""

# The BOM standard is scaled to the output reported so far; before any output it is the
# full BOM quantity, so an order that has only started shows its consumption against the
# whole plan rather than against zero. A scaled standard or an output that does not fit
# DECIMAL(38, 9) is null, and so are the variance columns computed from it.
MATERIAL_VARIANCE = """
CREATE OR REPLACE VIEW material_variance AS
WITH units AS (
    SELECT
        c.plant,
        c.order_id,
        c.material,
        c.uom,
        c.standard_quantity AS bom_quantity,
        coalesce(c.actual_quantity, 0) AS actual_quantity,
        o.planned_quantity,
        o.status AS order_status,
        o.completed_at,
        quantity_units(c.standard_quantity) AS bom_units,
        quantity_units(o.planned_quantity) AS planned_units,
        checked_sum(
            quantity_units(coalesce(o.good_quantity, 0)),
            quantity_units(coalesce(o.scrap_quantity, 0))
        ) AS output_units
    FROM order_components AS c
    LEFT JOIN orders AS o USING (plant, order_id)
),
scaled AS (
    SELECT
        *,
        CASE
            WHEN planned_units <= 0 OR planned_units IS NULL THEN bom_quantity
            WHEN output_units = 0 THEN bom_quantity
            ELSE units_quantity(
                sign(bom_units)
                    * scale_units(abs(bom_units), output_units, planned_units)
            )
        END AS standard_quantity,
        units_quantity(output_units) AS output_quantity
    FROM units
)
SELECT
    plant,
    order_id,
    material,
    uom,
    bom_quantity,
    CAST(standard_quantity AS DECIMAL(38, 9)) AS standard_quantity,
    CAST(actual_quantity AS DECIMAL(38, 9)) AS actual_quantity,
    -- Both are non-negative, so the difference cannot overflow DECIMAL(38, 9).
    CAST(actual_quantity - standard_quantity AS DECIMAL(38, 9)) AS variance,
    CASE WHEN standard_quantity <> 0
        THEN CAST(actual_quantity - standard_quantity AS DOUBLE)
            / CAST(standard_quantity AS DOUBLE) * 100
    END AS variance_pct,
    planned_quantity,
    output_quantity,
    order_status,
    completed_at
FROM scaled
"""

# Signs by movement type: 101 and 262 add, 102 and 261 remove, 344 moves unrestricted
# stock to blocked and 343 moves it back. A 101 or 102 books to the row's stock type.
STOCK = """
CREATE OR REPLACE VIEW stock AS
WITH moves AS (
    SELECT plant, material, uom, coalesce(stock_type, 'unrestricted') AS stock_type,
        quantity AS delta
    FROM postings WHERE movement_type = '101'
    UNION ALL
    SELECT plant, material, uom, coalesce(stock_type, 'unrestricted'), -quantity
    FROM postings WHERE movement_type = '102'
    UNION ALL
    SELECT plant, material, uom, 'unrestricted', -quantity
    FROM postings WHERE movement_type = '261'
    UNION ALL
    SELECT plant, material, uom, 'unrestricted', quantity
    FROM postings WHERE movement_type = '262'
    UNION ALL
    SELECT plant, material, uom, 'unrestricted', -quantity
    FROM postings WHERE movement_type = '344'
    UNION ALL
    SELECT plant, material, uom, 'blocked', quantity
    FROM postings WHERE movement_type = '344'
    UNION ALL
    SELECT plant, material, uom, 'blocked', -quantity
    FROM postings WHERE movement_type = '343'
    UNION ALL
    SELECT plant, material, uom, 'unrestricted', quantity
    FROM postings WHERE movement_type = '343'
)
SELECT
    plant,
    material,
    stock_type,
    uom,
    CAST(sum(delta) AS DECIMAL(38, 9)) AS quantity,
    count(*) AS movements
FROM moves
WHERE delta IS NOT NULL
GROUP BY plant, material, stock_type, uom
"""

# Production per plant-local day and shift. The local time uses the plant's IANA zone
# from `plant_calendars` when one is configured, and otherwise the UTC offset the event
# itself carried (`events.utc_offset_s`). A shift belongs to the day it starts on, so a
# night shift from 22:00 to 06:00 counts on the day of its 22:00 start.
PRODUCTION_LOCAL = """
CREATE OR REPLACE VIEW production_local AS
WITH offsets AS (
    SELECT plant, event_id, any_value(utc_offset_s) AS utc_offset_s
    FROM events
    WHERE status = 'applied' AND event_type = 'production_confirmed'
    GROUP BY plant, event_id
),
reports AS (
    SELECT
        p.*,
        c.time_zone,
        coalesce(c.shift_start_min, 360) AS shift_start_min,
        coalesce(c.shift_length_min, 480) AS shift_length_min,
        CASE
            WHEN c.time_zone IS NOT NULL THEN timezone(c.time_zone, p.occurred_at)
            ELSE timezone('UTC', p.occurred_at)
                + to_seconds(coalesce(o.utc_offset_s, 0))
        END AS local_time
    FROM production AS p
    LEFT JOIN plant_calendars AS c USING (plant)
    LEFT JOIN offsets AS o USING (plant, event_id)
    WHERE NOT coalesce(p.cancelled, false)
),
shifted AS (
    SELECT
        *,
        local_time - to_minutes(shift_start_min) AS since_first_shift
    FROM reports
)
SELECT
    event_id,
    plant,
    order_id,
    work_center,
    good_quantity,
    scrap_quantity,
    rework_quantity,
    uom,
    occurred_at,
    time_zone,
    local_time,
    CAST(local_time AS DATE) AS local_date,
    CAST(since_first_shift AS DATE) AS shift_date,
    CAST(
        (hour(since_first_shift) * 60 + minute(since_first_shift)) // shift_length_min
        + 1 AS INTEGER
    ) AS shift
FROM shifted
"""

PRODUCTION_BY_SHIFT = """
CREATE OR REPLACE VIEW production_by_shift AS
SELECT
    plant,
    shift_date,
    shift,
    work_center,
    uom,
    CAST(sum(good_quantity) AS DECIMAL(38, 9)) AS good_quantity,
    CAST(sum(scrap_quantity) AS DECIMAL(38, 9)) AS scrap_quantity,
    CAST(sum(rework_quantity) AS DECIMAL(38, 9)) AS rework_quantity,
    count(*) AS reports
FROM production_local
GROUP BY plant, shift_date, shift, work_center, uom
"""

PRODUCTION_BY_DAY = """
CREATE OR REPLACE VIEW production_by_day AS
SELECT
    plant,
    local_date,
    uom,
    CAST(sum(good_quantity) AS DECIMAL(38, 9)) AS good_quantity,
    CAST(sum(scrap_quantity) AS DECIMAL(38, 9)) AS scrap_quantity,
    CAST(sum(rework_quantity) AS DECIMAL(38, 9)) AS rework_quantity,
    count(*) AS reports
FROM production_local
GROUP BY plant, local_date, uom
"""

# Every partition keeps its own clock per plant; the plant's watermark is the latest of
# them, and its counters are their sums.
PLANT_LATENESS = """
CREATE OR REPLACE VIEW plant_lateness AS
SELECT
    plant,
    max(watermark) AS watermark,
    sum(events) AS events,
    sum(late_events) AS late_events,
    max(max_lateness_s) AS max_lateness_s,
    sum(future_rejected) AS future_rejected,
    count(*) AS partitions
FROM plant_clocks
GROUP BY plant
"""

# A letter's identity is built as contracts.dead_letters.letter_id_at builds it, and
# the two must stay the same.
OPEN_DEAD_LETTERS = """
CREATE OR REPLACE VIEW open_dead_letters AS
SELECT d.*
FROM dead_letters AS d
WHERE NOT EXISTS (
    SELECT 1
    FROM dead_letter_resolutions AS r
    WHERE r.letter_id = d.subject || ':' || d.stream_seq
        || CASE WHEN d.batch_index = -1 THEN '' ELSE ':' || d.batch_index END
        || ':' || d.reason
)
"""

# The quality rule of `oee` and `oee_by_plant` (see the comment on OEE). Quality is a
# ratio of counts when all reports share one unit, else a ratio of ideal times when
# every report has an ideal cycle time. Otherwise, and without output, it has no basis.
QUALITY_BASIS = """
CREATE OR REPLACE MACRO quality_basis(
    single_unit, every_ideal_time, produced_quantity, ideal_time_s
) AS
    CASE
        WHEN single_unit THEN CASE WHEN produced_quantity > 0 THEN 'count' END
        WHEN every_ideal_time AND ideal_time_s > 0 THEN 'ideal_time'
    END
"""

QUALITY_RATIO = """
CREATE OR REPLACE MACRO quality_ratio(
    basis, produced_quantity, good_quantity, ideal_time_s, good_ideal_time_s
) AS
    CASE basis
        WHEN 'count'
            THEN CAST(good_quantity AS DOUBLE) / CAST(produced_quantity AS DOUBLE)
        WHEN 'ideal_time'
            THEN CAST(good_ideal_time_s AS DOUBLE) / CAST(ideal_time_s AS DOUBLE)
    END
"""

# In creation order, because a macro can only be created after the macros it calls.
MACROS: dict[str, str] = {
    "quantity_units": QUANTITY_UNITS,
    "units_quantity": UNITS_QUANTITY,
    "divmod_add": DIVMOD_ADD,
    "product_divmod": PRODUCT_DIVMOD,
    "checked_product": CHECKED_PRODUCT,
    "checked_sum": CHECKED_SUM,
    "round_divmod": ROUND_DIVMOD,
    "scale_split": SCALE_SPLIT,
    "scale_units": SCALE_UNITS,
    "checked_units_sum": CHECKED_UNITS_SUM,
    "quality_basis": QUALITY_BASIS,
    "quality_ratio": QUALITY_RATIO,
}

VIEWS: dict[str, str] = {
    "machine_time_segments": MACHINE_TIME_SEGMENTS,
    "oee": OEE,
    "oee_by_plant": OEE_BY_PLANT,
    "downtime_by_reason": DOWNTIME_BY_REASON,
    "material_variance": MATERIAL_VARIANCE,
    "stock": STOCK,
    "production_local": PRODUCTION_LOCAL,
    "production_by_shift": PRODUCTION_BY_SHIFT,
    "production_by_day": PRODUCTION_BY_DAY,
    "plant_lateness": PLANT_LATENESS,
    "open_dead_letters": OPEN_DEAD_LETTERS,
}
