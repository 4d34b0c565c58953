\set t random(0, 999)
SELECT set_config('app.tenant', 't' || lpad(:t::text, 4, '0'), false);
