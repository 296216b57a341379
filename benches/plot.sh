#!/usr/bin/env bash
# Plots a load.sh --csv file: TPS and pooler CPU per transaction against client count,
# pgmux vs PgBouncer, for one pgbench mode.
# Usage: benches/plot.sh results.csv out.png [mode]   (needs gnuplot: apt-get install gnuplot-nox)
set -euo pipefail
CSV="$1"; OUT="$2"; MODE="${3:-simple}"
command -v gnuplot >/dev/null || { echo "gnuplot missing: apt-get install -y gnuplot-nox" >&2; exit 1; }
TMP="$(mktemp -d)"; trap 'rm -rf "$TMP"' EXIT
for t in pgmux pgbouncer direct; do
    # Sweep rows only (column 10 "sweep"; files from before that column have none): the
    # scenario rows of the same run (select50, single, ...) would add a second point.
    awk -F, -v t="$t" -v m="$MODE" '$1 == t && $2 == m && $4 != "" && ($10 == "" || $10 == "sweep") { print $3, $4, $7 }' "$CSV" |
        sort -n >"$TMP/$t.dat"
done
gnuplot <<GP
set terminal png size 900,500
set output "$OUT"
set title "pgbench -S -M $MODE, pool 20: throughput and pooler CPU by client count"
set logscale x
set xlabel "clients"
set ylabel "TPS"
set y2label "pooler CPU per transaction (us)"
set y2tics
set ytics nomirror
set key outside bottom center horizontal
set grid
plot "$TMP/pgmux.dat" using 1:2 with linespoints lw 2 title "pgmux TPS", \
     "$TMP/pgbouncer.dat" using 1:2 with linespoints lw 2 title "PgBouncer TPS", \
     "$TMP/direct.dat" using 1:2 with points pt 7 title "direct TPS", \
     "$TMP/pgmux.dat" using 1:3 axes x1y2 with linespoints dt 2 title "pgmux CPU/tx", \
     "$TMP/pgbouncer.dat" using 1:3 axes x1y2 with linespoints dt 2 title "PgBouncer CPU/tx"
GP
echo "wrote $OUT"
