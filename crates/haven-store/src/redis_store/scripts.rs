//! The Lua scripts that make each store operation atomic inside one Redis
//! Cluster slot. Every script gets the slot's key prefix `P` (for a mailbox
//! `<ns>{m<hex id>}`, for the directory `<ns>{dir}`) and reaches only keys that
//! start with it, so all of them hash to the slot of its one declared key.
//!
//! Mailbox keys under `P`:
//! - `P:rec`   hash: `sid`, `rkey`, `kind`, `skey`, `pe`/`pt` (push), `seq`, `n`, `b`,
//!   `idle` (idle expiry, seconds; 0 never)
//! - `P:q`     sorted set of sequence numbers (arrival order)
//! - `P:x`     sorted set of sequence numbers by expiry (bucket end)
//! - `P:ids`   hash envelope id -> seq; `P:eid` seq -> envelope id; `P:len` seq -> payload length
//! - `P:e:<seq>` the sealed envelope, with a native expiry at its bucket end
//! - `P:w`     hash relay node id -> until when it holds a Receive stream (seconds),
//!   with a native expiry at the latest until ([`PRESENCE`])
//! - `P:t:<digest>` a first contact's stamp record, expiring by itself (`put`)
//! - `P:wake`  the sharded pub/sub channel a put publishes to

/// KEYS[1] = P:w. ARGV: node id, until, now, seconds to keep the key. Records
/// that the node holds a stream until `until`, drops every other node's record
/// that has passed (a node that died leaves one), and sets the key to expire
/// when the newest record does, so no "last streamed at" time outlives its use
/// (review F15: a dead node's per-second time stayed until the mailbox was
/// deleted, and one device's mailboxes shared its refresh seconds).
pub(super) const PRESENCE: &str = r#"
local w = KEYS[1]
redis.call('HSET', w, ARGV[1], ARGV[2])
local fields = redis.call('HGETALL', w)
for i = 1, #fields, 2 do
  if tonumber(fields[i + 1]) <= tonumber(ARGV[3]) then redis.call('HDEL', w, fields[i]) end
end
redis.call('EXPIRE', w, ARGV[4])
return 'ok'
"#;

/// Shared helper: removes one envelope `seq` and fixes the counters. Returns its length.
const DROP: &str = r#"
local function drop(p, rec, seq)
  local eid = redis.call('HGET', p..':eid', seq)
  local len = tonumber(redis.call('HGET', p..':len', seq) or '0')
  redis.call('DEL', p..':e:'..seq)
  redis.call('ZREM', p..':q', seq)
  redis.call('ZREM', p..':x', seq)
  if eid then redis.call('HDEL', p..':ids', eid) end
  redis.call('HDEL', p..':eid', seq)
  redis.call('HDEL', p..':len', seq)
  redis.call('HINCRBY', rec, 'n', -1)
  redis.call('HINCRBY', rec, 'b', -len)
  return len
end
local function expire(p, rec, now)
  local n, b = 0, 0
  for _, seq in ipairs(redis.call('ZRANGEBYSCORE', p..':x', '-inf', now)) do
    b = b + drop(p, rec, seq)
    n = n + 1
  end
  return n, b
end
"#;

/// KEYS[1] = P:rec. ARGV: P, sid, rkey, kind, idle expiry. Returns 1, or 0 if it exists.
pub(super) const CREATE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'sid', ARGV[2], 'rkey', ARGV[3], 'kind', ARGV[4], 'seq', 0, 'n', 0,
  'b', 0, 'idle', ARGV[5])
return 1
"#;

/// KEYS[1] = P:rec. ARGV: P, until (a bucket end). Returns {'missing'},
/// {'kept', until} when it moved the idle expiry later, or {'same', stored}.
pub(super) const KEEP: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
local stored = tonumber(redis.call('HGET', KEYS[1], 'idle') or '0')
local later = tonumber(ARGV[2])
if stored ~= 0 and later > stored then
  redis.call('HSET', KEYS[1], 'idle', ARGV[2])
  return {'kept', later}
end
return {'same', stored}
"#;

