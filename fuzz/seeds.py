#!/usr/bin/env python3
"""Writes the committed seed corpus under fuzz/corpus/<target>/ (deterministic).

Run from anywhere: `python3 fuzz/seeds.py`. Seeds are small, meaningful inputs (real
startup packets, extended-protocol batches, SCRAM messages, console commands); libFuzzer
and the CI replay test (proxy/tests/fuzz_replay.rs, admin/tests/fuzz_replay.rs) mutate
from them. File names are a content hash, as libFuzzer names its own corpus entries.
"""
import hashlib
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def i32(n):
    return struct.pack(">i", n)


def i16(n):
    return struct.pack(">h", n)


def msg(tag, body=b""):
    return tag + i32(len(body) + 4) + body


def cstr(s):
    return (s.encode() if isinstance(s, str) else s) + b"\0"


def startup(params, version=196608):
    body = i32(version) + b"".join(cstr(k) + cstr(v) for k, v in params) + b"\0"
    return i32(len(body) + 4) + body


SSL = i32(8) + i32(80877103)
GSSENC = i32(8) + i32(80877104)
CANCEL = i32(16) + i32(80877102) + i32(1234) + i32(-559038737)

startup_seeds = [
    startup([("user", "app"), ("database", "db")]),
    startup([("user", "app")]),
    startup([]),
    startup([("database", "db")]),
    startup([("user", "app"), ("database", "pgbouncer")]),
    startup([("user", "app"), ("database", "db"), ("application_name", "psql"),
             ("client_encoding", "UTF8"), ("DateStyle", "ISO, MDY"), ("TimeZone", "Europe/Paris")]),
    startup([("user", "app"), ("options", "-c search_path=a,b --statement-timeout=5s")]),
    startup([("user", "app"), ("options", "-c x=1\\ 2 -cwork_mem=64MB")]),
    startup([("user", "app"), ("options", "-c")]),
    startup([("user", "app"), ("options", "--geqo")]),
    startup([("user", "app"), ("options", "-x")]),
    startup([("user", "app"), ("application_name", "O'Reilly \\ \"q\"")]),
    startup([("user", "app"), ("application_name", "x'; DROP TABLE t; --")]),
    startup([("user", "app"), ("search_path", "a', true); DROP TABLE t; --"),
             ("temp_tablespaces", "\"T 1\", t2")]),
    startup([("user", "app"), ("myapp.tenant", "42"), ("work_mem", "4MB")]),
    startup([("user", "app"), ("session", "x"), ("time", "y"), ("names", "z")]),
    startup([("user", "app"), ("Bad-Name", "v")]),
    startup([("user", "app"), ("replication", "database")]),
    startup([("user", "app"), ("replication", "off")]),
    startup([("user", "app"), ("_pq_.protocol_managed_params", "x")]),
    startup([("user", "app")], version=196610),
    startup([("user", "app")], version=131072),
    startup([("user", "app")], version=0x12345678),
    startup([("user", "\u00e9l\u00e8ve"), ("database", "caf\u00e9")]),
    SSL,
    SSL + startup([("user", "app")]),
    GSSENC,
    GSSENC + SSL,
    SSL + SSL,
    CANCEL,
    i32(12) + i32(80877102) + i32(1),
    i32(7) + b"abc",
    i32(10001) + i32(196608),
    i32(8) + i32(196608),
    i32(9) + i32(196608) + b"\0",
    i32(11) + i32(196608) + b"u\0\0",
    startup([("user", "app")])[:-1],
    startup([("user", "a")]) + startup([("user", "b"), ("application_name", "second")]),
    i32(-1),
    i32(0x7fffffff),
]


def parse(name, sql, types=()):
    return msg(b"P", cstr(name) + cstr(sql) + i16(len(types)) + b"".join(i32(t) for t in types))


def bind(portal, stmt, params=()):
    body = cstr(portal) + cstr(stmt) + i16(0) + i16(len(params))
    for p in params:
        body += i32(-1) if p is None else i32(len(p)) + p
    return msg(b"B", body + i16(0))


def describe(kind, name):
    return msg(b"D", kind + cstr(name))


def close(kind, name):
    return msg(b"C", kind + cstr(name))


def execute(portal="", rows=0):
    return msg(b"E", cstr(portal) + i32(rows))


def q(sql):
    return msg(b"Q", cstr(sql))


SYNC = msg(b"S")
FLUSH = msg(b"H")
TERM = msg(b"X")

