-- The canonical JSON functions of migration 0008 back to PARALLEL SAFE (0012 had to mark them
-- unsafe): cqrs_python_float_repr no longer catches float8's out-of-range error in an
-- EXCEPTION block (a subtransaction, which a parallel query may not start) but tests the
-- range first, exactly. The audit's and the oracle's queries over steps may then use
-- parallel workers again (docs/decisions.md, "The audit buckets by token, computed in
-- Postgres").

-- 2^1024 - 2^970: halfway between DBL_MAX and 2^1024.
CREATE FUNCTION cqrs_float8_overflow() RETURNS numeric
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 179769313486231580793728971405303415079934132710037826936173778980444968292764750946649017977587207096330286416692887910946555547851940402630657488671505820681908902000708383676273854845817711531764475730270069855571366959622842914819860834936475292719074168444365510704342711559699508093042880177904174497792::numeric;

-- 2^-1075: half the smallest subnormal double.
CREATE FUNCTION cqrs_float8_underflow() RETURNS numeric
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 0.0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000024703282292062327208828439643411068618252990130716238221279284125033775363510437593264991818081799618989828234772285886546332835517796989819938739800539093906315035659515570226392290858392449105184435931802849936536152500319370457678249219365623669863658480757001585769269903706311928279558551332927834338409351978015531246597263579574622766465272827220056374006485499977096599470454020828166226237857393450736339007967761930577506740176324673600968951340535537458516661134223766678604162159680461914467291840300530057530849048765391711386591646239524912623653881879636239373280423891018672348497668235089863388587925628302755995657524455507255189313690836254779186948667994968324049705821028513185451396213837722826145437693412532098591327667236328125::numeric;

CREATE OR REPLACE FUNCTION cqrs_python_float_repr(number text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
SET extra_float_digits = 1 AS $$
DECLARE
    shortest text;
    parts    text[];
    minus     text;
    all_digits text;
    zeros  integer;
    digits   text;
    exponent integer;
BEGIN
    -- Beyond the doubles, float8's input fails; Python's float() gives ±inf (json prints
    -- Infinity) at or above the point halfway between DBL_MAX and 2^1024, and ±0.0 at or
    -- below half the smallest subnormal, 2^-1075 (round half to even, as strtod rounds).
    -- Tested before the cast instead of catching its error: an EXCEPTION block is a
    -- subtransaction, which a parallel query may not start.
    IF abs(number::numeric) >= cqrs_float8_overflow() THEN
        RETURN CASE WHEN number LIKE '-%' THEN '-Infinity' ELSE 'Infinity' END;
    END IF;
    IF abs(number::numeric) <= cqrs_float8_underflow() AND number::numeric <> 0 THEN
        RETURN CASE WHEN number LIKE '-%' THEN '-0.0' ELSE '0.0' END;
    END IF;
    shortest := number::float8::text;
    parts := regexp_match(shortest, '^(-?)([0-9]+)(?:\.([0-9]+))?(?:e([-+][0-9]+))?$');
    IF parts IS NULL THEN
        RAISE EXCEPTION 'unexpected float8 text % for %', shortest, number;
    END IF;
    minus := parts[1];
    all_digits := parts[2] || coalesce(parts[3], '');
    IF ltrim(all_digits, '0') = '' THEN
        RETURN minus || '0.0';
    END IF;
    zeros := length(all_digits) - length(ltrim(all_digits, '0'));
    digits := rtrim(ltrim(all_digits, '0'), '0');
    -- The power of ten of the first significant digit.
    exponent := length(parts[2]) - 1 - zeros + coalesce(parts[4]::integer, 0);
    IF exponent >= 16 OR exponent < -4 THEN
        RETURN minus || left(digits, 1)
            || CASE WHEN length(digits) > 1 THEN '.' || substr(digits, 2) ELSE '' END
            || 'e' || CASE WHEN exponent < 0 THEN '-' ELSE '+' END
            || CASE WHEN abs(exponent) < 10 THEN '0' ELSE '' END || abs(exponent);
    END IF;
    IF exponent < 0 THEN
        RETURN minus || '0.' || repeat('0', -exponent - 1) || digits;
    END IF;
    RETURN minus || rpad(left(digits, exponent + 1), exponent + 1, '0') || '.'
        || coalesce(nullif(substr(digits, exponent + 2), ''), '0');
END $$;

ALTER FUNCTION cqrs_canonical_json(jsonb) PARALLEL SAFE;