/// KEYS[1] = P:rec. ARGV: P, sender key. Returns 'ok', 'missing' or 'secured'.
pub(super) const SECURE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
local current = redis.call('HGET', KEYS[1], 'skey')
if current and current ~= ARGV[2] then return 'secured' end
redis.call('HSET', KEYS[1], 'skey', ARGV[2])
return 'ok'
"#;

/// KEYS[1] = P:rec. ARGV: P, endpoint ('' removes), token. Returns 'ok' or 'missing'.
pub(super) const SET_PUSH: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], 'pe', 'pt')
else
  redis.call('HSET', KEYS[1], 'pe', ARGV[2], 'pt', ARGV[3])
end
return 'ok'
"#;

/// KEYS[1] = P:rec. ARGV: P, envelope id, bucket end, now, sealed, length,
/// max envelopes, max bytes, check ('1' compares `skey`, '0' does not),
/// expected sender key ('' for none), a first contact's stamp record (hex
/// digest, '' for none: `P:t:<digest>`, answered as a duplicate while it
/// exists), its expiry. Returns {'stored', seq, expired n, expired bytes},
/// {'dup', seq, n, b}, {'count', stored, n, b}, {'bytes', stored, n, b}, {'sender'}
/// (the sender key is not the expected one: review F19) or {'missing'}.
pub(super) fn put() -> String {
    format!(
        "{DROP}{}",
        r#"
local rec, p = KEYS[1], ARGV[1]
if redis.call('EXISTS', rec) == 0 then return {'missing'} end
if ARGV[9] == '1' and (redis.call('HGET', rec, 'skey') or '') ~= ARGV[10] then
  return {'sender'}
end
local xn, xb = expire(p, rec, ARGV[4])
local seq = redis.call('HGET', p..':ids', ARGV[2])
if seq then return {'dup', tonumber(seq), xn, xb} end
-- A first contact accepted once already, since acknowledged: its stamp's
-- record (in the mailbox's slot, expiring by itself; its value the expiry,
-- compared with the caller's now as every other expiry here) says so.
local spent = ''
if ARGV[11] ~= '' then
  spent = p..':t:'..ARGV[11]
  local kept = redis.call('GET', spent)
  if kept and tonumber(kept) > tonumber(ARGV[4]) then return {'dup', 0, xn, xb} end
end
local n = tonumber(redis.call('HGET', rec, 'n'))
local b = tonumber(redis.call('HGET', rec, 'b'))
local len = tonumber(ARGV[6])
if n >= tonumber(ARGV[7]) then return {'count', n, xn, xb} end
if b + len > tonumber(ARGV[8]) then return {'bytes', b, xn, xb} end
seq = redis.call('HINCRBY', rec, 'seq', 1)
local env = p..':e:'..seq
redis.call('SET', env, ARGV[5])
redis.call('EXPIREAT', env, ARGV[3])
redis.call('ZADD', p..':q', seq, seq)
redis.call('ZADD', p..':x', ARGV[3], seq)
redis.call('HSET', p..':ids', ARGV[2], seq)
redis.call('HSET', p..':eid', seq, ARGV[2])
redis.call('HSET', p..':len', seq, len)
redis.call('HINCRBY', rec, 'n', 1)
redis.call('HINCRBY', rec, 'b', len)
if spent ~= '' then redis.call('SET', spent, ARGV[12], 'EXAT', ARGV[12]) end
-- Wake the relay nodes holding a Receive stream for this mailbox.
redis.call('SPUBLISH', p..':wake', '1')
return {'stored', seq, xn, xb}
"#
    )
}

/// KEYS[1] = P:rec. ARGV: P, after (exclusive), limit, now. Returns {'missing'}
/// or a flat list of seq, bucket end, envelope id, sealed value, skipping
/// expired envelopes (removed later by a put or the sweep).
pub(super) const LIST: &str = r#"
local rec, p = KEYS[1], ARGV[1]
if redis.call('EXISTS', rec) == 0 then return {'missing'} end
local limit, now = tonumber(ARGV[3]), tonumber(ARGV[4])
local out, found, after = {}, 0, '(' .. ARGV[2]
while found < limit do
  local seqs = redis.call('ZRANGEBYSCORE', p..':q', after, '+inf', 'LIMIT', 0, limit)
  if #seqs == 0 then break end
  for _, seq in ipairs(seqs) do
    after = '(' .. seq
    local expires = tonumber(redis.call('ZSCORE', p..':x', seq))
    if expires and expires > now and found < limit then
      local value = redis.call('GET', p..':e:'..seq)
      if value then
        table.insert(out, seq)
        table.insert(out, expires)
        table.insert(out, redis.call('HGET', p..':eid', seq))
        table.insert(out, value)
        found = found + 1
      end
    end
  end
end
return out
"#;

/// KEYS[1] = P:rec. ARGV: P, envelope ids... Returns {'missing'} or {deleted, bytes}.
pub(super) fn ack() -> String {
    format!(
        "{DROP}{}",
        r#"
local rec, p = KEYS[1], ARGV[1]
if redis.call('EXISTS', rec) == 0 then return {'missing'} end
local n, b = 0, 0
for i = 2, #ARGV do
  local seq = redis.call('HGET', p..':ids', ARGV[i])
  if seq then
    b = b + drop(p, rec, seq)
    n = n + 1
  end
end
return {n, b}
"#
    )
}

/// KEYS[1] = P:rec. ARGV: P, now. Returns {expired, bytes}.
pub(super) fn expire() -> String {
    format!(
        "{DROP}{}",
        r#"
local rec, p = KEYS[1], ARGV[1]
if redis.call('EXISTS', rec) == 0 then return {0, 0} end
local n, b = expire(p, rec, ARGV[2])
return {n, b}
"#
    )
}

/// KEYS[1] = P:rec. ARGV: P, and for an idle sweep `now`. Returns {} if
/// missing, {'later', idle expiry} if `now` is given and the mailbox's idle
/// expiry has not passed (0: never), else {sender id, envelopes, bytes}.
pub(super) const DELETE: &str = r#"
local rec, p = KEYS[1], ARGV[1]
if redis.call('EXISTS', rec) == 0 then return {} end
if ARGV[2] then
  local idle = tonumber(redis.call('HGET', rec, 'idle') or '0')
  if idle == 0 or idle > tonumber(ARGV[2]) then return {'later', idle} end
end
local sid = redis.call('HGET', rec, 'sid')
local n = tonumber(redis.call('HGET', rec, 'n'))
local b = tonumber(redis.call('HGET', rec, 'b'))
for _, seq in ipairs(redis.call('ZRANGE', p..':q', 0, -1)) do
  redis.call('DEL', p..':e:'..seq)
end
redis.call('DEL', rec, p..':q', p..':x', p..':ids', p..':eid', p..':len', p..':w')
redis.call('SPUBLISH', p..':wake', '1')
return {sid, n, b}
"#;

/// Directory keys under `D` (the `{dir}` slot): `D:dev:<hex>` hash (`signed`,
/// `kem`), `D:ot:<hex>` / `D:kot:<hex>` hashes id -> blob with sorted sets
/// `D:otz:<hex>` / `D:kotz:<hex>` of ids, `D:cap` hash supporter -> capacity,
/// `D:doc:<kind>` hash supporter -> document and `D:ver:<kind>` supporter -> version.
///
/// KEYS[1] = D:cap. ARGV: D, device hex, signed, kem, #one-time, (id, blob)...,
/// #kem one-time, (id, blob)..., limit. Returns {'ok', ot, kot} or {'many'}.
pub(super) const PUBLISH_PREKEYS: &str = r#"
local d, dev = ARGV[1], ARGV[2]
local i = 5
local function take(kind)
  local count = tonumber(ARGV[i]); i = i + 1
  local items = {}
  for _ = 1, count do
    table.insert(items, {ARGV[i], ARGV[i + 1]}); i = i + 2
  end
  return items
end
local ot, kot = take('ot'), take('kot')
local limit = tonumber(ARGV[i])
local function fits(hash, items)
  local total = redis.call('HLEN', hash)
  for _, item in ipairs(items) do
    if redis.call('HEXISTS', hash, item[1]) == 0 then total = total + 1 end
  end
  return total <= limit
end
if not fits(d..':ot:'..dev, ot) or not fits(d..':kot:'..dev, kot) then return {'many'} end
redis.call('HSET', d..':dev:'..dev, 'signed', ARGV[3], 'kem', ARGV[4])
for _, item in ipairs(ot) do
  redis.call('HSET', d..':ot:'..dev, item[1], item[2])
  redis.call('ZADD', d..':otz:'..dev, item[1], item[1])
end
for _, item in ipairs(kot) do
  redis.call('HSET', d..':kot:'..dev, item[1], item[2])
  redis.call('ZADD', d..':kotz:'..dev, item[1], item[1])
end
return {'ok', redis.call('HLEN', d..':ot:'..dev), redis.call('HLEN', d..':kot:'..dev)}
"#;

/// KEYS[1] = D:cap. ARGV: D, supporter, device hex... Returns {'exhausted'},
/// {'none'} or {'ok', (device hex, signed, one-time or '', kem)...}.
pub(super) const CLAIM: &str = r#"
local d = ARGV[1]
local capacity = tonumber(redis.call('HGET', KEYS[1], ARGV[2]) or '0')
if capacity <= 0 then return {'exhausted'} end
local all = true
for i = 3, #ARGV do
  if redis.call('EXISTS', d..':dev:'..ARGV[i]) == 0 then all = false end
end
if not all then return {'none'} end
local out = {'ok'}
local function pop(kind, dev)
  local ids = redis.call('ZRANGE', d..':'..kind..'z:'..dev, 0, 0)
  if #ids == 0 then return nil end
  local blob = redis.call('HGET', d..':'..kind..':'..dev, ids[1])
  redis.call('HDEL', d..':'..kind..':'..dev, ids[1])
  redis.call('ZREM', d..':'..kind..'z:'..dev, ids[1])
  return blob
end
for i = 3, #ARGV do
  local dev = ARGV[i]
  do
    local signed = redis.call('HGET', d..':dev:'..dev, 'signed')
    local one_time = pop('ot', dev) or ''
    local kem = pop('kot', dev) or redis.call('HGET', d..':dev:'..dev, 'kem')
    table.insert(out, dev)
    table.insert(out, signed)
    table.insert(out, one_time)
    table.insert(out, kem)
  end
end
redis.call('HSET', KEYS[1], ARGV[2], capacity - 1)
return out
"#;

/// KEYS[1] = D:cap. ARGV: D, kind, supporter, document, version, versioned
/// ('1' refuses going back, and the same version with other bytes). Returns
/// {'ok'}, {'stale', stored version} or {'conflict'}. Versions are compared as
/// decimal strings of equal length first (Lua numbers are doubles, exact only
/// to 2^53).
pub(super) const PUT_DOCUMENT: &str = r#"
local d, kind, supporter = ARGV[1], ARGV[2], ARGV[3]
local version = ARGV[5]
local stored = redis.call('HGET', d..':ver:'..kind, supporter)
if ARGV[6] == '1' and stored then
  local older = #stored > #version or (#stored == #version and stored > version)
  if older then
    return {'stale', stored}
  end
  if stored == version and redis.call('HGET', d..':doc:'..kind, supporter) ~= ARGV[4] then
    return {'conflict'}
  end
end
redis.call('HSET', d..':doc:'..kind, supporter, ARGV[4])
redis.call('HSET', d..':ver:'..kind, supporter, version)
return {'ok'}
"#;

/// `KEYS[1]`: a request record; `ARGV`: its expiry, the caller's now, when
/// Redis drops it. 1 when recorded, 0 when an unexpired record exists (a replay).
pub const REMEMBER_REQUEST: &str = r#"
local stored = redis.call('GET', KEYS[1])
if stored and tonumber(stored) > tonumber(ARGV[2]) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'EXAT', ARGV[3])
return 1
"#;