extended = parse("", "select $1::int", [23]) + bind("", "", [b"1"]) + describe(b"P", "") + execute() + SYNC
named = parse("s1", "select 1") + bind("", "s1") + execute() + SYNC
frontend_bodies = [
    q("select 1"),
    q("select 1; select 2"),
    q(""),
    q("DISCARD ALL"),
    q("discard all;"),
    q("DEALLOCATE s1"),
    q("deallocate prepare \"S1\""),
    q("DEALLOCATE ALL"),
    q("deallocate prepare all"),
    q("deallocate \"\""),
    q("SET application_name = 'x'"),
    q("select 'error'"),
    q("BEGIN"),
    q("COPY t FROM STDIN") + msg(b"d", b"1\n") + msg(b"c"),
    q("copy t from stdin") + msg(b"d", b"1\n") + SYNC + msg(b"f", cstr("no")),
    q("LISTEN chan"),
    q("SET work_mem = '64MB'"),
    q("SET LOCAL work_mem = '64MB'"),
    q("PREPARE p AS select 1"),
    q("CREATE TEMP TABLE t (a int)"),
    q("select pg_advisory_lock(1)"),
    q("DECLARE c CURSOR WITH HOLD FOR select 1"),
    q("LOAD 'auto_explain'"),
    q("select $$;LISTEN x$$, 'LISTEN', \"listen\" -- LISTEN\n"),
    q("/* LISTEN /* nested */ x */ select 1"),
    q("select E'\\';LISTEN x'"),
    q("select U&'\\0041'; set role x"),
    msg(b"Q", b"select 1"),
    extended,
    named,
    named + named,
    parse("s1", "select 1") + parse("s1", "select 2") + SYNC,
    parse("s1", "select 1") + SYNC + close(b"S", "s1") + SYNC,
    parse("s1", "select 1") + describe(b"S", "s1") + SYNC,
    bind("", "missing") + execute() + SYNC,
    describe(b"S", "missing") + SYNC,
    close(b"P", "") + close(b"S", "nope") + SYNC,
    parse("a", "select 1") + parse("b", "select 2") + parse("c", "select 3") + bind("", "a") + bind("", "b") + bind("", "c") + SYNC,
    parse("s1", "select 'error'") + bind("", "s1") + execute() + SYNC + bind("", "s1") + SYNC,
    parse("", "LISTEN x") + bind("", "") + execute() + SYNC,
    parse("ps", "PREPARE q AS select 1") + bind("", "ps") + SYNC,
    parse("", "select 1") + FLUSH + bind("", "") + execute("", 1) + SYNC,
    msg(b"F", i32(1234) + i16(0) + i16(0) + i16(0)) ,
    q("select 1") + TERM,
    TERM,
    msg(b"Z", b""),
    msg(b"D", b""),
    msg(b"D", b"X" + cstr("x")),
    msg(b"B", b"nonul"),
    b"Q" + i32(3),
    b"Q" + i32(0x7fffffff),
    b"S" + i32(4) + b"Q",
    q("select 1") + extended + q("DISCARD ALL") + named,
]
flags = [0, 1, 2, 3, 4, 8, 16, 19, 32, 64, 96, 99, 115]
frontend_seeds = []
for i, body in enumerate(frontend_bodies):
    frontend_seeds.append(bytes([flags[i % len(flags)]]) + body)
    frontend_seeds.append(bytes([flags[(i * 7 + 3) % len(flags)]]) + body)

scram_seeds = []
for f, first, final in [
    (0, "n,,n=,r=rOprNGfwEbeRWgbNEkqO", "c=biws,r=%N,p=%P"),
    (0, "n,,n=,r=abc", "c=biws,r=%N,p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
    (0, "n,,n=,r=abc", "c=biws,r=%N,p=%P,x=1"),
    (0, "n,,n=user,r=abc,ext=1", "c=%C,r=%N,p=%P"),
    (0, "n,a=admin,n=,r=abc", "c=%C,r=%N,p=%P"),
    (0, "n,,m=ext,r=abc", "c=biws,r=%N,p=%P"),
    (0, "n,,n=,r=", "c=biws,r=%N,p=%P"),
    (0, "n,,n=,r=a,b", "c=biws,r=%N,p=%P"),
    (1, "y,,n=,r=abc", "c=eSws,r=%N,p=%P"),
    (0, "y,,n=,r=abc", "c=eSws,r=%N,p=%P"),
    (3, "p=tls-server-end-point,,n=,r=abc", "c=%C,r=%N,p=%P"),
    (3, "p=tls-server-end-point,,n=,r=abc", "c=biws,r=%N,p=%P"),
    (3, "p=tls-unique,,n=,r=abc", "c=%C,r=%N,p=%P"),
    (2, "p=tls-server-end-point,,n=,r=abc", "c=%C,r=%N,p=%P"),
    (0, "p=tls-server-end-point,,n=,r=abc", "c=%C,r=%N,p=%P"),
    (0, "n,,n=,r=abc", "c=biws,r=wrong,p=%P"),
    (0, "n,,n=,r=abc", "r=%N,p=%P"),
    (0, "n,,n=,r=abc", "c=!!!,r=%N,p=%P"),
    (0, "n,,n=,r=abc", "c=biws,r=%N,p=!!"),
    (0, "n,,n=,r=abc", ""),
    (0, "", ""),
    (0, "n", ""),
    (0, "x,,n=,r=abc", "c=biws,r=%N,p=%P"),
    (0x80, "r=%Nsrv,s=%S,i=%I", "v=%V"),
    (0x81, "r=%Nsrv,s=%S,i=%I", "v=%V"),
    (0x80, "r=%Nsrv,s=%S,i=%I", "v=AAAA"),
    (0x80, "r=%Nsrv,s=%S,i=%I", "e=invalid-proof"),
    (0x80, "r=%N,s=%S,i=%I", "v=%V"),
    (0x80, "r=other,s=%S,i=%I", "v=%V"),
    (0x80, "r=%Nsrv,s=c2FsdA==,i=%I", "v=%V"),
    (0x80, "r=%Nsrv,s=%S,i=4095", "v=%V"),
    (0x80, "r=%Nsrv,s=%S,i=-1", "v=%V"),
    (0x80, "r=%Nsrv,s=%S", "v=%V"),
    (0, "SCRAM-SHA-256$4096:c2FsdA==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:" "uqXWL2yPHNJgSVJdvBVJ3yMkY8GRgBrVCM2ZWTuzNqs=", ""),
    (0, "SCRAM-SHA-256$x:c2FsdA==$AA==:AA==", ""),
    (0, "md5" + "0" * 32, ""),
    (0, "md5\u00e9" + "0" * 30, ""),
]:
    scram_seeds.append(bytes([f]) + first.encode() + b"\0" + final.encode())

console_seeds = [s.encode() for s in [
    "SHOW POOLS;", "show pools", "SHOW STATS", "SHOW STATS_TOTALS", "SHOW CLIENTS",
    "SHOW SERVERS", "SHOW DATABASES", "SHOW CONFIG", "SHOW LISTS", "SHOW USERS",
    "SHOW VERSION", "SHOW HELP", "SHOW", "SHOW POOLS POOLS", "SHOW \"POOLS\"",
    "SET default_pool_size = 5", "SET pool_size TO '7'", "set query_wait_timeout = '1.5'",
    "SET \"max_client_conn\" = 10", "SET bad = 1", "SET a = = b", "SET a =", "SET = 1",
    "KILL db", "KILL", "KILL \"Quoted\"\"db\"", "KILL gone", "KILL a b",
    "PAUSE", "PAUSE app", "PAUSE slow", "RESUME", "RESUME app", "RECONNECT", "RECONNECT gone",
    "RELOAD", "RELOAD now", "PAUSE; RESUME", "SHOW POOLS; KILL bad; RELOAD",
    "'unterminated", "\"unterminated", "\"\"", "''", "SET a = ''''", ";;;", "", " \t\r\n",
    "select 1", "SHOW POOLS\0trailing", "\u00e9 SHOW", "SHOW \u00e9", "SET x = '\u2192;\"'",
    "KILL \"a;b\"; SHOW HELP", "sHoW cOnFiG;", "SHOW=", "=", "SET k TO v w",
]]
console_seeds.append(b"SHOW \xff\xfe POOLS")

for target, seeds in [
    ("startup_packet", startup_seeds),
    ("frontend_messages", frontend_seeds),
    ("scram_exchange", scram_seeds),
    ("console_command", console_seeds),
]:
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    for s in seeds:
        with open(os.path.join(d, hashlib.sha1(s).hexdigest()), "wb") as f:
            f.write(s)
    print(target, len(set(seeds)))
